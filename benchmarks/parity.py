"""Accuracy parity under heavy compression (issue #11): seeds × strategies × tasks, then one table.

Runs ``run.py`` for every (config, seed) pair — optionally only some strategies of the config — into
``results/parity/<experiment>/<strategy-group>/seed<S>/`` (skipping runs that already finished, so an
interrupted benchmark continues), then reads every results.json and prints, per task, each strategy's
final accuracy (mean of the last 10 rounds, mean ± std over seeds), its uplink reduction against dense
fp32 (wire bytes), the gap to the best dense baseline, and rounds / uplink bytes to two targets: 95 %
of the best dense baseline's final accuracy, and that final accuracy minus 1 pp (the bytes-to-target
of issue #17, with its ratio to the best dense baseline's own bytes to that target).
``--runs`` and ``--name`` keep one study's runs and outputs apart from another's.

    .venv/bin/python benchmarks/parity.py run configs/parity_mlp.yaml --seeds 0 1 2
    .venv/bin/python benchmarks/parity.py run configs/parity_mlp.yaml --seeds 0 --only fedavgm,powersgd-r8-int4
    .venv/bin/python benchmarks/parity.py report       # tables + benchmarks/results/parity.{json,png}
    .venv/bin/python benchmarks/parity.py --runs results/parity17 --name parity17 report
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, save_figure, write_json  # noqa: E402

RUNS = ROOT / "results" / "parity"
LAST = 10  # rounds averaged for the "final" accuracy: one round's accuracy moves by a few points
DENSE = ("none", "fp16")  # methods counted as dense baselines


def run(config: Path, seeds: list[int], only: list[str] | None, rounds: int | None, runs: Path = RUNS) -> None:
    """run.py once per seed (strategies filtered by ``only``) unless that run already finished."""
    document = yaml.safe_load(config.read_text())
    if only:
        missing = set(only) - {s["name"] for s in document["strategies"]}
        if missing:
            raise SystemExit(f"{config}: no strategies {sorted(missing)}")
        document["strategies"] = [s for s in document["strategies"] if s["name"] in only]
    group = "+".join(only) if only else "all"
    for seed in seeds:
        out = runs / document["experiment"] / group / f"seed{seed}"
        if (out / "results.json").is_file() and all(
                s.get("completed") for s in json.loads((out / "results.json").read_text())["strategies"]):
            print(f"skip {out} (finished)")
            continue
        out.mkdir(parents=True, exist_ok=True)
        path = out / "experiment.yaml"
        path.write_text(yaml.safe_dump({**_absolute_paths(document, config.parent), "seed": seed}, sort_keys=False))
        args = [sys.executable, str(ROOT / "run.py"), str(path), "--out", str(out), "--no-plots"]
        if rounds:
            args += ["--set", f"train.rounds={rounds}"]
        started = time.time()
        print(f"run {config.name} seed {seed} [{group}] → {out}", flush=True)
        done = subprocess.run(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"run.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
        print(f"  done in {time.time() - started:.0f} s", flush=True)


def _absolute_paths(document: dict[str, Any], base: Path) -> dict[str, Any]:
    """The config with its YAML-relative paths made absolute, so that a copy in a run folder still finds them."""
    out = copy.deepcopy(document)
    for section, key in (("data", "path"), ("model", "weights"), ("client_state", "dir")):
        block = out.get(section)
        if isinstance(block, dict) and isinstance(block.get(key), str) and not Path(block[key]).is_absolute():
            block[key] = str((base / block[key]).resolve())
    return out


def collect(runs: Path = RUNS) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """experiment → strategy → one entry per seed (rounds, final, compression)."""
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(runs.glob("*/*/seed*/results.json")):
        results = json.loads(path.read_text())
        by_name = {s["name"]: s for s in results["config"]["strategies"]}
        for strategy in results["strategies"]:
            if not strategy.get("completed"):
                continue
            entry = {"seed": results["config"]["seed"], "rounds": strategy["rounds"], "final": strategy["final"],
                     "compression": by_name[strategy["name"]]["compression"],
                     "server_optimizer": _server_optimizer(results["config"], strategy["name"])}
            found.setdefault(results["experiment"], {}).setdefault(strategy["name"], []).append(entry)
    return found


def _server_optimizer(config: dict[str, Any], name: str) -> str:
    """'momentum 0.9', 'sgd', 'adam lr 0.03' for a strategy (its override or the top-level train)."""
    strategy = next(s for s in config["strategies"] if s["name"] == name)
    opt = {**config["train"]["server_optimizer"], **(((strategy.get("train") or {}).get("server_optimizer")) or {})}
    if opt["name"] == "momentum":
        return f"momentum {opt['momentum']:g}" + ("" if opt["lr"] == 1 else f" lr {opt['lr']:g}")
    return opt["name"] + ("" if opt["name"] == "sgd" and opt["lr"] == 1 else f" lr {opt['lr']:g}")


def _final(entry: dict[str, Any]) -> float:
    """Mean accuracy of the last LAST rounds."""
    values = [r["accuracy"] for r in entry["rounds"][-LAST:] if r["accuracy"] is not None]
    return sum(values) / len(values)


def _to_target(entry: dict[str, Any], target: float) -> tuple[int | None, int | None]:
    """(round, cumulative uplink bytes) when accuracy first reaches ``target``."""
    uplink = 0
    for row in entry["rounds"]:
        uplink += row["uplink_bytes"]
        if row["accuracy"] is not None and row["accuracy"] >= target:
            return row["round"], uplink
    return None, None


def summarize(found: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per experiment: per strategy mean/std final accuracy, reduction, gap to best dense, rounds/bytes to target."""
    out: dict[str, Any] = {}
    for experiment, strategies in found.items():
        rows = {}
        for name, entries in strategies.items():
            finals = [_final(e) for e in entries]
            dense = sum(e["final"]["uplink_bytes_total"] * (e["final"]["uplink_ratio_vs_dense"] or 1) for e in entries)
            sent = sum(e["final"]["uplink_bytes_total"] for e in entries)
            rows[name] = {"seeds": sorted(e["seed"] for e in entries), "final_mean": statistics.mean(finals),
                          "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                          "reduction": dense / sent, "method": entries[0]["compression"]["method"],
                          "server_optimizer": entries[0]["server_optimizer"],
                          "uplink_per_round": sent / sum(len(e["rounds"]) for e in entries)}
        dense_rows = {n: r for n, r in rows.items() if r["method"] in DENSE}
        best = max(dense_rows, key=lambda n: dense_rows[n]["final_mean"]) if dense_rows else None
        target = 0.95 * rows[best]["final_mean"] if best else None
        near = rows[best]["final_mean"] - 0.01 if best else None  # issue #17: best dense final − 1 pp
        for name, row in rows.items():
            row["gap_pp"] = 100 * (row["final_mean"] - rows[best]["final_mean"]) if best else None
            for key, goal in (("", target), ("_near", near)):
                reached = [_to_target(e, goal) for e in strategies[name]] if goal else []
                rounds_ = [r for r, _ in reached if r is not None]
                complete = len(rounds_) == len(reached) and bool(reached)
                row["reached" + key] = f"{len(rounds_)}/{len(reached)}"
                row["rounds_to_target" + key] = statistics.mean(rounds_) if complete else None
                bytes_ = [b for _, b in reached if b is not None]
                row["uplink_to_target" + key] = statistics.mean(bytes_) if complete else None
        base = rows[best]["uplink_to_target_near"] if best else None
        for row in rows.values():
            mine = row["uplink_to_target_near"]
            row["bytes_to_target_near_ratio"] = base / mine if base and mine else None
        out[experiment] = {"best_dense": best, "target": target, "target_near": near, "strategies": rows}
    return out


def markdown(summary: dict[str, Any]) -> str:
    """One table per experiment."""
    parts = []
    for experiment, block in summary.items():
        target = block["target"]
        parts.append(f"**{experiment}** — best dense baseline: {block['best_dense']}; target "
                     f"{100 * target:.1f} % (95 % of it)" if target else f"**{experiment}**")
        parts.append("")
        near = block.get("target_near")
        if near:
            parts.append(f"Second target (bytes-to-target): {100 * near:.1f} % (best dense final − 1 pp).")
        parts.append("")
        parts.append("| strategy | server optimizer | seeds | final acc % (last 10, mean ± std) | Δ vs best dense (pp) "
                     "| uplink reduction (wire) | uplink / round | rounds to target | uplink to target "
                     "| uplink to best − 1 pp | fewer bytes than best dense |")
        parts.append("|---|---|---|---|---|---|---|---|---|---|---|")
        ordered = sorted(block["strategies"].items(), key=lambda kv: -kv[1]["final_mean"])
        for name, row in ordered:
            gap = "–" if row["gap_pp"] is None else f"{row['gap_pp']:+.1f}"
            rounds_ = "not reached" if row["rounds_to_target"] is None else f"{row['rounds_to_target']:.0f}"
            to_bytes = "–" if row["uplink_to_target"] is None else f"{row['uplink_to_target'] / 1e6:.2f} MB"
            near_bytes = row.get("uplink_to_target_near")
            near_text = (f"not reached ({row['reached_near']})" if near_bytes is None
                         else f"{near_bytes / 1e6:.2f} MB ({row['reached_near']})")
            ratio = row.get("bytes_to_target_near_ratio")
            ratio_text = "–" if ratio is None else f"{ratio:.0f}×"
            parts.append(f"| {name} | {row['server_optimizer']} | {len(row['seeds'])} | {100 * row['final_mean']:.1f} ± "
                         f"{100 * row['final_std']:.1f} | {gap} | {row['reduction']:.1f}× | "
                         f"{row['uplink_per_round'] / 1e3:.1f} kB | {rounds_} ({row['reached']}) | {to_bytes} "
                         f"| {near_text} | {ratio_text} |")
        parts.append("")
    return "\n".join(parts)


def plot(found: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> None:
    """Accuracy vs cumulative uplink bytes (seed 0 or the first seed), one panel per experiment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 4.5), squeeze=False)
    for ax, (experiment, strategies) in zip(axes[0], found.items()):
        colors = plt.cm.tab20.colors  # more strategies than the default 10-colour cycle
        for i, (name, entries) in enumerate(sorted(strategies.items())):
            entry = min(entries, key=lambda e: e["seed"])
            cumulative, xs, ys = 0, [], []
            for row in entry["rounds"]:
                cumulative += row["uplink_bytes"]
                xs.append(cumulative)
                ys.append(100 * row["accuracy"])
            dense = entry["compression"]["method"] in DENSE
            ax.plot(xs, ys, label=name, linewidth=1.2 if dense else 0.9, color=colors[i % len(colors)],
                    linestyle="--" if dense else "-")
        ax.set_xscale("log")
        ax.set(xlabel="cumulative uplink bytes (wire, log); dense baselines dashed", ylabel="test accuracy (%)",
               title=experiment)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """``run`` a config over seeds, or ``report`` everything found under results/parity."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=RUNS, help=f"run folders (default {RUNS})")
    parser.add_argument("--name", default="parity", help="output name: benchmarks/results/<name>.{json,png}")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="run a config for some seeds")
    one.add_argument("config", type=Path)
    one.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    one.add_argument("--only", default=None, help="comma-separated strategy names of the config")
    one.add_argument("--rounds", type=int, default=None, help="override train.rounds")
    sub.add_parser("report", help="tables and plot from every finished run")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.config, args.seeds, args.only.split(",") if args.only else None, args.rounds, args.runs)
        return 0
    found = collect(args.runs)
    if not found:
        print(f"no finished runs under {args.runs}", file=sys.stderr)
        return 2
    summary = summarize(found)
    print(markdown(summary))
    out = ROOT / "benchmarks" / "results"
    write_json({"summary": summary, "last_rounds_averaged": LAST, "machine": machine_info()}, out / f"{args.name}.json")
    plot(found, out / f"{args.name}.png")
    print(f"saved {out / f'{args.name}.json'} and {out / f'{args.name}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
