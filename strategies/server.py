"""The fedpower ServerApp: runs every strategy of an experiment, one after the other, in one run.

Running all strategies inside one ServerApp pays the simulation engine's start-up (≈10 s of Ray)
once per comparison. Client sampling is keyed on partition ids and seeded per round, so every
strategy trains on the same clients in the same rounds.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, Mapping

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpower.checkpoint import ResumePoint, restore_rng, save_run_checkpoint
from fedpower.codecs import layout_of
from fedpower.codecs.budget import ranks_for
from fedpower.experiment import (
    clients_per_round, experiment_data, experiment_model, privacy_plan, strategy_sampling, strategy_settings,
)
from fedpower.privacy import cohort_sampler
from fedpower.records import arrays_to_tensors, tensors_to_arrays
from fedpower.results import RunResults
from fedpower.server_opt import ServerOptimizer
from fedpower.training import evaluate, get_params, set_params
from strategies.compressed import CompressedFedAvg, RoundStats

log = logging.getLogger("fedpower.server")


def discover_partitions(grid: Grid, expected: int, timeout: float = 600.0) -> dict[int, int]:
    """node id → partition id, asked of every node once (node ids are random per run)."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of {expected} nodes connected")
        time.sleep(0.5)
    messages = [Message(RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY) for nid in node_ids]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if not reply.has_error():
            mapping[reply.metadata.src_node_id] = int(reply.content["metrics"]["partition-id"])
    return mapping


def make_sampler(seed: int, node_by_partition: Mapping[int, int], clients_per_round: int,
                 sampling: str = "fixed") -> Callable[[int], list[int]]:
    """Round → node ids; the same partitions for the same round, seed and sampling, whatever the strategy.

    ``fixed``: exactly ``clients_per_round`` without replacement; ``poisson``: each client with
    probability clients_per_round / N (what the DP accountant assumes; the cohort may be empty).
    """
    sample = cohort_sampler(seed, list(node_by_partition), clients_per_round, sampling)  # type: ignore[arg-type]
    return lambda server_round: [node_by_partition[p] for p in sample(server_round)]


def run_strategies(grid: Grid, experiment: Mapping[str, Any], results: RunResults, observer: Any = None,
                   should_stop: Callable[[], bool] = lambda: False) -> RunResults:
    """Run every strategy of ``experiment`` on ``grid`` and record into ``results``.

    With ``results.checkpoint_dir`` set, the run is checkpointed after every round; with
    ``results.resume_from`` (a ``ResumePoint``) it continues where that checkpoint left off.
    """
    seed = int(experiment["seed"])
    random.seed(seed)  # Flower's own sampling helpers use the global RNG
    num_clients = int(experiment["data"]["num_clients"])
    partitions_by_node = discover_partitions(grid, num_clients)
    fleet = _Fleet(grid, experiment, seed, partitions_by_node, experiment_data(experiment))
    _check_budgets(experiment, fleet.dataset)  # before any strategy runs, not when the third one starts
    resume = results.resume_from
    if resume is not None:
        results.strategies.update(resume.results)  # finished strategies and the rounds done of the running one
    for index, entry in enumerate(experiment["strategies"]):
        if should_stop():
            break
        if resume is not None and index < resume.strategy_index:
            _replay(observer, results.strategies[entry["name"]], fleet.rounds_of(entry["name"]))
            continue
        restart = resume if resume is not None and index == resume.strategy_index else None
        finished = _run_strategy(fleet, index, results, observer, should_stop, restart)
        if finished and results.checkpoint_dir:
            save_run_checkpoint(results.checkpoint_dir, experiment=experiment, results=results,
                                strategy_index=index + 1, completed_round=0, strategy_state=None)
    return results


def _check_budgets(experiment: Mapping[str, Any], dataset: Any) -> None:
    """ValueError naming the strategy when a byte budget is below its model's smallest message."""
    for entry in experiment["strategies"]:
        compression = strategy_settings(experiment, entry["name"])["compression"]
        if compression.get("budget_bytes_per_round") is None:
            continue
        layout = layout_of(get_params(experiment_model(experiment, entry["name"], dataset)))
        try:
            ranks_for(compression, layout)
        except ValueError as err:
            raise ValueError(f"strategy {entry['name']}: {err}") from None


class _Fleet:
    """What every strategy of a run shares: the grid, the nodes and their partitions, the test data."""

    def __init__(self, grid: Grid, experiment: Mapping[str, Any], seed: int, partitions_by_node: dict[int, int],
                 data: tuple[Any, ...]) -> None:
        self.grid, self.experiment, self.seed = grid, experiment, seed
        self.partitions_by_node = partitions_by_node
        self.node_by_partition = {p: n for n, p in partitions_by_node.items()}
        self.dataset, _, _, _, self.x_test, self.y_test = data

    def rounds_of(self, name: str) -> int:
        """Planned rounds of a strategy."""
        return int(strategy_settings(self.experiment, name)["train"]["rounds"])


def _replay(observer: Any, result: Any, rounds: int) -> None:
    """Show a strategy finished before a resume as the observer would have seen it."""
    if observer is None:
        return
    observer.strategy_started(result.name, rounds)
    for row in result.rounds:
        observer.round_finished(result.name, row)
    observer.strategy_finished(result.name, result.final())


def _run_strategy(fleet: _Fleet, index: int, results: RunResults, observer: Any,
                  should_stop: Callable[[], bool], restart: ResumePoint | None) -> bool:
    """Run (or continue) one strategy; True when it finished (all rounds, or stopped by its privacy budget)."""
    experiment, seed = fleet.experiment, fleet.seed
    name = experiment["strategies"][index]["name"]
    settings = strategy_settings(experiment, name)
    train = settings["train"]
    model = experiment_model(experiment, name, fleet.dataset)
    result = results.strategy(name)
    rounds = int(train["rounds"])
    evaluate_every = int(train.get("evaluate_every", 1))
    pending: dict[int, RoundStats] = {}
    plan = privacy_plan(experiment, name)
    sampling = strategy_sampling(settings)  # DP: privacy.sampling; otherwise train.sampling
    robustness = train.get("robustness") or {}
    failures = train.get("failures") or {}
    if plan is not None and plan.mode == "central" and robustness.get("max_norm_ratio") is not None:
        log.info("%s: central DP re-clips every contribution to C; the max_norm_ratio check is not applied "
                 "(it would make one client's presence decide whether others are kept)", name)

    cohort = clients_per_round(train, int(experiment["data"]["num_clients"]))
    strategy = CompressedFedAvg(
        name=name, compression=settings["compression"], params=get_params(model),
        sampler=make_sampler(seed, fleet.node_by_partition, cohort, sampling),
        server_optimizer=ServerOptimizer(**(train.get("server_optimizer") or {})), seed=seed,
        node_partitions=fleet.partitions_by_node,
        federated_evaluation=bool(train.get("federated_evaluation", False)),
        min_valid_clients=int(robustness.get("min_valid_clients", 1)), max_norm_ratio=robustness.get("max_norm_ratio"),
        round_deadline_s=failures.get("round_deadline_s"), rejoin_wait_s=float(failures.get("rejoin_wait_s", 30.0)),
        on_round=lambda stats: pending.__setitem__(stats.round, stats), should_stop=should_stop, privacy=plan)
    strategy.ledger = result.ledger  # one ledger: restored rows continue in it after a resume
    if restart is not None and restart.strategy_meta is not None:
        strategy.load_state(restart.strategy_arrays, restart.strategy_meta)
        strategy.round_offset = restart.completed_round
        restore_rng(restart.rng.get("arrays", {}), restart.rng.get("meta", {}))
        log.info("%s: resuming after round %d of %d", name, restart.completed_round, rounds)
    if observer is not None:
        observer.strategy_started(name, rounds)
        for row in result.rounds:
            observer.round_finished(name, row)

    def evaluate_fn(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Centralized evaluation on the held-out test set; also closes (and checkpoints) the round's record."""
        server_round = flower_round + strategy.round_offset
        if flower_round == 0 and strategy.round_offset:
            return None  # resumed: the initial evaluation is in the restored results already
        if server_round > 0 and server_round not in pending:
            return None  # stopped: this round never trained
        is_last = server_round == rounds
        if server_round == 0 or server_round % evaluate_every == 0 or is_last:
            set_params(model, arrays_to_tensors(arrays))
            loss, accuracy = evaluate(model, fleet.x_test, fleet.y_test)
        else:
            loss, accuracy = float("nan"), float("nan")
        if server_round == 0:
            result.initial_accuracy = accuracy
            return MetricRecord({"accuracy": accuracy, "loss": loss})
        stats = pending.pop(server_round)
        row = {"round": server_round, "accuracy": accuracy, "loss": loss,
               "uplink_bytes": strategy.ledger.total("up", round=server_round),
               "downlink_bytes": strategy.ledger.total("down", round=server_round),
               "epsilon": strategy.epsilon, "seconds": strategy.round_seconds(server_round),
               "train_loss": stats.train_loss, "clients": stats.sampled, "accepted": stats.accepted,
               "rejected": stats.rejected, "failures": stats.failures, "dropouts": stats.dropouts, "late": stats.late,
               "kept_old_model": stats.kept_reason is not None, "kept_reason": stats.kept_reason,
               "largest_norm_ratio": stats.largest_norm_ratio}
        if server_round in strategy.federated_metrics:
            row["federated_accuracy"] = strategy.federated_metrics[server_round]["eval_accuracy"]
        result.rounds.append(row)
        result.client_metrics[server_round] = stats.client_metrics
        if results.checkpoint_dir:
            save_run_checkpoint(results.checkpoint_dir, experiment=experiment, results=results, strategy_index=index,
                                completed_round=server_round, strategy_state=strategy.state_dict())
        if observer is not None:
            observer.round_finished(name, row)
        log.info("%s round %d/%d: accuracy %.4f, uplink %d B, downlink %d B, %.2f s%s", name, server_round,
                 rounds, accuracy, row["uplink_bytes"], row["downlink_bytes"], row["seconds"],
                 f" (kept the old model: {stats.kept_reason})" if stats.kept_reason else "")
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    started = time.perf_counter()
    initial = tensors_to_arrays(strategy.params)
    strategy.start(grid=fleet.grid, initial_arrays=initial, num_rounds=rounds - strategy.round_offset,
                   evaluate_fn=evaluate_fn)
    result.wall_seconds += time.perf_counter() - started
    result.completed = len(result.rounds) == rounds
    result.stop_reason = strategy.stop_reason
    if observer is not None:
        observer.strategy_finished(name, result.final())
    return result.completed or strategy.stop_reason is not None


def make_server_app(experiment: Mapping[str, Any], results: RunResults, observer: Any = None,
                    should_stop: Callable[[], bool] = lambda: False) -> ServerApp:
    """A ServerApp bound to one resolved experiment; fills ``results`` as rounds finish."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_strategies(grid, experiment, results, observer, should_stop)

    return app
