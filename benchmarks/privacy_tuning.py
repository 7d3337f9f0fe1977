#!/usr/bin/env python
"""Privacy/utility with fair tuning: a small grid per DP method, then several seeds at the chosen settings.

Two steps, each one command, each one ``run.py`` process per seed (every strategy of a step trains on
identical data, partitions, Poisson cohorts and seeds, as in ``benchmarks/privacy_utility.py``):

``tune``
    Every selected DP method of ``configs/dp_compare.yaml`` runs once per grid point
    clip_norm × server lr (plain server SGD) × tuning ε, on one seed. σ is calibrated per ε by the
    accountant (it does not depend on C). Score: test accuracy, mean of the last 10 rounds. Choice
    per method: the grid point with the best mean score over the tuning ε values when it is also
    the best at each of them ("one setting"); otherwise each ε's own best, and a final ε uses the
    setting of the nearest tuning ε (ties: the smaller one). Writes ``privacy_tuning.json``.
``final``
    Every selected DP method at every final ε with its chosen setting, plus the config's non-DP
    references, once per seed. Reports mean ± std (over seeds) of the mean-of-last-10 accuracy,
    uplink wire bytes (the ledger's) and their reduction against dense DP-FedAvg, and the issue's
    targets. Writes ``privacy_utility_tuned.json`` (with a markdown table) and a plot.

Usage::

    python benchmarks/privacy_tuning.py tune  --out /tmp/pt_tune            # grid, seed 0, ε = 2 and 8
    python benchmarks/privacy_tuning.py final --out /tmp/pt_final           # seeds 0 1 2, ε = 1 2 4 8
    python benchmarks/privacy_tuning.py final --from-run /tmp/pt_final      # re-analyse only (several folders: merged)

Tuning on the test accuracy of seed 0, which is also a final seed, flatters every method alike; it
is a fair comparison between methods, not an unbiased estimate of any one of them.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bytes_to_accuracy import run_experiment  # noqa: E402  (sibling benchmark scripts)
from common import machine_info, write_json  # noqa: E402
from privacy_utility import eps_tag, finish_epsilon_plot, noised_numbers  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "dp_compare.yaml"
RESULTS_DIR = ROOT / "benchmarks" / "results"
BASELINE = "dp-fedavg"
DEFAULT_METHODS = ["dp-fedavg", "dp-powersgd-r4-int8", "dp-powersgd-shared-r4"]
DEFAULT_REFERENCES = ["fedavg", "powersgd-r4-int8", "powersgd-shared-r4"]
LAST_N = 10
# The targets (#18, "DP that earns its place").
LOW_EPSILON = 2.0  # at every ε ≤ this: a compressed DP method ≥ baseline + LOW_GAIN_PP
LOW_GAIN_PP = 3.0
HIGH_EPSILON = 8.0  # at this ε: a compressed DP method ≥ baseline − HIGH_LOSS_PP with ≥ HIGH_REDUCTION× less uplink
HIGH_LOSS_PP = 1.0
HIGH_REDUCTION = 50.0


def num_tag(value: float) -> str:
    """A strategy-name-safe spelling of a number (0.25 → '0p25', 2 → '2')."""
    return f"{value:g}".replace(".", "p").replace("-", "m")


def dp_entries(raw: Mapping[str, Any], methods: Sequence[str]) -> list[dict[str, Any]]:
    """The config's DP strategies named in ``methods``, in that order (unknown or non-DP names: error)."""
    by_name = {s["name"]: s for s in raw["strategies"]}
    out = []
    for method in methods:
        entry = by_name.get(method)
        if entry is None or not entry.get("privacy"):
            raise SystemExit(f"{method!r} is not a DP strategy of the config (have: {', '.join(by_name)})")
        out.append(entry)
    return out


def configured(entry: Mapping[str, Any], name: str, epsilon: float, clip: float, server_lr: float,
               base_server: Mapping[str, Any]) -> dict[str, Any]:
    """``entry`` renamed, calibrated to ``epsilon``, with clip norm ``clip`` and plain server SGD at ``server_lr``."""
    copied = copy.deepcopy(dict(entry))
    copied["name"] = name
    copied["privacy"] = dict(copied["privacy"], target_epsilon=float(epsilon), noise_multiplier=None,
                             clip_norm=float(clip))
    train = dict(copied.get("train") or {})
    train["server_optimizer"] = dict(base_server, name="sgd", lr=float(server_lr))
    copied["train"] = train
    return copied


def expand_grid(raw: Mapping[str, Any], methods: Sequence[str], epsilons: Sequence[float], clips: Sequence[float],
                server_lrs: Sequence[float], points: Sequence[tuple[float, float]] | None = None,
                ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The tuning experiment: each method × ε × clip × server lr as its own strategy; and name → grid point.

    ``points`` (clip, server lr) pairs replace the product ``clips`` × ``server_lrs`` (a pruned grid).
    """
    expanded = copy.deepcopy(dict(raw))
    base_server = dict(raw.get("train", {}).get("server_optimizer") or {})
    strategies, index = [], {}
    grid = list(points) if points else [(c, lr) for c in clips for lr in server_lrs]
    for entry in dp_entries(raw, methods):
        for epsilon in epsilons:
            for clip, lr in grid:
                name = f"{entry['name']}-{eps_tag(epsilon)}-c{num_tag(clip)}-lr{num_tag(lr)}"
                strategies.append(configured(entry, name, epsilon, clip, lr, base_server))
                index[name] = {"method": entry["name"], "epsilon": float(epsilon), "clip_norm": float(clip),
                               "server_lr": float(lr)}
    expanded["strategies"] = strategies
    expanded["experiment"] = f"{raw.get('experiment', 'experiment')}-tuning"
    return expanded, index


def expand_final(raw: Mapping[str, Any], settings: Mapping[str, Mapping[str, Any]], epsilons: Sequence[float],
                 references: Sequence[str], only: Mapping[str, Sequence[float]] | None = None,
                 ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Each tuned method at every ε (``only``: a method's own subset) with the setting ``choose_for`` gives it,
    plus the non-DP references."""
    expanded = copy.deepcopy(dict(raw))
    base_server = dict(raw.get("train", {}).get("server_optimizer") or {})
    strategies, index = [], {}
    only = only or {}
    for entry in dp_entries(raw, list(settings)):
        for epsilon in only.get(entry["name"], epsilons):
            point = choose_for(settings[entry["name"]], epsilon)
            name = f"{entry['name']}-{eps_tag(epsilon)}"
            strategies.append(configured(entry, name, epsilon, point["clip_norm"], point["server_lr"], base_server))
            index[name] = {"method": entry["name"], "epsilon": float(epsilon), **point}
    by_name = {s["name"]: s for s in raw["strategies"]}
    for ref in references:
        if ref not in by_name or by_name[ref].get("privacy"):
            raise SystemExit(f"{ref!r} is not a non-DP strategy of the config")
        strategies.append(copy.deepcopy(by_name[ref]))
        index[ref] = {"method": ref, "epsilon": None}
    expanded["strategies"] = strategies
    expanded["experiment"] = f"{raw.get('experiment', 'experiment')}-tuned"
    return expanded, index


# --- choosing --------------------------------------------------------------------------------------
def choose(scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per method, from grid rows {method, epsilon, clip_norm, server_lr, score}: the chosen setting(s).

    One setting when the best mean over the tuning ε values is also the best at each ε; otherwise
    the best per ε. Returns {method: {"rule", "per_epsilon": {ε: {clip_norm, server_lr}}}}.
    """
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in scores):
        own = [r for r in scores if r["method"] == method and r["score"] is not None]
        epsilons = sorted({r["epsilon"] for r in own})
        points = sorted({(r["clip_norm"], r["server_lr"]) for r in own})
        table = {(r["epsilon"], r["clip_norm"], r["server_lr"]): r["score"] for r in own}
        best_at = {e: max((p for p in points if (e, *p) in table), key=lambda p: table[(e, *p)]) for e in epsilons}
        complete = [p for p in points if all((e, *p) in table for e in epsilons)]
        best_mean = max(complete, key=lambda p: sum(table[(e, *p)] for e in epsilons)) if complete else None
        if len(epsilons) == 1:
            rule = f"tuned at ε = {epsilons[0]:g} only: its best for every ε"
            per = best_at
        elif best_mean is not None and all(best_at[e] == best_mean for e in epsilons):
            rule = "one setting: best at every tuning ε"
            per = {e: best_mean for e in epsilons}
        else:
            rule = "per ε: each tuning ε's best; other ε take the nearest tuning ε's"
            per = best_at
        out[method] = {"rule": rule, "per_epsilon": {str(e): {"clip_norm": p[0], "server_lr": p[1]}
                                                     for e, p in per.items()}}
    return out


def choose_for(setting: Mapping[str, Any], epsilon: float) -> dict[str, float]:
    """The chosen {clip_norm, server_lr} for ``epsilon``: that of the nearest tuning ε (ties: the smaller)."""
    tuned = sorted(float(e) for e in setting["per_epsilon"])
    nearest = min(tuned, key=lambda e: (abs(math.log(epsilon / e)), e))
    point = setting["per_epsilon"][str(nearest) if str(nearest) in setting["per_epsilon"] else f"{nearest:g}"]
    return {"clip_norm": float(point["clip_norm"]), "server_lr": float(point["server_lr"]), "tuned_at": nearest}


# --- analysis --------------------------------------------------------------------------------------
def mean_last(rounds: Sequence[Mapping[str, Any]], n: int = LAST_N) -> float | None:
    """Mean test accuracy (%) over the last ``n`` evaluated rounds."""
    acc = [r["accuracy"] for r in rounds if r.get("accuracy") is not None and math.isfinite(r["accuracy"])]
    last = acc[-n:]
    return 100.0 * sum(last) / len(last) if last else None


def per_strategy(results: Mapping[str, Any], index: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per strategy of one run: grid point / ε, score, ε spent, σ, uplink wire bytes."""
    from fedpower.experiment import as_experiment, privacy_plan

    experiment = as_experiment(results["config"])
    rows = []
    for s in results["strategies"]:
        meta = dict(index.get(s["name"], {"method": s["name"], "epsilon": None}))
        plan = privacy_plan(experiment.resolve(s["name"]))
        rows.append({
            "strategy": s["name"], **meta, "score": mean_last(s["rounds"]),
            "final_accuracy": 100.0 * s["final"]["accuracy"] if s["final"].get("accuracy") is not None else None,
            "epsilon_spent": s["final"].get("epsilon"),
            "noise_multiplier": plan.noise_multiplier if plan else None,
            "uplink_wire_bytes": s["final"]["uplink_bytes_total"],
            "rounds_completed": s["final"]["rounds_completed"], "stop_reason": s["final"].get("stop_reason"),
            "wall_seconds": s["final"]["wall_seconds"],
        })
    return rows


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value), n and the values."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


def aggregate(per_seed: Mapping[int, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (method, ε) over the seeds: accuracy mean ± std, uplink, reduction vs DP-FedAvg."""
    keyed: dict[tuple[str, float | None], list[Mapping[str, Any]]] = {}
    for rows in per_seed.values():
        for r in rows:
            keyed.setdefault((r["method"], r["epsilon"]), []).append(r)
    base_up = {eps: statistics.fmean(x["uplink_wire_bytes"] for x in rows)
               for (method, eps), rows in keyed.items() if method == BASELINE}
    dense_up = statistics.fmean(base_up.values()) if base_up else None
    out = []
    for (method, eps), rows in keyed.items():
        up = statistics.fmean(x["uplink_wire_bytes"] for x in rows)
        ref_up = base_up.get(eps, dense_up)
        out.append({
            "method": method, "epsilon": eps,
            "clip_norm": rows[0].get("clip_norm"), "server_lr": rows[0].get("server_lr"),
            "noise_multiplier": rows[0].get("noise_multiplier"),
            "accuracy": _stats([x["score"] for x in rows if x["score"] is not None]),
            "epsilon_spent": max((x["epsilon_spent"] or 0.0) for x in rows) if eps is not None else None,
            "uplink_wire_bytes": up, "uplink_reduction_vs_dp_fedavg": ref_up / up if ref_up and up else None,
            "seeds": sorted(per_seed),
        })
    return out


def targets(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's two targets, per ε, from the seed means (the std is reported alongside)."""
    def at(eps: float) -> tuple[Mapping[str, Any] | None, list[Mapping[str, Any]]]:
        here = [r for r in rows if r["epsilon"] == eps]
        return (next((r for r in here if r["method"] == BASELINE), None),
                [r for r in here if r["method"] != BASELINE])

    low = []
    for eps in sorted({r["epsilon"] for r in rows if r["epsilon"] is not None and r["epsilon"] <= LOW_EPSILON}):
        base, others = at(eps)
        if base is None or not others:
            continue
        best = max(others, key=lambda r: r["accuracy"]["mean"])
        gain = best["accuracy"]["mean"] - base["accuracy"]["mean"]
        low.append({"epsilon": eps, "best": best["method"], "gain_pp": gain, "met": gain >= LOW_GAIN_PP,
                    "baseline": base["accuracy"]["mean"], "best_accuracy": best["accuracy"]["mean"]})
    base, others = at(HIGH_EPSILON)
    high: dict[str, Any] = {"epsilon": HIGH_EPSILON, "met": None}
    if base is not None:
        cheap = [r for r in others if (r["uplink_reduction_vs_dp_fedavg"] or 0) >= HIGH_REDUCTION]
        high["baseline"] = base["accuracy"]["mean"]
        high["candidates"] = [{"method": r["method"], "accuracy": r["accuracy"]["mean"],
                               "gap_pp": r["accuracy"]["mean"] - base["accuracy"]["mean"],
                               "reduction": r["uplink_reduction_vs_dp_fedavg"]} for r in others]
        high["met"] = any(r["accuracy"]["mean"] >= base["accuracy"]["mean"] - HIGH_LOSS_PP for r in cheap)
    return {
        "low": {"criterion": f"at every ε ≤ {LOW_EPSILON:g}: a compressed DP method ≥ {BASELINE} + {LOW_GAIN_PP:g} pp",
                "met": bool(low) and all(x["met"] for x in low), "per_epsilon": low},
        "high": {"criterion": f"at ε = {HIGH_EPSILON:g}: a compressed DP method with ≥ {HIGH_REDUCTION:g}× less "
                              f"uplink within {HIGH_LOSS_PP:g} pp of {BASELINE}", **high},
    }


def markdown(rows: Sequence[Mapping[str, Any]], epsilons: Sequence[float]) -> str:
    """Accuracy mean ± std per method and ε, the chosen settings, uplink and reduction."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = (["method"] + [f"ε={e:g}" for e in epsilons] + ["no DP", "C / server lr per ε", "uplink (wire, per run)",
                                                          "vs dense"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        own = {r["epsilon"]: r for r in rows if r["method"] == method}
        cells = [method]
        for e in epsilons:
            r = own.get(e)
            cells.append(f"{r['accuracy']['mean']:.1f} ± {r['accuracy']['std']:.1f}" if r else "—")
        ref = own.get(None)
        cells.append(f"{ref['accuracy']['mean']:.1f} ± {ref['accuracy']['std']:.1f}" if ref else "—")
        cells.append(" / ".join(f"{own[e]['clip_norm']:g}, {own[e]['server_lr']:g}" for e in epsilons if e in own) or "—")
        any_row = next(iter(own.values()))
        cells.append(f"{any_row['uplink_wire_bytes'] / 1e6:.1f} MB")
        red = any_row["uplink_reduction_vs_dp_fedavg"]
        cells.append(f"{red:.1f}×" if red else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_markdown(scores: Sequence[Mapping[str, Any]]) -> str:
    """The tuning grid: one row per method and ε, one column per (clip, server lr)."""
    points = sorted({(r["clip_norm"], r["server_lr"]) for r in scores})
    head = ["method", "ε"] + [f"C={c:g}, lr={lr:g}" for c, lr in points]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in dict.fromkeys(r["method"] for r in scores):
        for eps in sorted({r["epsilon"] for r in scores if r["method"] == method}):
            cell = {(r["clip_norm"], r["server_lr"]): r["score"] for r in scores
                    if r["method"] == method and r["epsilon"] == eps}
            best = max((v for v in cell.values() if v is not None), default=None)
            vals = [("**%.1f**" if cell.get(p) == best else "%.1f") % cell[p] if cell.get(p) is not None else "—"
                    for p in points]
            lines.append("| " + " | ".join([method, f"{eps:g}"] + vals) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], epsilons: Sequence[float], title: str, path: Path) -> None:
    """Accuracy mean ± std vs ε per DP method; non-DP references as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.get_cmap("tab10")
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        own = sorted((r for r in rows if r["method"] == method and r["epsilon"] is not None), key=lambda r: r["epsilon"])
        ref = next((r for r in rows if r["method"] == method and r["epsilon"] is None), None)
        if own:
            ax.errorbar([r["epsilon"] for r in own], [r["accuracy"]["mean"] for r in own],
                        yerr=[r["accuracy"]["std"] for r in own], marker="o", capsize=3, color=colors(i % 10),
                        lw=2.2 if method == BASELINE else 1.5, label=method)
        if ref is not None:
            ax.axhline(ref["accuracy"]["mean"], color=colors(i % 10), ls=":", lw=1.2, label=f"{method} (no DP)")
    finish_epsilon_plot(fig, ax, epsilons, title, path)


# --- commands --------------------------------------------------------------------------------------
def _run(expanded: Mapping[str, Any], index: Mapping[str, Any], run_dir: Path, overrides: list[str],
         rounds: int | None) -> float:
    """Write the expanded config and its index into ``run_dir`` and train it; wall seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "expanded_config.yaml"
    path.write_text(yaml.safe_dump(dict(expanded), sort_keys=False))
    (run_dir / "index.json").write_text(json.dumps(index, indent=2))
    return run_experiment(path, run_dir, rounds, overrides)


def _header(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Date, command and machine for a results document."""
    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["benchmarks/privacy_tuning.py", *(argv if argv is not None else sys.argv[1:])]),
            "config": str(args.config), "machine": machine_info()}


def _save(doc: dict[str, Any], out: Path, table: str, summary: Any, also: Path | None = None) -> None:
    """Write a results document and print its table, its summary and where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(doc, out)
    print(table)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}" + (f", {also}" if also else ""))


def load_results(run_dir: Path) -> dict[str, Any]:
    """``run_dir``'s results.json; for a run that was stopped early, its finished strategies from the checkpoint."""
    path = run_dir / "results.json"
    if path.exists():
        return json.loads(path.read_text())
    from fedpower.checkpoint import load_run_checkpoint

    point = load_run_checkpoint(run_dir)
    if point is None:
        raise SystemExit(f"{run_dir}: neither results.json nor a checkpoint")
    finished = [s["name"] for s in point.experiment["strategies"][:point.strategy_index]]
    print(f"{run_dir}: stopped run, {len(finished)} finished strategies read from its checkpoint")
    return {"config": point.experiment, "strategies": [point.results[name].to_dict() for name in finished],
            "partial": True}


def tune(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Train the grid on one seed and choose a setting per method (or re-analyse one or more grid runs)."""
    run_dirs = args.from_run or [args.out]
    wall = None
    if args.from_run is None:
        raw = yaml.safe_load(args.config.read_text())
        points = [tuple(float(x) for x in p.split(":")) for p in args.points] if args.points else None
        expanded, index = expand_grid(raw, args.methods, args.epsilons, args.clips, args.server_lrs, points)
        wall = _run(expanded, index, run_dirs[0], [f"seed={args.seed}", *args.overrides], args.rounds)
    scores, runs = [], []
    for run_dir in run_dirs:
        results = load_results(run_dir)
        scores += per_strategy(results, json.loads((run_dir / "index.json").read_text()))
        runs.append({"run_dir": str(run_dir), "strategies": len(results["strategies"]),
                     "stopped_early": bool(results.get("partial"))})
    chosen = choose(scores)
    table = grid_markdown(scores)
    cfg = results["config"]
    doc = {"benchmark": "privacy_tuning", **_header(args, argv), "runs": runs, "run_wall_seconds": wall,
           "seed": cfg["seed"], "rounds": cfg["train"]["rounds"], "score": f"test accuracy %, mean of last {LAST_N} rounds",
           "grid": {"clip_norm": sorted({r["clip_norm"] for r in scores}),
                    "server_lr": sorted({r["server_lr"] for r in scores}),
                    "epsilon": sorted({r["epsilon"] for r in scores}), "server_optimizer": "sgd"},
           "environment": results.get("environment"), "setup": {"data": cfg["data"], "model": cfg["model"],
                                                                 "train": cfg["train"]},
           "rows": scores, "chosen": chosen, "markdown": {"grid": table}}
    _save(doc, args.results_dir / "privacy_tuning.json", table, chosen)
    return 0


def final(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Train every method at every ε with its chosen setting, once per seed, and aggregate."""
    tuning = json.loads(args.tuning.read_text())
    settings = {m: s for m, s in tuning["chosen"].items() if m in args.methods}
    bases = args.from_run or [args.out]
    walls: dict[int, float | None] = {}
    per_seed: dict[int, list[dict[str, Any]]] = {}
    configs: dict[str, Any] = {}  # strategy name → the config of the run it is in
    first_config: dict[int, Any] = {}  # seed → the config of its first run folder (bases[0] when it has results)
    for seed in args.seeds:
        run_dir = bases[0] / f"seed{seed}"
        if args.from_run is None and not (args.resume and (run_dir / "results.json").exists()):
            raw = yaml.safe_load(args.config.read_text())
            only = {m: [float(e) for e in spec.split(",")]
                    for m, spec in (item.split("=", 1) for item in args.epsilons_for)}
            expanded, index = expand_final(raw, settings, args.epsilons, args.references, only)
            walls[seed] = _run(expanded, index, run_dir, [f"seed={seed}", *args.overrides], args.rounds)
        # Several final runs (e.g. one method's extra ε values run later) merge per seed.
        for base in bases:
            seed_dir = base / f"seed{seed}"
            if not (seed_dir / "results.json").exists():
                print(f"seed {seed}: no results in {seed_dir}, skipped")
                continue
            index = json.loads((seed_dir / "index.json").read_text())
            results = json.loads((seed_dir / "results.json").read_text())
            per_seed.setdefault(seed, []).extend(per_strategy(results, index))
            configs.update({s["name"]: results["config"] for s in results["strategies"]})
            first_config.setdefault(seed, results["config"])
    rows = aggregate(per_seed)
    epsilons = sorted({r["epsilon"] for r in rows if r["epsilon"] is not None})
    cfg = first_config[min(per_seed)]
    names: dict[str, str] = {}
    for seed_rows in per_seed.values():
        for r in seed_rows:
            names.setdefault(r["method"], r["strategy"])
    noised = {m: noised_numbers(configs[name], name) for m, name in names.items()}
    for r in rows:
        r["noised_numbers"] = noised.get(r["method"])
    verdict = targets(rows)
    table = markdown(rows, epsilons)
    title = (f"{cfg['data']['dataset']}, {cfg['model']['name']}, {cfg['data']['num_clients']} clients, "
             f"q={cfg['train']['clients_per_round'] / cfg['data']['num_clients']:g}, {cfg['train']['rounds']} rounds, "
             f"seeds {','.join(str(s) for s in sorted(per_seed))}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    png = args.results_dir / "privacy_utility_tuned.png"
    plot(rows, epsilons, title, png)
    doc = {"benchmark": "privacy_utility_tuned", **_header(args, argv), "run_dirs": [str(b) for b in bases],
           "run_wall_seconds": walls, "tuning": str(args.tuning), "chosen": settings,
           "setup": {"data": cfg["data"], "model": cfg["model"], "train": cfg["train"]},
           "epsilons": epsilons, "rows": rows, "per_seed": {str(k): v for k, v in per_seed.items()},
           "targets": verdict, "markdown": {"table": table}}
    _save(doc, args.results_dir / "privacy_utility_tuned.json", table, verdict, also=png)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``tune`` or ``final``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    for step in ("tune", "final"):
        p = sub.add_parser(step)
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
        p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="DP strategies of the config")
        p.add_argument("--rounds", type=int, default=None, help="override train.rounds (default: the config's)")
        p.add_argument("--out", type=Path, default=Path("/tmp") / f"privacy_{step}", help="run folder(s)")
        p.add_argument("--from-run", type=Path, nargs="+", default=None,
                       help="skip training: analyse existing run folder(s); final: folders holding seed<N>/")
        p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    t = sub.choices["tune"]
    t.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 8.0])
    t.add_argument("--clips", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    t.add_argument("--server-lrs", type=float, nargs="+", default=[1.0, 2.0])
    t.add_argument("--points", nargs="+", default=None, metavar="CLIP:LR",
                   help="explicit (clip, server lr) pairs instead of --clips × --server-lrs (a pruned grid)")
    t.add_argument("--seed", type=int, default=0)
    f = sub.choices["final"]
    f.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    f.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    f.add_argument("--epsilons-for", nargs="*", default=[], metavar="METHOD=E1,E2",
                   help="run METHOD at these ε only (default: every --epsilons value)")
    f.add_argument("--references", nargs="*", default=DEFAULT_REFERENCES, help="non-DP strategies of the config")
    f.add_argument("--tuning", type=Path, default=RESULTS_DIR / "privacy_tuning.json")
    f.add_argument("--resume", action="store_true", help="skip seeds whose run folder already has results.json")
    args = parser.parse_args(argv)
    if any(e <= 0 for e in args.epsilons):
        parser.error("--epsilons must be positive")
    args.epsilons = sorted(set(args.epsilons))
    return tune(args, argv) if args.step == "tune" else final(args, argv)


if __name__ == "__main__":
    sys.exit(main())
