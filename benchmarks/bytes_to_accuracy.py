#!/usr/bin/env python
"""Bytes-to-accuracy benchmark: every compression strategy on mnist1d, accuracy vs cumulative uplink bytes.

Runs ``run.py configs/mnist1d_compare.yaml`` (one Flower simulation, all strategies on identical data,
partitions, sampling and seeds: the MNIST-1D 1-D CNN, 100 Dirichlet(0.5) clients, 10 per round) as a
subprocess, then reads its ``results.json`` and reports per strategy:

- final / best accuracy, and the mean over the last 10 rounds (per-round accuracy is noisy);
- total uplink bytes as Flower serializes them ("wire", protocol framing included) and as array
  payload, and the reduction of each against FedAvg (dense fp32);
- accuracy difference to FedAvg (percentage points);
- cumulative uplink bytes (and round) at which the strategy first reaches ``--target-fraction``
  (default 90 %) of FedAvg's final accuracy.

It also computes, from the codec layouts alone (no training), which tensors of the model each
low-rank strategy compresses, what it sends dense, the raw content bytes per message (no framing)
and thus the best uplink reduction the codec could reach, and the measured framing overhead per
message. Outputs: ``benchmarks/results/bytes_to_accuracy.json`` (table, analysis, markdown),
``benchmarks/results/bytes_to_accuracy.png`` (accuracy vs cumulative uplink bytes, log x; and vs
round) and ``benchmarks/results/bytes_to_accuracy_metrics.csv`` (the run's per-round metrics).

Usage::

    .venv/bin/python benchmarks/bytes_to_accuracy.py                  # full run (≈ 12 min on 2 CPU cores)
    .venv/bin/python benchmarks/bytes_to_accuracy.py --rounds 20      # quick look
    .venv/bin/python benchmarks/bytes_to_accuracy.py --from-run results/bytes_to_accuracy   # re-analyse only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, save_figure, write_json  # noqa: E402  (sibling module)

DEFAULT_CONFIG = ROOT / "configs" / "mnist1d_compare.yaml"
DEFAULT_RUN_DIR = ROOT / "results" / "bytes_to_accuracy"  # gitignored: the full run (ledger.csv, logs, plots)
RESULTS_DIR = ROOT / "benchmarks" / "results"
BASELINE = "fedavg"
TARGET_STRATEGY_PREFIX = "powersgd-shared"  # the issue's target: shared PowerSGD, rank ≤ 2, int8 factors
TARGET_MAX_RANK = 2
TARGET_MAX_DROP_PP = 1.0
TARGET_MIN_REDUCTION = 100.0
LAST_N = 10
NPY_HEADER = 128  # bytes of .npy header Flower's Array adds to every array (counted in payload_bytes)


# --- running ---------------------------------------------------------------------------------------
def run_experiment(config: Path, out: Path, rounds: int | None, overrides: list[str]) -> float:
    """Run ``run.py`` on ``config`` into ``out``; returns wall seconds. Raises on a failed run."""
    cmd = [sys.executable, str(ROOT / "run.py"), str(config), "--out", str(out), "--no-plots"]
    if rounds is not None:
        cmd += ["--set", f"train.rounds={rounds}"]
    for override in overrides:
        cmd += ["--set", override]
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"run.py failed with exit code {proc.returncode} (see {out / 'run.log'})")
    return seconds


# --- analysis of a results.json --------------------------------------------------------------------
def _cumulative(rounds: list[dict[str, Any]], key: str) -> list[int]:
    """Running sum of ``key`` over the rounds."""
    total, out = 0, []
    for r in rounds:
        total += int(r.get(key) or 0)
        out.append(total)
    return out


def _messages(rounds: list[dict[str, Any]]) -> int:
    """Uplink messages received (accepted + rejected replies)."""
    return sum(int(r.get("accepted") or 0) + int(r.get("rejected") or 0) for r in rounds)


def _pp(value: float | None) -> float | None:
    """A 0..1 accuracy as a percentage."""
    return None if value is None or not math.isfinite(value) else 100.0 * value


def strategy_rows(results: Mapping[str, Any], target_fraction: float) -> tuple[list[dict[str, Any]], float]:
    """One row per strategy (the benchmark table) and the accuracy threshold used for bytes-to-accuracy."""
    strategies = {s["name"]: s for s in results["strategies"]}
    if BASELINE not in strategies:
        raise SystemExit(f"results have no '{BASELINE}' strategy; found {', '.join(strategies)}")
    base = strategies[BASELINE]
    base_final = base["final"]["accuracy"]
    threshold = target_fraction * base_final
    base_up = base["final"]["uplink_bytes_total"]
    base_payload = base["final"]["uplink_payload_bytes_total"]
    base_to_target = None
    rows: list[dict[str, Any]] = []
    for name, s in strategies.items():
        rounds = [r for r in s["rounds"] if r.get("accuracy") is not None]
        final = s["final"]
        cum_up = _cumulative(s["rounds"], "uplink_bytes")
        by_round = {r["round"]: c for r, c in zip(s["rounds"], cum_up)}
        reach = next((r for r in rounds if r["accuracy"] >= threshold), None)
        last = [r["accuracy"] for r in rounds[-LAST_N:]]
        messages = _messages(s["rounds"])
        row = {
            "strategy": name,
            "final_accuracy": _pp(final["accuracy"]),
            "best_accuracy": _pp(final["best_accuracy"]),
            f"mean_last{LAST_N}_accuracy": _pp(sum(last) / len(last)) if last else None,
            "delta_final_vs_fedavg_pp": _pp(final["accuracy"] - base_final),
            f"delta_mean_last{LAST_N}_vs_fedavg_pp": None,  # filled below
            "uplink_wire_bytes": final["uplink_bytes_total"],
            "uplink_payload_bytes": final["uplink_payload_bytes_total"],
            "uplink_messages": messages,
            "wire_bytes_per_message": final["uplink_bytes_total"] / messages if messages else None,
            "payload_bytes_per_message": final["uplink_payload_bytes_total"] / messages if messages else None,
            "reduction_vs_fedavg_wire": base_up / final["uplink_bytes_total"] if final["uplink_bytes_total"] else None,
            "reduction_vs_fedavg_payload": (base_payload / final["uplink_payload_bytes_total"]
                                            if final["uplink_payload_bytes_total"] else None),
            "uplink_ratio_vs_dense": final.get("uplink_ratio_vs_dense"),
            "rounds_to_target": reach["round"] if reach else None,
            "bytes_to_target": by_round[reach["round"]] if reach else None,
            "reduction_to_target_vs_fedavg": None,  # filled below
            "rounds_completed": final["rounds_completed"],
            "wall_seconds": final["wall_seconds"],
            "rejected_payloads": final["rejected_payloads"],
            "client_failures": final["client_failures"],
        }
        rows.append(row)
        if name == BASELINE:
            base_to_target = row["bytes_to_target"]
    base_last = next(r for r in rows if r["strategy"] == BASELINE)[f"mean_last{LAST_N}_accuracy"]
    for row in rows:
        if row[f"mean_last{LAST_N}_accuracy"] is not None and base_last is not None:
            row[f"delta_mean_last{LAST_N}_vs_fedavg_pp"] = row[f"mean_last{LAST_N}_accuracy"] - base_last
        if row["bytes_to_target"] and base_to_target:
            row["reduction_to_target_vs_fedavg"] = base_to_target / row["bytes_to_target"]
    return rows, threshold


# --- codec structure: what is low rank, what is dense, best possible ratio --------------------------
def codec_analysis(config: Mapping[str, Any]) -> dict[str, Any]:
    """Per strategy: raw uplink content bytes per message from the codec layout, and what limits it."""
    import torch

    from fedpower.codecs import build_codec, is_shared, layout_nbytes, layout_of
    from fedpower.codecs.lowrank import compressible
    from fedpower.codecs.packing import packed_layout
    from fedpower.data.datasets import load_dataset
    from fedpower.models.reference import build_model

    torch.manual_seed(0)
    data = config["data"]
    dataset = load_dataset(data["dataset"], path=data.get("path"), seed=int(config.get("seed", 0)),
                           test_fraction=float(data.get("test_fraction", 0.2)), **(data.get("options") or {}))
    model_cfg = config["model"]
    model = build_model(model_cfg["name"], dataset, **(model_cfg.get("options") or {}))
    params = {name: p.detach().float() for name, p in model.named_parameters()}
    inputs = layout_of(params)
    dense = layout_nbytes(inputs)
    tensors = {name: {"shape": list(spec.shape), "numel": spec.numel} for name, spec in inputs.items()}
    out: dict[str, Any] = {"model": model_cfg["name"], "parameters": sum(s.numel for s in inputs.values()),
                           "dense_fp32_bytes": dense, "tensors": tensors, "strategies": {}}
    for strategy in config["strategies"]:
        comp = dict(strategy.get("compression") or {})
        sides = ("left", "right") if is_shared(comp) else ("left",)
        layouts = [build_codec(comp, basis={}, side=side).layout(inputs) for side in sides]
        raw = [layout_nbytes(layout) for layout in layouts]
        raw_avg = sum(raw) / len(raw)
        buffers = [len(packed_layout(layout)) for layout in layouts]  # one flat array per dtype on the wire
        entry: dict[str, Any] = {"raw_bytes_per_message": raw, "raw_bytes_per_message_mean": raw_avg,
                                 "buffers_per_message": buffers,
                                 "expected_payload_bytes_per_message_mean":
                                     raw_avg + NPY_HEADER * sum(buffers) / len(buffers),
                                 "best_reduction_vs_dense_raw": dense / raw_avg}
        if comp.get("method") == "powersgd":
            rank = int(comp.get("rank", 4))
            dims = compressible(inputs, rank, float(comp.get("min_compression_rate", 2.0)))
            bits = comp.get("quantize_bits")
            bytes_per_value = 4 if bits is None else bits / 8
            low = {name: {"matrix": [n, m], "rank": r, "values_sent": (r * (n + m) if not is_shared(comp)
                                                                      else [n * r, m * r])}
                   for name, (n, m, r) in dims.items()}
            dense_rest = {name: inputs[name].numel for name in inputs if name not in dims}
            rest_values = sum(dense_rest.values())
            # The dense remainder's share of each message (values only, scales excluded).
            rest_bytes = rest_values * bytes_per_value
            entry.update({
                "low_rank_tensors": low,
                "dense_tensors": dense_rest,
                "dense_remainder_values": rest_values,
                "dense_remainder_bytes": rest_bytes,
                "best_reduction_if_remainder_free": dense / (raw_avg - rest_bytes) if raw_avg > rest_bytes else None,
            })
        out["strategies"][strategy["name"]] = entry
    return out


# --- outputs -----------------------------------------------------------------------------------------
def _fmt_bytes(n: float | None) -> str:
    """Bytes in kB / MB (decimal)."""
    if n is None:
        return "–"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{n:.0f} B"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """Formatted number or an en dash."""
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: list[dict[str, Any]], target_fraction: float, threshold: float) -> str:
    """The benchmark table in markdown."""
    head = (f"| strategy | final acc % | best acc % | mean last {LAST_N} % | Δ final vs FedAvg (pp) | "
            f"uplink (wire) | reduction vs FedAvg (wire) | reduction (payload) | "
            f"uplink to {target_fraction:.0%} of FedAvg final ({100 * threshold:.1f} %) | reduction there |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        reach = ("not reached" if r["bytes_to_target"] is None
                 else f"{_fmt_bytes(r['bytes_to_target'])} (round {r['rounds_to_target']})")
        lines.append(
            f"| {r['strategy']} | {_fmt(r['final_accuracy'], '.1f')} | {_fmt(r['best_accuracy'], '.1f')} | "
            f"{_fmt(r[f'mean_last{LAST_N}_accuracy'], '.1f')} | {_fmt(r['delta_final_vs_fedavg_pp'], '+.1f')} | "
            f"{_fmt_bytes(r['uplink_wire_bytes'])} | {_fmt(r['reduction_vs_fedavg_wire'], '.1f', '×')} | "
            f"{_fmt(r['reduction_vs_fedavg_payload'], '.1f', '×')} | {reach} | "
            f"{_fmt(r['reduction_to_target_vs_fedavg'], '.1f', '×')} |"
        )
    return "\n".join(lines)


def markdown_structure(analysis: Mapping[str, Any], rows: list[dict[str, Any]]) -> str:
    """Per strategy: raw bytes per message from the codec layout vs measured bytes per message."""
    by_name = {r["strategy"]: r for r in rows}
    dense = analysis["dense_fp32_bytes"]
    lines = ["| strategy | low-rank tensors | not low rank | raw content B/msg | best reduction (raw) | "
             "measured payload B/msg | measured wire B/msg | framing B/msg |", "|" + "---|" * 8]
    for name, a in analysis["strategies"].items():
        row = by_name.get(name, {})
        low = a.get("low_rank_tensors")
        low_text = ", ".join(f"{k.replace('.weight', '')} {v['matrix'][0]}×{v['matrix'][1]} r{v['rank']}"
                             for k, v in low.items()) if low is not None else "–"
        dense_text = f"{a['dense_remainder_values']} values" if low is not None else "–"
        wire = row.get("wire_bytes_per_message")
        lines.append(
            f"| {name} | {low_text} | {dense_text} | {a['raw_bytes_per_message_mean']:.0f} | "
            f"{dense / a['raw_bytes_per_message_mean']:.1f}× | {_fmt(row.get('payload_bytes_per_message'), '.0f')} | "
            f"{_fmt(wire, '.0f')} | {_fmt(None if wire is None else wire - a['raw_bytes_per_message_mean'], '.0f')} |"
        )
    return "\n".join(lines)


def target_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's target: shared PowerSGD, rank ≤ 2, int8, within 1 pp of FedAvg with ≥ 100× fewer uplink bytes."""
    candidates = []
    for r in rows:
        name = r["strategy"]
        if not name.startswith(TARGET_STRATEGY_PREFIX):
            continue
        rank = next((int(part[1:]) for part in name.split("-") if part.startswith("r") and part[1:].isdigit()), None)
        if rank is None or rank > TARGET_MAX_RANK:
            continue
        accuracy_ok = r["delta_final_vs_fedavg_pp"] is not None and r["delta_final_vs_fedavg_pp"] >= -TARGET_MAX_DROP_PP
        bytes_ok = r["reduction_vs_fedavg_wire"] is not None and r["reduction_vs_fedavg_wire"] >= TARGET_MIN_REDUCTION
        candidates.append({"strategy": name, "delta_final_pp": r["delta_final_vs_fedavg_pp"],
                           "reduction_vs_fedavg_wire": r["reduction_vs_fedavg_wire"],
                           "accuracy_ok": accuracy_ok, "bytes_ok": bytes_ok, "met": accuracy_ok and bytes_ok})
    return {"criterion": f"{TARGET_STRATEGY_PREFIX}, rank ≤ {TARGET_MAX_RANK}, int8: final accuracy within "
                         f"{TARGET_MAX_DROP_PP} pp of FedAvg and ≥ {TARGET_MIN_REDUCTION:.0f}× fewer uplink wire bytes",
            "candidates": candidates, "met": any(c["met"] for c in candidates)}


def plot(results: Mapping[str, Any], threshold: float, path: Path) -> None:
    """Accuracy vs cumulative uplink wire bytes (log x), and accuracy vs round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bytes, ax_round) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.get_cmap("tab10")
    base_final = next(s for s in results["strategies"] if s["name"] == BASELINE)["final"]["accuracy"]
    for i, s in enumerate(results["strategies"]):
        rounds = s["rounds"]
        cum = _cumulative(rounds, "uplink_bytes")
        acc = [100 * (r["accuracy"] if r.get("accuracy") is not None else math.nan) for r in rounds]
        style = {"color": colors(i % 10), "lw": 2.2 if s["name"] == BASELINE else 1.4,
                 "ls": "--" if s["name"].startswith("powersgd-shared") else "-"}
        ax_bytes.plot(cum, acc, label=s["name"], **style)
        ax_round.plot([r["round"] for r in rounds], acc, **style)
    for ax in (ax_bytes, ax_round):
        ax.axhline(100 * base_final, color="grey", lw=0.8, ls=":")
        ax.axhline(100 * threshold, color="grey", lw=0.8, ls="-.")
        ax.grid(alpha=0.3)
    ax_bytes.set_xscale("log")
    ax_bytes.set(xlabel="cumulative uplink bytes (as serialized by Flower, log scale)", ylabel="test accuracy (%)",
                 title="accuracy vs cumulative uplink bytes")
    ax_round.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy vs round")
    ax_bytes.legend(fontsize=8, loc="lower right")
    ax_round.text(0.02, 0.97, "dotted: FedAvg final · dash-dot: target for bytes-to-accuracy",
                  transform=ax_round.transAxes, fontsize=7, va="top", color="grey")
    fig.suptitle(f"{results['experiment']}: {results['config']['model']['name']}, "
                 f"{results['config']['data']['num_clients']} clients, "
                 f"{results['config']['train']['clients_per_round']} per round", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Run (or re-read) the comparison and write the table, the analysis and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="experiment YAML (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None, help="override train.rounds (default: the config's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RUN_DIR,
                        help="run.py output folder, results.json etc. (default: %(default)s)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where bytes_to_accuracy.{json,png} go (default: %(default)s)")
    parser.add_argument("--from-run", type=Path, default=None,
                        help="skip training: analyse an existing run folder's results.json")
    parser.add_argument("--target-fraction", type=float, default=0.9,
                        help="bytes-to-accuracy threshold as a fraction of FedAvg's final accuracy (default 0.9)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="extra run.py overrides (repeatable)")
    args = parser.parse_args(argv)

    run_dir = args.from_run or args.out
    wall = None
    if args.from_run is None:
        wall = run_experiment(args.config, args.out, args.rounds, args.overrides)
    results = json.loads((run_dir / "results.json").read_text())
    rows, threshold = strategy_rows(results, args.target_fraction)
    analysis = codec_analysis(results["config"])
    verdict = target_verdict(rows)
    for row in rows:  # the codec code may have changed since the run: say so rather than mix numbers
        entry = analysis["strategies"].get(row["strategy"])
        if entry is not None and row["payload_bytes_per_message"] is not None:
            mismatch = abs(row["payload_bytes_per_message"] - entry["expected_payload_bytes_per_message_mean"]) > 1
            entry["layout_matches_run"] = not mismatch
            if mismatch:
                print(f"warning: {row['strategy']}: run payload {row['payload_bytes_per_message']:.0f} B/msg, current "
                      f"codec layout gives {entry['expected_payload_bytes_per_message_mean']:.0f} B/msg "
                      "(codec changed since the run?)", file=sys.stderr)
    table = markdown_table(rows, args.target_fraction, threshold)
    structure = markdown_structure(analysis, rows)

    args.results_dir.mkdir(parents=True, exist_ok=True)
    png = args.results_dir / "bytes_to_accuracy.png"
    plot(results, threshold, png)
    if (run_dir / "metrics.csv").is_file():
        shutil.copyfile(run_dir / "metrics.csv", args.results_dir / "bytes_to_accuracy_metrics.csv")
    train = results["config"]["train"]
    doc = {
        "benchmark": "bytes_to_accuracy",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "config": str(args.config),
        "run_dir": str(run_dir),
        "run_wall_seconds": wall,
        "machine": machine_info(),
        "environment": results.get("environment"),
        "setup": {"dataset": results["config"]["data"]["dataset"], "model": results["config"]["model"],
                  "num_clients": results["config"]["data"]["num_clients"],
                  "partition": results["config"]["data"]["partition"], "rounds": train["rounds"],
                  "clients_per_round": train["clients_per_round"], "local_epochs": train["local_epochs"],
                  "batch_size": train["batch_size"], "lr": train["lr"], "server_optimizer": train["server_optimizer"]},
        "target_fraction": args.target_fraction,
        "accuracy_threshold": 100 * threshold,
        "rows": rows,
        "codec_analysis": analysis,
        "target": verdict,
        "markdown": {"table": table, "structure": structure},
    }
    out_json = args.results_dir / "bytes_to_accuracy.json"
    write_json(doc, out_json)

    print(table)
    print()
    print(structure)
    print()
    print(f"target ({verdict['criterion']}): {'MET' if verdict['met'] else 'NOT met'}")
    for c in verdict["candidates"]:
        print(f"  {c['strategy']}: Δ {c['delta_final_pp']:+.1f} pp, {c['reduction_vs_fedavg_wire']:.1f}× fewer uplink bytes")
    print(f"wrote {out_json}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
