#!/usr/bin/env python
"""Privacy/utility benchmark: test accuracy at equal (ε, δ) for dense DP-FedAvg, DP-PowerSGD and DP-top-k.

Expands ``configs/dp_compare.yaml`` so that every DP strategy of it runs once per target ε (σ is
calibrated per strategy by the accountant so the planned rounds end at that ε), runs the expanded
experiment with ``run.py`` — one Flower simulation, identical data, partitions, Poisson cohorts and
seeds for every strategy — and reports per method and ε:

- accuracy: the mean over the last 10 rounds (DP makes single rounds noisy) and the final round;
- the noise multiplier σ the accountant calibrated and the ε actually spent;
- uplink wire bytes and the reduction against dense DP-FedAvg;
- the "noise energy" that reaches the model per round: σ·C/K·√d, d = numbers the server noises
  (all parameters for dense and top-k, the factor space for shared PowerSGD), K = expected cohort.

Strategies without a ``privacy`` block run once, as non-private references. Outputs:
``benchmarks/results/privacy_utility.json`` (rows, verdict, markdown) and ``privacy_utility.png``
(accuracy vs ε). The verdict is issue #11's target: DP-PowerSGD shared ≥ 5 pp above dense DP-FedAvg
at ε = 8. One seed and the config's own clip norm and server lr for every method; for clip norm and
server lr tuned per method, several seeds and issue #18's targets, see ``privacy_tuning.py``.

Usage::

    .venv/bin/python benchmarks/privacy_utility.py                       # full run (ε = 2, 4, 8)
    .venv/bin/python benchmarks/privacy_utility.py --rounds 10 --epsilons 8   # quick look
    .venv/bin/python benchmarks/privacy_utility.py --from-run results/privacy_utility   # re-analyse only
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bytes_to_accuracy import run_experiment  # noqa: E402  (sibling benchmark scripts)
from common import machine_info, save_figure, write_json  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "dp_compare.yaml"
DEFAULT_RUN_DIR = ROOT / "results" / "privacy_utility"  # gitignored: the full run
RESULTS_DIR = ROOT / "benchmarks" / "results"
BASELINE = "dp-fedavg"
TARGET_PREFIX = "dp-powersgd-shared"
TARGET_EPSILON = 8.0
TARGET_GAIN_PP = 5.0
LAST_N = 10


# --- expanding the config --------------------------------------------------------------------------
def eps_tag(epsilon: float) -> str:
    """A strategy-name-safe spelling of ε (8 → 'eps8', 0.5 → 'eps0p5')."""
    text = f"{epsilon:g}".replace(".", "p")
    return f"eps{text}"


def expand_config(raw: Mapping[str, Any], epsilons: list[float]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The config with every DP strategy repeated per ε; and expanded name → {method, epsilon}."""
    expanded = copy.deepcopy(dict(raw))
    strategies: list[dict[str, Any]] = []
    index: dict[str, dict[str, Any]] = {}
    for entry in raw["strategies"]:
        if not entry.get("privacy"):
            strategies.append(copy.deepcopy(entry))
            index[entry["name"]] = {"method": entry["name"], "epsilon": None}
            continue
        for epsilon in epsilons:
            copied = copy.deepcopy(entry)
            copied["name"] = f"{entry['name']}-{eps_tag(epsilon)}"
            copied["privacy"]["target_epsilon"] = float(epsilon)
            copied["privacy"]["noise_multiplier"] = None  # calibrate σ to this ε
            strategies.append(copied)
            index[copied["name"]] = {"method": entry["name"], "epsilon": float(epsilon)}
    expanded["strategies"] = strategies
    expanded["experiment"] = f"{raw.get('experiment', 'experiment')}-privacy-utility"
    return expanded, index


# --- analysis --------------------------------------------------------------------------------------
def _pp(value: float | None) -> float | None:
    """A 0..1 accuracy as a percentage (None when missing or not finite)."""
    return None if value is None or not math.isfinite(value) else 100.0 * value


def noised_numbers(experiment: Mapping[str, Any], name: str) -> int:
    """How many numbers the server adds noise to per round: the size of the codec's linear space.

    Measured by encoding a zero update and reducing it, exactly as the server does; shared PowerSGD
    alternates P (left) and Q (right) rounds, so its two spaces are averaged.
    """
    import torch

    from fedpower.codecs import build_codec, is_shared, layout_of
    from fedpower.codecs.powersgd import basis_layout
    from fedpower.experiment import as_experiment, experiment_data, experiment_model
    from fedpower.training import get_params

    config = as_experiment(experiment)
    settings = config.resolve(name)
    model = experiment_model(settings, experiment_data(config)[0])
    zeros = {k: torch.zeros_like(v) for k, v in get_params(model).items()}
    inputs = layout_of(zeros)
    compression = settings.compression
    sides = ("left", "right") if is_shared(compression) else ("left",)
    sizes = []
    for side in sides:
        basis = None
        if is_shared(compression):
            blayout = basis_layout(inputs, compression.rank, compression.min_compression_rate, side)
            basis = {k: torch.ones(tuple(spec.shape)) for k, spec in blayout.items()}
        codec = build_codec(compression, basis=basis, side=side)  # type: ignore[arg-type]
        state = codec.init_state(inputs, torch.device("cpu"), seed=0)
        encoded, _ = codec.encode(zeros, state, torch.Generator().manual_seed(0))
        sizes.append(sum(int(t.numel()) for t in codec.reduce([encoded], [1.0], inputs).values()))
    return round(sum(sizes) / len(sizes))


def analyse(results: Mapping[str, Any], index: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, ε): accuracy, σ, ε spent, bytes, noise energy."""
    from fedpower.experiment import as_experiment, privacy_plan

    experiment = as_experiment(results["config"])
    by_name = {s["name"]: s for s in results["strategies"]}
    baseline_up: dict[float | None, int] = {}
    for name, s in by_name.items():
        meta = index.get(name, {"method": name, "epsilon": None})
        if meta["method"] == BASELINE:
            baseline_up[meta["epsilon"]] = s["final"]["uplink_bytes_total"]
    rows = []
    for name, s in by_name.items():
        meta = index.get(name, {"method": name, "epsilon": None})
        evaluated = [r["accuracy"] for r in s["rounds"] if r.get("accuracy") is not None and math.isfinite(r["accuracy"])]
        last = evaluated[-LAST_N:]
        plan = privacy_plan(experiment.resolve(name))
        dims = noised_numbers(experiment, name)
        up = s["final"]["uplink_bytes_total"]
        base = baseline_up.get(meta["epsilon"])
        row = {
            "strategy": name, "method": meta["method"], "target_epsilon": meta["epsilon"],
            f"mean_last{LAST_N}_accuracy": _pp(sum(last) / len(last)) if last else None,
            "final_accuracy": _pp(s["final"]["accuracy"]),
            "epsilon_spent": s["final"].get("epsilon"),
            "noise_multiplier": plan.noise_multiplier if plan else None,
            "clip_norm": plan.clip_norm if plan else None,
            "expected_cohort": plan.expected_cohort if plan else None,
            "noised_numbers": dims,
            "noise_norm_per_round": (plan.noise_multiplier * plan.clip_norm / plan.expected_cohort * math.sqrt(dims)
                                     if plan else 0.0),
            "uplink_wire_bytes": up,
            "uplink_reduction_vs_dp_fedavg": base / up if base and up else None,
            "rounds_completed": s["final"]["rounds_completed"],
            "stop_reason": s["final"].get("stop_reason"),
            "wall_seconds": s["final"]["wall_seconds"],
        }
        rows.append(row)
    return rows


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's target: best shared DP-PowerSGD ≥ 5 pp above DP-FedAvg at ε = 8 (mean of last rounds)."""
    key = f"mean_last{LAST_N}_accuracy"
    at = [r for r in rows if r["target_epsilon"] == TARGET_EPSILON]
    base = next((r for r in at if r["method"] == BASELINE), None)
    shared = [r for r in at if r["method"].startswith(TARGET_PREFIX) and r[key] is not None]
    criterion = f"{TARGET_PREFIX}* ≥ {BASELINE} + {TARGET_GAIN_PP:g} pp at ε = {TARGET_EPSILON:g} (mean of last {LAST_N} rounds)"
    if base is None or base[key] is None or not shared:
        return {"criterion": criterion, "met": None, "reason": "the run lacks the baseline or shared strategies at ε=8"}
    best = max(shared, key=lambda r: r[key])
    gain = best[key] - base[key]
    return {"criterion": criterion, "met": gain >= TARGET_GAIN_PP, "best": best["strategy"], "gain_pp": gain,
            "baseline_accuracy": base[key], "best_accuracy": best[key]}


def markdown_table(rows: list[dict[str, Any]], epsilons: list[float]) -> str:
    """Accuracy (mean of the last rounds) per method and ε, then σ and the uplink reduction at each ε."""
    key = f"mean_last{LAST_N}_accuracy"
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = ["method"] + [f"ε={e:g}" for e in epsilons] + ["no DP", "σ at ε=" + "/".join(f"{e:g}" for e in epsilons),
                                                          "noised numbers", "uplink reduction"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [method]
        own = [r for r in rows if r["method"] == method]
        for e in epsilons:
            r = next((x for x in own if x["target_epsilon"] == e), None)
            cells.append(f"{r[key]:.1f} %" if r and r[key] is not None else "—")
        ref = next((x for x in own if x["target_epsilon"] is None), None)
        cells.append(f"{ref[key]:.1f} %" if ref and ref[key] is not None else "—")
        sigmas = [next((x["noise_multiplier"] for x in own if x["target_epsilon"] == e), None) for e in epsilons]
        cells.append("/".join(f"{s:.2f}" for s in sigmas if s is not None) or "—")
        cells.append(f"{own[0]['noised_numbers']:,}")
        reductions = [x["uplink_reduction_vs_dp_fedavg"] for x in own if x["uplink_reduction_vs_dp_fedavg"]]
        cells.append(f"{sum(reductions) / len(reductions):.1f}×" if reductions else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], epsilons: list[float], title: str, path: Path) -> None:
    """Accuracy (mean of the last rounds) vs ε per method; non-DP references as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"mean_last{LAST_N}_accuracy"
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.get_cmap("tab10")
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        own = sorted((r for r in rows if r["method"] == method and r["target_epsilon"] is not None),
                     key=lambda r: r["target_epsilon"])
        ref = next((r for r in rows if r["method"] == method and r["target_epsilon"] is None), None)
        if own:
            ax.plot([r["target_epsilon"] for r in own], [r[key] for r in own], marker="o", color=colors(i % 10),
                    lw=2.2 if method == BASELINE else 1.5, label=method)
        if ref is not None and ref[key] is not None:
            ax.axhline(ref[key], color=colors(i % 10), ls=":", lw=1.2, label=f"{method} (no DP)")
    finish_epsilon_plot(fig, ax, epsilons, title, path)


def finish_epsilon_plot(fig: Any, ax: Any, epsilons: Sequence[float], title: str, path: Path) -> None:
    """Log-ε axis with one tick per ε, labels, legend; saved to ``path`` (accuracy against ε plots)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(epsilons), [f"{e:g}" for e in epsilons])
    ax.set(xlabel="ε (δ = 1e-5, user-level, add-or-remove one client)",
           ylabel=f"test accuracy, mean of last {LAST_N} rounds (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Run (or re-read) the privacy/utility comparison and write the table, verdict and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="experiment YAML (default: %(default)s)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="target ε values")
    parser.add_argument("--rounds", type=int, default=None, help="override train.rounds (default: the config's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RUN_DIR, help="run folder (default: %(default)s)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where privacy_utility.* go")
    parser.add_argument("--from-run", type=Path, default=None, help="skip training: analyse an existing run folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="extra run.py overrides (repeatable)")
    args = parser.parse_args(argv)
    epsilons = sorted(set(args.epsilons))
    if any(e <= 0 for e in epsilons):
        parser.error("--epsilons must be positive")

    run_dir = args.from_run or args.out
    index_file = run_dir / "privacy_utility_index.json"
    wall = None
    if args.from_run is None:
        raw = yaml.safe_load(args.config.read_text())
        expanded, index = expand_config(raw, epsilons)
        run_dir.mkdir(parents=True, exist_ok=True)
        expanded_path = run_dir / "expanded_config.yaml"
        expanded_path.write_text(yaml.safe_dump(expanded, sort_keys=False))
        index_file.write_text(json.dumps(index, indent=2))
        wall = run_experiment(expanded_path, run_dir, args.rounds, args.overrides)
    else:
        index = json.loads(index_file.read_text())
        epsilons = sorted({m["epsilon"] for m in index.values() if m["epsilon"] is not None})
    results = json.loads((run_dir / "results.json").read_text())
    rows = analyse(results, index)
    target = verdict(rows)
    table = markdown_table(rows, epsilons)
    cfg = results["config"]
    title = (f"{cfg['data']['dataset']}, {cfg['model']['name']}, {cfg['data']['num_clients']} clients, "
             f"q={cfg['train']['clients_per_round'] / cfg['data']['num_clients']:g}, {cfg['train']['rounds']} rounds")

    args.results_dir.mkdir(parents=True, exist_ok=True)
    png = args.results_dir / "privacy_utility.png"
    plot(rows, epsilons, title, png)
    doc = {
        "benchmark": "privacy_utility",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "config": str(args.config), "run_dir": str(run_dir), "run_wall_seconds": wall,
        "machine": machine_info(), "environment": results.get("environment"),
        "setup": {"data": cfg["data"], "model": cfg["model"], "train": cfg["train"]},
        "epsilons": epsilons, "rows": rows, "target": target, "markdown": {"table": table},
    }
    out_json = args.results_dir / "privacy_utility.json"
    write_json(doc, out_json)

    print(table)
    print()
    if target["met"] is None:
        print(f"target ({target['criterion']}): not evaluated — {target['reason']}")
    else:
        print(f"target ({target['criterion']}): {'MET' if target['met'] else 'NOT met'} — best {target['best']} "
              f"{target['best_accuracy']:.1f} % vs {target['baseline_accuracy']:.1f} % ({target['gain_pp']:+.1f} pp)")
    print(f"wrote {out_json}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
