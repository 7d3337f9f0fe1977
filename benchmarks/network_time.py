"""Time to accuracy on slow links: a finished run's real wire bytes replayed over simulated network profiles.

Pure accounting (fedpower/network.py): reads results.json and ledger.csv of a run.py output folder
and, for each profile, computes every strategy's communication time per round and the time until it
first reaches the target accuracy (default: the best accuracy every strategy reached). Nothing is
re-trained, so any profile can be tried on one run.

    .venv/bin/python benchmarks/network_time.py --from-run results/bytes_to_accuracy
    .venv/bin/python benchmarks/network_time.py --from-run DIR --profile 3g --profile "mix:4g=0.7,nb-iot=0.3"
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, save_figure, write_json  # noqa: E402
from fedpower.ledger import Ledger, Transfer  # noqa: E402
from fedpower.network import PROFILES, network_summary  # noqa: E402
from fedpower.report import human_bytes, human_seconds  # noqa: E402

# An asymmetric link where the uplink is the bottleneck (e.g. a congested cell edge or a satellite return link).
UPLINK_BOUND = {"uplink_mbps": 0.1, "downlink_mbps": 10.0, "latency_ms": 50.0}
DEFAULT_PROFILES = ["3g", "nb-iot", "uplink-bound", "mix:4g=0.7,nb-iot=0.3"]


def parse_profile(text: str) -> dict[str, Any]:
    """'3g' → {profile: 3g}; 'mix:4g=0.7,nb-iot=0.3' → {mix: {...}}; 'uplink-bound' is defined here."""
    custom = {"uplink-bound": UPLINK_BOUND}
    if text.startswith("mix:"):
        mix = {k: float(v) for k, v in (part.split("=") for part in text[4:].split(","))}
        return {"mix": mix, "profiles": custom}
    if text not in PROFILES and text not in custom:
        raise SystemExit(f"unknown profile {text!r}; known: {', '.join([*PROFILES, *custom])} or mix:a=0.5,b=0.5")
    return {"profile": text, "profiles": custom}


def load_run(folder: Path) -> tuple[dict[str, Any], dict[str, tuple[Ledger, list[dict[str, Any]]]]]:
    """(results.json document, strategy → (ledger, rounds)) of a run.py output folder."""
    results = json.loads((folder / "results.json").read_text())
    ledgers: dict[str, Ledger] = {s["name"]: Ledger() for s in results["strategies"]}
    with (folder / "ledger.csv").open() as fh:
        for row in csv.DictReader(fh):
            ledgers[row.pop("strategy")].record(Transfer(round=int(row["round"]), client=int(row["client"]),
                                                         direction=row["direction"],  # type: ignore[arg-type]
                                                         payload_bytes=int(row["payload_bytes"]),
                                                         wire_bytes=int(row["wire_bytes"]),
                                                         dense_bytes=int(row["dense_bytes"]),
                                                         # absent in ledger.csv files written before them
                                                         purpose=row.get("purpose") or "train",  # type: ignore[arg-type]
                                                         header_bytes=int(row.get("header_bytes") or 0)))
    return results, {s["name"]: (ledgers[s["name"]], s["rounds"]) for s in results["strategies"]}


def markdown(profile: str, summary: dict[str, Any], runs: dict[str, Any], baseline: str) -> str:
    """One profile's table: per strategy, final accuracy, link time per round, total, and to the target."""
    target = summary["target_accuracy"]
    base = summary["strategies"][baseline]["to_target"]["seconds"]
    lines = [f"**{profile}** (target {100 * target:.1f} %)" if target is not None else f"**{profile}**", "",
             "| strategy | final acc % | link time / round (mean) | total link time | round reached | time to target "
             "| uplink to target | faster than " + baseline + " |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["strategies"].items():
        rounds = runs[name][1]
        per_round = entry["total_seconds"] / max(1, len(entry["round_seconds"]))
        reached = entry["to_target"]
        speedup = (f"{base / reached['seconds']:.2f}×" if base and reached["seconds"] else "–")
        lines.append(f"| {name} | {100 * rounds[-1]['accuracy']:.1f} | {human_seconds(per_round)} | "
                     f"{human_seconds(entry['total_seconds'])} | {reached['round'] or 'not reached'} | "
                     f"{human_seconds(reached['seconds'])} | {human_bytes(reached['uplink_bytes'])} | {speedup} |")
    return "\n".join(lines)


def plot(summaries: dict[str, dict[str, Any]], runs: dict[str, Any], path: Path) -> None:
    """Accuracy against cumulative simulated link time, one panel per profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(5 * len(summaries), 4), squeeze=False)
    for ax, (profile, summary) in zip(axes[0], summaries.items()):
        for name, entry in summary["strategies"].items():
            elapsed, xs, ys = 0.0, [], []
            for row in runs[name][1]:
                elapsed += entry["round_seconds"].get(str(row["round"]), 0.0)
                xs.append(elapsed)
                ys.append(100 * row["accuracy"] if row["accuracy"] is not None else float("nan"))
            ax.plot(xs, ys, label=name, linewidth=1)
        if summary["target_accuracy"] is not None:
            ax.axhline(100 * summary["target_accuracy"], color="grey", linestyle=":")
        ax.set_xscale("log")
        ax.set(xlabel="simulated link time (s, log)", ylabel="test accuracy (%)", title=profile)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Replay a run over the profiles; print Markdown tables; save JSON and a plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-run", type=Path, default=ROOT / "results" / "bytes_to_accuracy",
                        help="a run.py output folder (results.json + ledger.csv)")
    parser.add_argument("--profile", action="append", help=f"repeatable; default: {' '.join(DEFAULT_PROFILES)}")
    parser.add_argument("--compute-s", type=float, default=0.0, help="simulated local training seconds per round")
    parser.add_argument("--target", type=float, default=None, help="target accuracy (0-1); default: common best")
    parser.add_argument("--baseline", default="fedavg", help="strategy the speed-ups are relative to")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where JSON and PNG go")
    args = parser.parse_args(argv)
    if not (args.from_run / "results.json").is_file() or not (args.from_run / "ledger.csv").is_file():
        print(f"{args.from_run} has no results.json + ledger.csv; run e.g. benchmarks/bytes_to_accuracy.py first",
              file=sys.stderr)
        return 2
    results, runs = load_run(args.from_run)
    if args.baseline not in runs:
        print(f"no strategy {args.baseline!r} in the run (have: {', '.join(runs)}); use --baseline", file=sys.stderr)
        return 2
    num_clients, seed = int(results["config"]["data"]["num_clients"]), int(results["config"].get("seed", 0))
    summaries: dict[str, dict[str, Any]] = {}
    for text in args.profile or DEFAULT_PROFILES:
        network = {**parse_profile(text), "compute_s": args.compute_s, "target_accuracy": args.target}
        summaries[text] = network_summary(runs, network, num_clients, seed)
        print(markdown(text, summaries[text], runs, args.baseline), end="\n\n")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json({"run": str(args.from_run), "experiment": results["experiment"], "compute_s": args.compute_s,
                "profiles": {name: {**parse_profile(name), "summary": s} for name, s in summaries.items()},
                "machine": machine_info()}, args.out / "network_time.json")
    plot(summaries, runs, args.out / "network_time.png")
    print(f"saved {args.out / 'network_time.json'} and {args.out / 'network_time.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
