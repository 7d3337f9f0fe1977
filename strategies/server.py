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

from fedpower.experiment import (
    clients_per_round, experiment_data, experiment_model, privacy_plan, strategy_settings,
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
    """Run every strategy of ``experiment`` on ``grid`` and record into ``results``."""
    seed = int(experiment["seed"])
    random.seed(seed)  # Flower's own sampling helpers use the global RNG
    num_clients = int(experiment["data"]["num_clients"])
    partitions_by_node = discover_partitions(grid, num_clients)
    node_by_partition = {p: n for n, p in partitions_by_node.items()}
    dataset, _, _, _, x_test, y_test = experiment_data(experiment)
    for entry in experiment["strategies"]:
        if should_stop():
            break
        name = entry["name"]
        settings = strategy_settings(experiment, name)
        train = settings["train"]
        model = experiment_model(experiment, name, dataset)
        server_opt = ServerOptimizer(**(train.get("server_optimizer") or {}))
        result = results.strategy(name)
        rounds = int(train["rounds"])
        evaluate_every = int(train.get("evaluate_every", 1))
        if observer is not None:
            observer.strategy_started(name, rounds)
        pending: dict[int, RoundStats] = {}
        plan = privacy_plan(experiment, name)
        sampling = plan.sampling if plan is not None else "fixed"

        strategy = CompressedFedAvg(
            name=name, compression=settings["compression"], params=get_params(model),
            sampler=make_sampler(seed, node_by_partition, clients_per_round(train, num_clients), sampling),
            server_optimizer=server_opt, seed=seed, node_partitions=partitions_by_node,
            federated_evaluation=bool(train.get("federated_evaluation", False)),
            on_round=lambda stats: pending.__setitem__(stats.round, stats), should_stop=should_stop, privacy=plan)
        result.ledger = strategy.ledger

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            """Centralized evaluation on the held-out test set; also closes the round's record."""
            if server_round > 0 and server_round not in pending:
                return None  # stopped: this round never trained
            is_last = server_round == rounds
            if server_round == 0 or server_round % evaluate_every == 0 or is_last:
                set_params(model, arrays_to_tensors(arrays))
                loss, accuracy = evaluate(model, x_test, y_test)
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
                   "rejected": stats.rejected, "failures": stats.failures}
            if server_round in strategy.federated_metrics:
                row["federated_accuracy"] = strategy.federated_metrics[server_round]["eval_accuracy"]
            result.rounds.append(row)
            result.client_metrics[server_round] = stats.client_metrics
            if observer is not None:
                observer.round_finished(name, row)
            log.info("%s round %d/%d: accuracy %.4f, uplink %d B, downlink %d B, %.2f s", name, server_round,
                     rounds, accuracy, row["uplink_bytes"], row["downlink_bytes"], row["seconds"])
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        started = time.perf_counter()
        initial = tensors_to_arrays(get_params(model))
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=evaluate_fn)
        result.wall_seconds = time.perf_counter() - started
        result.completed = len(result.rounds) == rounds
        result.stop_reason = strategy.stop_reason
        if observer is not None:
            observer.strategy_finished(name, result.final())
    return results


def make_server_app(experiment: Mapping[str, Any], results: RunResults, observer: Any = None,
                    should_stop: Callable[[], bool] = lambda: False) -> ServerApp:
    """A ServerApp bound to one resolved experiment; fills ``results`` as rounds finish."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_strategies(grid, experiment, results, observer, should_stop)

    return app
