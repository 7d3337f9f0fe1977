"""The fedpower ServerApp: runs every strategy of an experiment, one after the other, in one run.

Running all strategies inside one ServerApp pays the simulation engine's start-up (≈10 s of Ray)
once per comparison. Client sampling is keyed on partition ids and seeded per round, so every
strategy trains on the same clients in the same rounds.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, Mapping, NamedTuple

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpower.checkpoint import ResumePoint, lost_release, mark_release, restore_rng, save_run_checkpoint
from fedpower.codecs import layout_of
from fedpower.codecs.budget import ranks_for
from fedpower.config import ExperimentConfig, StrategyConfig
from fedpower.experiment import as_experiment, experiment_data, experiment_model, privacy_plan
from fedpower.ledger import Transfer
from fedpower.privacy import cohort_sampler
from fedpower.records import arrays_to_tensors, tensors_to_arrays
from fedpower.results import RunResults, StrategyResult
from fedpower.round import RoundStats
from fedpower.training import evaluate, get_params, set_params
from strategies.compressed import CompressedFedAvg
from strategies.wire import header_bytes, wire_bytes

log = logging.getLogger("fedpower.server")


class Discovery(NamedTuple):
    """What start-up learned: each node's partition, and the messages it cost (none when the grid knew)."""

    partitions: dict[int, int]  # node id → partition id
    transfers: list[Transfer]  # the query and its reply per node, measured like every other message


def discover_partitions(grid: Grid, expected: int, timeout: float = 600.0) -> Discovery:
    """node id → partition id: from the grid when it knows (in-process engine), else asked of every node once.

    Node ids are random per run in Flower's engines, and neither the Ray engine nor a SuperLink tells
    the ServerApp which partition a node holds, so they cost one query message per node and its reply:
    both are measured (round 0, purpose ``discover``) so that start-up traffic is on the ledger too.
    """
    known = getattr(grid, "node_partitions", None)
    if callable(known):
        return Discovery(known(), [])
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of {expected} nodes connected")
        time.sleep(0.5)
    messages = [Message(RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY) for nid in node_ids]
    sent = {message.metadata.dst_node_id: (wire_bytes(message.content), header_bytes(message)) for message in messages}
    mapping: dict[int, int] = {}
    received: dict[int, tuple[int, int]] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if not reply.has_error():
            mapping[reply.metadata.src_node_id] = int(reply.content["metrics"]["partition-id"])
            received[reply.metadata.src_node_id] = (wire_bytes(reply.content), header_bytes(reply))
    # In partition order, so that a run's ledger repeats exactly whatever order the replies came in.
    transfers: list[Transfer] = []
    for node in sorted(sent, key=lambda n: (mapping.get(n, -1), n)):
        partition = mapping.get(node, -1)  # a node that did not answer was still sent its query
        for direction, sizes in (("down", sent[node]), ("up", received.get(node))):
            if sizes is not None:
                content, header = sizes
                transfers.append(Transfer(0, partition, direction, 0, content + header, 0, "discover", header))
    return Discovery(mapping, transfers)


def make_sampler(seed: int, node_by_partition: Mapping[int, int], clients_per_round: int,
                 sampling: str = "fixed") -> Callable[[int], list[int]]:
    """Round → node ids; the same partitions for the same round, seed and sampling, whatever the strategy.

    ``fixed``: exactly ``clients_per_round`` without replacement; ``poisson``: each client with
    probability clients_per_round / N (what the DP accountant assumes; the cohort may be empty).
    """
    sample = cohort_sampler(seed, list(node_by_partition), clients_per_round, sampling)  # type: ignore[arg-type]
    return lambda server_round: [node_by_partition[p] for p in sample(server_round)]


def run_strategies(grid: Grid, experiment: ExperimentConfig | Mapping[str, Any], results: RunResults,
                   observer: Any = None, should_stop: Callable[[], bool] = lambda: False) -> RunResults:
    """Run every strategy of ``experiment`` on ``grid`` and record into ``results``.

    With ``results.checkpoint_dir`` set, the run is checkpointed after every round; with
    ``results.resume_from`` (a ``ResumePoint``) it continues where that checkpoint left off.
    """
    experiment = as_experiment(experiment)
    random.seed(experiment.seed)  # Flower's own sampling helpers use the global RNG
    discovery = discover_partitions(grid, experiment.data.num_clients)
    fleet = _Fleet(grid, experiment, discovery, experiment_data(experiment))
    _check_budgets(fleet)  # before any strategy runs, not when the third one starts
    resume = results.resume_from
    if resume is not None:
        results.strategies.update(resume.results)  # finished strategies and the rounds done of the running one
    for index, settings in enumerate(fleet.settings):
        if should_stop():
            break
        if resume is not None and index < resume.strategy_index:
            _replay(observer, results.strategies[settings.name], settings.train.rounds)
            continue
        restart = resume if resume is not None and index == resume.strategy_index else None
        finished = _run_strategy(fleet, index, results, observer, should_stop, restart)
        if finished and results.checkpoint_dir:
            save_run_checkpoint(results.checkpoint_dir, experiment=fleet.config, results=results,
                                strategy_index=index + 1, completed_round=0, strategy_state=None)
    return results


def _check_budgets(fleet: "_Fleet") -> None:
    """ValueError naming the strategy when a byte budget is below its model's smallest message."""
    for settings in fleet.settings:
        if not settings.compression.uses_budget:
            continue
        try:
            shapes = layout_of(get_params(experiment_model(settings, fleet.dataset, pretrained=False)))
            ranks_for(settings.compression, shapes)
        except ValueError as err:
            raise ValueError(f"strategy {settings.name}: {err}") from None


class _Fleet:
    """What every strategy of a run shares: the grid, the nodes and their partitions, the test data."""

    def __init__(self, grid: Grid, experiment: ExperimentConfig, discovery: Discovery,
                 data: tuple[Any, ...]) -> None:
        self.grid, self.experiment = grid, experiment
        self.config = experiment.to_dict()  # what checkpoints and results record
        self.settings: list[StrategyConfig] = experiment.resolved()
        self.partitions_by_node = discovery.partitions
        self.discovery_transfers = discovery.transfers  # start-up messages of this run (none in-process)
        self.node_by_partition = {p: n for n, p in discovery.partitions.items()}
        self.dataset, _, _, _, self.x_test, self.y_test = data


def _replay(observer: Any, result: Any, rounds: int) -> None:
    """Show a strategy finished before a resume as the observer would have seen it."""
    if observer is None:
        return
    observer.strategy_started(result.name, rounds)
    for row in result.rounds:
        observer.round_finished(result.name, row)
    observer.strategy_finished(result.name, result.final())


def _make_strategy(fleet: _Fleet, settings: StrategyConfig, pending: dict[int, RoundStats],
                   should_stop: Callable[[], bool]) -> CompressedFedAvg:
    """The strategy object of one run of ``settings``, sampling the same partitions as every other strategy."""
    plan = privacy_plan(settings)
    if plan is not None and plan.mode == "central" and settings.train.robustness.max_norm_ratio is not None:
        log.info("%s: central DP re-clips every contribution to C; the max_norm_ratio check is not applied "
                 "(it would make one client's presence decide whether others are kept)", settings.name)
    sampler = make_sampler(settings.seed, fleet.node_by_partition, settings.clients_per_round, settings.sampling)
    return CompressedFedAvg(settings, get_params(experiment_model(settings, fleet.dataset)), sampler,
                            node_partitions=fleet.partitions_by_node, privacy=plan,
                            on_round=lambda stats: pending.__setitem__(stats.round, stats), should_stop=should_stop)


def _round_row(strategy: CompressedFedAvg, stats: RoundStats, server_round: int, accuracy: float,
               loss: float) -> dict[str, Any]:
    """One row of results.json's per-round table."""
    row = {"round": server_round, "accuracy": accuracy, "loss": loss,
           "uplink_bytes": strategy.ledger.total("up", round=server_round),
           "downlink_bytes": strategy.ledger.total("down", round=server_round),
           "epsilon": strategy.epsilon, "seconds": strategy.round_seconds(server_round),
           "train_loss": stats.train_loss, "clients": stats.sampled, "accepted": stats.accepted,
           "rejected": stats.rejected, "failures": stats.failures, "dropouts": stats.dropouts, "late": stats.late,
           "kept_old_model": stats.kept_reason is not None, "kept_reason": stats.kept_reason,
           "discarded_after_commit": stats.discarded_after_commit,
           "largest_norm_ratio": stats.largest_norm_ratio}
    if server_round in strategy.federated_metrics:
        row["federated_accuracy"] = strategy.federated_metrics[server_round]["eval_accuracy"]
    return row


class _RoundCloser:
    """Flower's ``evaluate_fn``: centralized evaluation that also closes (and checkpoints) each round's record."""

    def __init__(self, fleet: _Fleet, index: int, strategy: CompressedFedAvg, result: StrategyResult,
                 results: RunResults, pending: dict[int, RoundStats], observer: Any) -> None:
        self.fleet, self.index, self.strategy, self.result = fleet, index, strategy, result
        self.results, self.pending, self.observer = results, pending, observer
        self.settings = fleet.settings[index]
        self.model = experiment_model(self.settings, fleet.dataset, pretrained=False)  # gets each round's params

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> tuple[float, float]:
        """(loss, accuracy) on the held-out test set, or NaNs in rounds that skip evaluation."""
        train = self.settings.train
        if server_round == 0 or server_round % train.evaluate_every == 0 or server_round == train.rounds:
            set_params(self.model, arrays_to_tensors(arrays))
            return evaluate(self.model, self.fleet.x_test, self.fleet.y_test)
        return float("nan"), float("nan")

    def __call__(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate, then record the round: results row, checkpoint, observer, log."""
        strategy, server_round = self.strategy, flower_round + self.strategy.round_offset
        if flower_round == 0 and strategy.round_offset:
            return None  # resumed: the initial evaluation is in the restored results already
        if server_round > 0 and server_round not in self.pending:
            return None  # stopped: this round never trained
        loss, accuracy = self._evaluate(server_round, arrays)
        if server_round == 0:
            self.result.initial_accuracy = accuracy
            return MetricRecord({"accuracy": accuracy, "loss": loss})
        stats = self.pending.pop(server_round)
        row = _round_row(strategy, stats, server_round, accuracy, loss)
        self.result.rounds.append(row)
        self.result.client_metrics[server_round] = stats.client_metrics
        if self.results.checkpoint_dir:
            save_run_checkpoint(self.results.checkpoint_dir, experiment=self.fleet.config, results=self.results,
                                strategy_index=self.index, completed_round=server_round,
                                strategy_state=strategy.state_dict())
        if self.observer is not None:
            self.observer.round_finished(strategy.name, row)
        log.info("%s round %d/%d: accuracy %.4f, uplink %d B, downlink %d B, %.2f s%s", strategy.name, server_round,
                 self.settings.train.rounds, accuracy, row["uplink_bytes"], row["downlink_bytes"], row["seconds"],
                 f" (kept the old model: {stats.kept_reason})" if stats.kept_reason else "")
        return MetricRecord({"accuracy": accuracy, "loss": loss})


def _run_strategy(fleet: _Fleet, index: int, results: RunResults, observer: Any,
                  should_stop: Callable[[], bool], restart: ResumePoint | None) -> bool:
    """Run (or continue) one strategy; True when it finished (all rounds, or stopped by its privacy budget)."""
    settings = fleet.settings[index]
    result = results.strategy(settings.name)
    pending: dict[int, RoundStats] = {}
    strategy = _make_strategy(fleet, settings, pending, should_stop)
    strategy.ledger = result.ledger  # one ledger: restored rows continue in it after a resume
    # Start-up discovery serves every strategy of the run; each strategy's ledger carries it (what the
    # strategy costs run on its own), so summing strategies counts it once per strategy. A resumed
    # strategy gets the resumed run's discovery as well: it was sent again to continue it.
    for transfer in fleet.discovery_transfers:
        strategy.ledger.record(transfer)
    if restart is not None and restart.strategy_meta is not None:
        strategy.load_state(restart.strategy_arrays, restart.strategy_meta)
        strategy.round_offset = restart.completed_round
        restore_rng(restart.rng.get("arrays", {}), restart.rng.get("meta", {}))
        log.info("%s: resuming after round %d of %d", settings.name, restart.completed_round, settings.train.rounds)
    if results.checkpoint_dir and strategy.privacy is not None and strategy.privacy.mode == "local":
        _account_lost_release(strategy, results.checkpoint_dir, index)
    if observer is not None:
        observer.strategy_started(settings.name, settings.train.rounds)
        for row in result.rounds:
            observer.round_finished(settings.name, row)
    started = time.perf_counter()
    strategy.start(grid=fleet.grid, initial_arrays=tensors_to_arrays(strategy.params),
                   num_rounds=settings.train.rounds - strategy.round_offset,
                   evaluate_fn=_RoundCloser(fleet, index, strategy, result, results, pending, observer))
    result.wall_seconds += time.perf_counter() - started
    result.completed = len(result.rounds) == settings.train.rounds
    result.stop_reason = strategy.stop_reason
    if observer is not None:
        observer.strategy_finished(settings.name, result.final())
    return result.completed or strategy.stop_reason is not None


def _account_lost_release(strategy: CompressedFedAvg, directory: str, index: int) -> None:
    """Local DP: count a round whose noisy replies left the clients before a crash, then mark every round sent.

    A resume redoes that round and its clients release again (fresh noise unless ``noise_seed`` is
    set): the untrusted server has seen both releases, so ε must count both.
    """
    cohort = lost_release(directory, index, strategy.round_offset)
    if cohort is not None:
        strategy.privacy.record(cohort)
        log.warning("%s: round %d had been sent before the run stopped; its local-DP releases are accounted "
                    "(ε now %.4g) before the round is redone", strategy.name, strategy.round_offset + 1,
                    strategy.privacy.epsilon)
    strategy.on_release = lambda server_round, sent: mark_release(directory, index, server_round, sent)


def make_server_app(experiment: ExperimentConfig | Mapping[str, Any], results: RunResults, observer: Any = None,
                    should_stop: Callable[[], bool] = lambda: False) -> ServerApp:
    """A ServerApp bound to one experiment; fills ``results`` as rounds finish."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_strategies(grid, experiment, results, observer, should_stop)

    return app
