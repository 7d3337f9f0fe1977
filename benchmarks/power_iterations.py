"""Independent-mode PowerSGD on real client updates: error vs power iterations, deflation and warm start.

Simulates FedAvg on ``configs/parity_mlp.yaml`` in plain torch (no Flower): each round the server's
fixed-size sampler picks 10 of the 100 partitions, every client trains exactly as
``clients/app.py:handle_train`` does (same seeds, same train settings of the ``fedavg`` strategy), its
update is ``local − global`` and the global model moves by the plain mean of the updates. For the
collected rounds the first ``--clients`` clients of the cohort are measured: each compressed 2-D
tensor's relative error ``‖M − P Qᵀ‖_F / ‖M‖_F`` after ``PowerSGD(rank, power_iterations, deflation)``
encode → decode, against the Eckart–Young optimum (truncated SVD at the same rank).

Start conditions:

- cold: the client's ``init_state`` (seeded Gaussian Q, seed = experiment seed + partition id, as
  ``handle_train`` uses on a client's first participation);
- warm: the Q state the same codec (same rank, iterations, deflation) left after encoding the *same
  client's* update of the *previous round* (trained on the previous round's global model with that
  round's seed), itself started cold. With 10 % sampling a client rarely took part in the round
  before, so this is the best realistic case of warm starting; round 1 has no previous round, so it
  counts in the cold rows only.

The whole-update error counts tensors PowerSGD passes through dense (biases, and the 10×512 output
layer at rank 8) as exact. Encode time is the median of a few single-threaded CPU repeats on one update.

    .venv/bin/python benchmarks/power_iterations.py
    .venv/bin/python benchmarks/power_iterations.py --rounds 2 5 20 --clients 10
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_json  # noqa: E402
from fedpower.codecs import PowerSGD, layout_of  # noqa: E402
from fedpower.codecs.lowrank import MatrixDims  # noqa: E402
from fedpower.config import load_config  # noqa: E402
from fedpower.config import ExperimentConfig  # noqa: E402
from fedpower.experiment import client_seed, experiment_data, experiment_model  # noqa: E402
from fedpower.privacy.sampling import fixed_cohort  # noqa: E402
from fedpower.training import get_params, local_update  # noqa: E402

Tensors = dict[str, torch.Tensor]
CONFIG = ROOT / "configs" / "parity_mlp.yaml"
STRATEGY = "fedavg"  # dense FedAvg: the updates PowerSGD would see before any compression error feeds back
RANKS = (4, 8)
ITERATIONS = (1, 2, 4, 8)
DEFLATIONS = (False, True)
STARTS = ("cold", "warm")
TIMING_REPEATS = 21  # the CPU is shared: a median over more repeats is steadier
OUT = ROOT / "benchmarks" / "results" / "power_iterations.json"


def update_errors(
    codec: PowerSGD, update: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, float], float, Tensors]:
    """(relative error per compressed tensor, whole-update relative error, codec's new state) of one encode→decode."""
    inputs = layout_of(update)
    encoded, new_state = codec.encode(update, state)
    decoded = codec.decode(encoded, inputs)
    per_tensor: dict[str, float] = {}
    error_sq, norm_sq = 0.0, 0.0
    for name, tensor in update.items():
        # float64 sums: the errors of 8-iteration runs differ from the optimum in the 4th-5th digit.
        original = tensor.detach().double()
        err = float((original - decoded[name].double()).pow(2).sum())
        norm = float(original.pow(2).sum())
        error_sq, norm_sq = error_sq + err, norm_sq + norm
        if name in codec.dims(inputs):
            per_tensor[name] = math.sqrt(err / norm) if norm > 0 else 0.0
    whole = math.sqrt(error_sq / norm_sq) if norm_sq > 0 else 0.0
    return per_tensor, whole, new_state


def svd_optimum(update: Mapping[str, torch.Tensor], dims: Mapping[str, MatrixDims]) -> tuple[dict[str, float], float]:
    """(per-tensor, whole-update) relative error of the best rank-r' approximation (Eckart–Young, truncated SVD)."""
    per_tensor: dict[str, float] = {}
    error_sq, norm_sq = 0.0, 0.0
    for name, tensor in update.items():
        matrix = tensor.detach().double()
        norm = float(matrix.pow(2).sum())
        norm_sq += norm
        if name not in dims:
            continue  # dense pass-through: exact
        n, m, r = dims[name]
        singular = torch.linalg.svdvals(matrix.reshape(n, m))
        tail = float(singular[r:].pow(2).sum())
        error_sq += tail
        per_tensor[name] = math.sqrt(tail / norm) if norm > 0 else 0.0
    return per_tensor, (math.sqrt(error_sq / norm_sq) if norm_sq > 0 else 0.0)


def load_experiment(config: Path) -> ExperimentConfig:
    """The validated experiment, as run.py hands it to the server and clients."""
    return load_config(config)


def client_update(
    experiment: ExperimentConfig, model: torch.nn.Module, global_params: Mapping[str, torch.Tensor],
    server_round: int, pid: int,
) -> Tensors:
    """One client's update ``local − global`` for ``server_round``, trained as handle_train does."""
    _, parts, x_train, y_train, _, _ = experiment_data(experiment)
    settings = experiment.resolve(STRATEGY)
    seed = client_seed(settings.seed, server_round, pid)
    return local_update(model, global_params, x_train, y_train, parts[pid], settings.train, seed)[0]


def collect_updates(
    experiment: ExperimentConfig, rounds: Sequence[int], clients: int,
) -> dict[int, list[tuple[int, Tensors, Tensors | None]]]:
    """Round → [(partition id, update, same client's update one round earlier or None)] for the collected rounds."""
    dataset = experiment_data(experiment)[0]
    settings = experiment.resolve(STRATEGY)
    model = experiment_model(settings, dataset).to("cpu")
    num_clients = settings.num_clients
    cohort_size = settings.clients_per_round
    seed = settings.seed
    global_params = get_params(model)
    previous_global: Tensors | None = None
    collected: dict[int, list[tuple[int, Tensors, Tensors | None]]] = {}
    for server_round in range(1, max(rounds) + 1):
        # The server's own fixed-size sampler, so the cohorts are those of a real run with this seed.
        cohort = fixed_cohort(seed, server_round, range(num_clients), cohort_size)
        updates = {pid: client_update(experiment, model, global_params, server_round, pid) for pid in cohort}
        if server_round in rounds:
            rows = []
            for pid in cohort[:clients]:
                earlier = (None if previous_global is None
                           else client_update(experiment, model, previous_global, server_round - 1, pid))
                rows.append((pid, updates[pid], earlier))
            collected[server_round] = rows
        previous_global = global_params
        global_params = {name: value + torch.stack([u[name] for u in updates.values()]).mean(dim=0)
                         for name, value in global_params.items()}
    return collected


def config_key(rank: int, deflation: bool, start: str) -> str:
    """Stable text key of one (rank, deflation, start) row."""
    return f"r{rank}-{'deflation' if deflation else 'plain'}-{start}"


def measure(
    experiment: ExperimentConfig, collected: Mapping[int, list[tuple[int, Tensors, Tensors | None]]],
) -> list[dict[str, Any]]:
    """One record per (round, client, rank, deflation, start, iterations) with codec and SVD errors."""
    records: list[dict[str, Any]] = []
    seed = experiment.seed
    for server_round, rows in collected.items():
        for pid, update, earlier in rows:
            inputs = layout_of(update)
            for rank in RANKS:
                dims = PowerSGD(rank=rank).dims(inputs)
                optimum_tensors, optimum = svd_optimum(update, dims)
                for deflation in DEFLATIONS:
                    for iterations in ITERATIONS:
                        codec = PowerSGD(rank=rank, power_iterations=iterations, deflation=deflation)
                        cold = codec.init_state(inputs, seed=seed + pid)
                        starts = {"cold": cold}
                        if earlier is not None:
                            starts["warm"] = codec.encode(earlier, cold)[1]
                        for start, state in starts.items():
                            tensors, whole, _ = update_errors(codec, update, state)
                            records.append({"round": server_round, "partition": pid, "rank": rank,
                                            "deflation": deflation, "start": start, "iterations": iterations,
                                            "whole": whole, "tensors": tensors, "svd_whole": optimum,
                                            "svd_tensors": optimum_tensors})
    return records


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over clients and rounds per (rank, deflation, start): per iteration count, per tensor, and the optimum."""
    out: dict[str, Any] = {}
    for rank in RANKS:
        for deflation in DEFLATIONS:
            for start in STARTS:
                rows = [r for r in records if r["rank"] == rank and r["deflation"] == deflation and r["start"] == start]
                if not rows:
                    continue
                baseline = [r for r in rows if r["iterations"] == ITERATIONS[0]]
                names = list(baseline[0]["tensors"])
                entry: dict[str, Any] = {
                    "rank": rank, "deflation": deflation, "start": start, "samples": len(baseline),
                    "rounds": sorted({r["round"] for r in baseline}),
                    "svd_whole": statistics.fmean(r["svd_whole"] for r in baseline),
                    "svd_tensors": {n: statistics.fmean(r["svd_tensors"][n] for r in baseline) for n in names},
                    "whole": {}, "tensors": {},
                }
                for k in ITERATIONS:
                    at_k = [r for r in rows if r["iterations"] == k]
                    entry["whole"][k] = statistics.fmean(r["whole"] for r in at_k)
                    entry["tensors"][k] = {n: statistics.fmean(r["tensors"][n] for r in at_k) for n in names}
                    entry.setdefault("per_round_whole", {})[k] = {
                        rnd: statistics.fmean(r["whole"] for r in at_k if r["round"] == rnd) for rnd in entry["rounds"]}
                out[config_key(rank, deflation, start)] = entry
    return out


def time_encodes(update: Mapping[str, torch.Tensor], repeats: int = TIMING_REPEATS) -> dict[str, dict[int, float]]:
    """Median wall time in ms of one whole-update encode, per (rank, deflation) and iteration count."""
    inputs = layout_of(update)
    out: dict[str, dict[int, float]] = {}
    for rank in RANKS:
        for deflation in DEFLATIONS:
            times: dict[int, float] = {}
            for k in ITERATIONS:
                codec = PowerSGD(rank=rank, power_iterations=k, deflation=deflation)
                state = codec.init_state(inputs, seed=0)
                codec.encode(update, state)  # warm-up: first-call allocations would dominate k=1
                samples = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    codec.encode(update, state)
                    samples.append(time.perf_counter() - started)
                times[k] = 1000 * statistics.median(samples)
            out[f"r{rank}-{'deflation' if deflation else 'plain'}"] = times
    return out


def error_table(summary: Mapping[str, Any]) -> str:
    """Markdown: whole-update relative error per (rank, deflation, start) and iteration count, and the SVD optimum."""
    lines = ["| rank | deflation | start | " + " | ".join(f"k={k}" for k in ITERATIONS) + " | SVD optimum |",
             "|---:|:---|:---|" + "---:|" * (len(ITERATIONS) + 1)]
    for entry in summary.values():
        cells = " | ".join(f"{entry['whole'][k]:.4f}" for k in ITERATIONS)
        lines.append(f"| {entry['rank']} | {'yes' if entry['deflation'] else 'no'} | {entry['start']} | {cells} | "
                     f"{entry['svd_whole']:.4f} |")
    return "\n".join(lines)


def tensor_table(summary: Mapping[str, Any]) -> str:
    """Markdown: per compressed tensor, plain (no deflation) error at k=1 and k=max, cold and warm, vs the optimum."""
    last = ITERATIONS[-1]
    lines = [f"| tensor | rank | k=1 cold | k=1 warm | k={last} cold | k={last} warm | SVD optimum |",
             "|:---|---:|---:|---:|---:|---:|---:|"]
    for rank in RANKS:
        cold = summary[config_key(rank, False, "cold")]
        warm = summary.get(config_key(rank, False, "warm"))
        for name in cold["tensors"][1]:
            def cell(entry: Mapping[str, Any] | None, k: int) -> str:
                """One formatted mean error, or n/a without warm-start samples."""
                return "n/a" if entry is None else f"{entry['tensors'][k][name]:.4f}"
            lines.append(f"| {name} | {rank} | {cell(cold, 1)} | {cell(warm, 1)} | {cell(cold, last)} | "
                         f"{cell(warm, last)} | {cold['svd_tensors'][name]:.4f} |")
    return "\n".join(lines)


def timing_table(times: Mapping[str, Mapping[int, float]]) -> str:
    """Markdown: whole-update encode time per iteration count, and the marginal cost of one more iteration."""
    first, last = ITERATIONS[0], ITERATIONS[-1]
    lines = ["| rank | deflation | " + " | ".join(f"k={k} ms" for k in ITERATIONS) + " | ms / extra iteration |",
             "|---:|:---|" + "---:|" * (len(ITERATIONS) + 1)]
    for key, row in times.items():
        rank, mode = key.split("-")
        slope = (row[last] - row[first]) / (last - first)
        cells = " | ".join(f"{row[k]:.2f}" for k in ITERATIONS)
        lines.append(f"| {rank[1:]} | {'yes' if mode == 'deflation' else 'no'} | {cells} | {slope:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command line of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, nargs="+", default=[2, 5, 20],
                        help="FedAvg rounds whose client updates are measured (round 1 has no warm start)")
    parser.add_argument("--clients", type=int, default=10, help="clients measured per collected round (≤ cohort)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="experiment YAML (default: parity_mlp)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings are single-threaded)")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON output path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Collect updates, measure errors and encode times, print tables, write JSON."""
    args = build_parser().parse_args(argv)
    if min(args.rounds) < 1 or args.clients < 1:
        raise SystemExit("--rounds must be ≥ 1 and --clients ≥ 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    experiment = load_experiment(args.config)
    rounds = sorted(set(args.rounds))
    collected = collect_updates(experiment, rounds, args.clients)
    simulated = time.perf_counter() - started
    records = measure(experiment, collected)
    summary = summarize(records)
    times = time_encodes(collected[rounds[-1]][0][1])
    elapsed = time.perf_counter() - started

    print(f"## Relative error ‖M − PQᵀ‖/‖M‖ of the whole update (mean over clients; rounds {rounds}, "
          f"{len(collected[rounds[0]])} clients each)\n")
    print(error_table(summary))
    print("\n## Per compressed tensor, no deflation\n")
    print(tensor_table(summary))
    print(f"\n## Encode time of one whole update (CPU, {args.threads} thread(s), median of {TIMING_REPEATS})\n")
    print(timing_table(times))
    print(f"\nsimulation {simulated:.1f} s, total {elapsed:.1f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json({
        "benchmark": "power_iterations", "config": str(args.config.relative_to(ROOT) if args.config.is_absolute()
                                                       and args.config.is_relative_to(ROOT) else args.config),
        "strategy_train_settings": STRATEGY, "rounds": rounds, "clients_per_round_measured": args.clients,
        "ranks": list(RANKS), "iterations": list(ITERATIONS), "threads": args.threads,
        "warm_start": "Q state from encoding the same client's previous-round update with the same codec, "
                      "started from init_state; round 1 has none",
        "summary": summary, "encode_ms": times, "records_measured": len(records),  # per-record rows: ~0.5 MB
        "runtime_s": {"simulation": simulated, "total": elapsed}, "machine": machine_info(("torch",)),
    }, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
