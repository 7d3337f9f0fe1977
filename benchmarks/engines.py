#!/usr/bin/env python
"""Engines side by side: ``run.py`` end to end on the in-process engine and on Flower's Ray engine.

Runs the same config (default: the quickstart, what ``make run`` runs, plots included) as a user would — a fresh
``python run.py CONFIG --set simulation.engine=...`` process per run — alternating the engines so both
see the same machine load, and checks that both produce the same results (final accuracy and uplink
bytes per strategy). Wall time includes interpreter start, imports, data generation, all rounds and
the report; the ratio of the two is the claim.

Outputs ``benchmarks/results/engines.json`` and a markdown table on stdout.

Usage::

    .venv/bin/python benchmarks/engines.py                         # quickstart, 2 runs per engine
    .venv/bin/python benchmarks/engines.py --repeats 1 --set train.rounds=5
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402  (sibling module)

ENGINES = ("inprocess", "ray")


def load_average() -> float:
    """1-minute load average (what else the machine was doing)."""
    return os.getloadavg()[0]


def run_once(config: Path, engine: str, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """One ``run.py`` process on ``engine``: wall seconds and the per-strategy finals it wrote."""
    cmd = [sys.executable, str(ROOT / "run.py"), str(config), "--out", str(out_dir),  # plots included, as make run
           "--set", f"simulation.engine={engine}", *[a for o in overrides for a in ("--set", o)]]
    env = dict(os.environ, FLWR_HOME=str(out_dir / "flwr-home"))
    load_before = load_average()
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{engine} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads((out_dir / "results.json").read_text())
    finals = {s["name"]: {"accuracy": s["final"]["accuracy"], "uplink_bytes_total": s["final"]["uplink_bytes_total"],
                          "strategy_wall_seconds": s["final"]["wall_seconds"]} for s in results["strategies"]}
    return {"engine": engine, "wall_seconds": wall, "load_before": load_before, "load_after": load_average(),
            "finals": finals}


def markdown(doc: dict[str, Any]) -> str:
    """The comparison as a markdown table."""
    lines = ["| engine | wall s (runs) | median wall s | Σ strategy s (median) | load avg during |", "|---|---|---|---|---|"]
    for engine in ENGINES:
        runs = [r for r in doc["runs"] if r["engine"] == engine]
        walls = [r["wall_seconds"] for r in runs]
        strategy = [sum(f["strategy_wall_seconds"] for f in r["finals"].values()) for r in runs]
        loads = [f"{r['load_before']:.1f}–{r['load_after']:.1f}" for r in runs]
        lines.append(f"| {engine} | {', '.join(f'{w:.1f}' for w in walls)} | {statistics.median(walls):.1f} | "
                     f"{statistics.median(strategy):.1f} | {', '.join(loads)} |")
    lines.append("")
    lines.append(f"in-process / Ray (median wall): **{doc['ratio_inprocess_over_ray']:.2f}**; identical finals on both "
                 f"engines: **{doc['identical_results']}**")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Alternate the engines, check they agree, save and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine (alternating)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value, as run.py")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engines.json")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedpower-engines-") as tmp:
        for repeat in range(args.repeats):
            for engine in (ENGINES if repeat % 2 == 0 else ENGINES[::-1]):
                run = run_once(args.config, engine, args.overrides, Path(tmp) / f"{engine}-{repeat}")
                print(f"{engine} run {repeat + 1}: {run['wall_seconds']:.1f} s (load {run['load_before']:.1f})",
                      flush=True)
                runs.append(run)
    median = {e: statistics.median(r["wall_seconds"] for r in runs if r["engine"] == e) for e in ENGINES}
    reference = {name: (f["accuracy"], f["uplink_bytes_total"]) for name, f in runs[0]["finals"].items()}
    identical = all({n: (f["accuracy"], f["uplink_bytes_total"]) for n, f in r["finals"].items()} == reference
                    for r in runs)
    doc = {"benchmark": "engines", "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": " ".join(["benchmarks/engines.py", *(argv if argv is not None else sys.argv[1:])]),
           "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
           "overrides": args.overrides, "machine": machine_info(("torch", "flwr", "ray")), "runs": runs,
           "median_wall_seconds": median, "ratio_inprocess_over_ray": median["inprocess"] / median["ray"],
           "identical_results": identical}
    doc["markdown"] = markdown(doc)
    write_json(doc, args.out)
    print(doc["markdown"])
    print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
