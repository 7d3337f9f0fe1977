"""One Flower strategy for every compression method: Flower glue around :mod:`fedpower.round`.

Overrides only ``FedAvg``'s ``configure_*``/``aggregate_*``: the round's :class:`~fedpower.plan.RoundPlan`
becomes messages, every message is measured on the ledger, and replies go to
:func:`fedpower.round.server_step` (Flower's aggregation would average int8 factors as floats).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpower.checkpoint import restore_strategy_state, strategy_state
from fedpower.codecs import layout_of
from fedpower.config import StrategyConfig
from fedpower.ledger import Ledger, Transfer
from fedpower.plan import RoundPlan
from fedpower.records import half_precision, tensors_to_arrays
from fedpower.round import NUM_EXAMPLES, Reply, RoundStats, server_step
from fedpower.server_opt import ServerOptimizer
from fedpower.server_state import ServerCodecState, init_server_state, packed_basis, plan_round, round_codec, sends_basis
from clients.failures import DELAY_METRIC, is_simulated_dropout
from strategies.nodes import wait_until_online
from strategies.wire import array_bytes, header_bytes, wire_bytes

log = logging.getLogger("fedpower.strategy")


class CompressedFedAvg(FedAvg):
    """FedAvg whose clients send codec payloads; aggregation, server optimizer and ledger are fedpower's."""

    def __init__(self, settings: StrategyConfig, params: Mapping[str, torch.Tensor],
                 sampler: Callable[[int], list[int]], *, node_partitions: Mapping[int, int] | None = None,
                 privacy: Any = None, on_round: Callable[[RoundStats], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        # Sampling and evaluation are driven by our own hooks; these only satisfy FedAvg's checks.
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=1, min_train_nodes=1)
        self.settings, self.name, self.sampler, self.privacy = settings, settings.name, sampler, privacy
        self.params = {k: v.detach().clone().float() for k, v in params.items()}
        self.dense_bytes = sum(spec.nbytes for spec in layout_of(self.params).values())
        self.optimizer = ServerOptimizer(**settings.train.server_optimizer.model_dump())
        self.codec_state: ServerCodecState = init_server_state(settings.compression, layout_of(self.params),
                                                               settings.seed)
        self.node_partitions = dict(node_partitions or {})
        self.on_round, self.should_stop = on_round, should_stop or (lambda: False)
        self.ledger = Ledger()
        self.round_offset = 0  # rounds done before a resume: Flower's loop restarts at 1, our rounds do not
        self.stop_reason: str | None = None  # set when the privacy budget ends training early
        self.federated_metrics: dict[int, dict[str, float]] = {}  # round → client-side evaluation
        self.stats: dict[int, RoundStats] = {}  # round → what its training part did
        self.on_release: Callable[[int, list[int]], None] | None = None  # told before a round's messages go out
        self._plans: dict[int, tuple[RoundPlan, Any, list[int], float]] = {}  # round → plan, codec, cohort, start

    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info("strategy %s: compression=%s; %s", self.name, self.settings.compression.model_dump(),
                 "no DP" if self.privacy is None else self.privacy.describe())

    @property
    def epsilon(self) -> float | None:
        """ε(δ) spent so far (None without DP)."""
        return None if self.privacy is None else self.privacy.epsilon

    def halted(self) -> bool:
        """Whether training must not go on (user stop or exhausted privacy budget)."""
        return self.stop_reason is not None or self.should_stop()

    def _partition(self, node: int) -> int:
        """The partition a node holds (-1 for an unknown sender)."""
        return self.node_partitions.get(node, -1)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled node: global model, the round plan and (shared mode) the basis."""
        server_round += self.round_offset
        if self.halted():
            return []
        nodes = self.sampler(server_round)
        cohort = [self._partition(node) for node in nodes]
        if self.privacy is not None and (why := self.privacy.refuse(cohort, server_round, self.name)) is not None:
            self.stop_reason = why
            return []
        wait_until_online(grid, nodes, self.settings.train.failures.rejoin_wait_s, f"{self.name} round {server_round}")
        if self.on_release is not None:
            self.on_release(server_round, cohort)
        noise = None if self.privacy is None else float(self.privacy.noise_multiplier)
        plan = plan_round(self.codec_state, self.settings.compression, self.name, server_round, noise)
        basis = self.codec_state.basis if sends_basis(self.settings.compression, plan) else None
        self._plans[server_round] = (plan, round_codec(self.settings.compression, plan, basis), cohort,
                                     time.perf_counter())
        half = half_precision(self.params) if self.settings.compression.downlink.method == "fp16" else None
        content = {"arrays": arrays if half is None else tensors_to_arrays(half),
                   "config": ConfigRecord(plan.to_record())}
        if basis is not None:
            content["basis"] = ArrayRecord({"float32": Array(packed_basis(self.codec_state))})
        return self._send(RecordDict(content), server_round, nodes, MessageType.TRAIN)

    def _send(self, record: RecordDict, server_round: int, nodes: list[int], kind: str) -> list[Message]:
        """One message of ``record`` per node, each on the ledger (content measured once: it is the same record)."""
        payload = sum(array_bytes(r) for r in record.values() if isinstance(r, ArrayRecord))
        content = wire_bytes(record)
        messages = [Message(content=record, dst_node_id=node, message_type=kind) for node in nodes]
        for node, message in zip(nodes, messages):
            header = header_bytes(message)
            self.ledger.record(Transfer(server_round, self._partition(node), "down", payload, content + header,
                                        self.dense_bytes, "train" if kind == MessageType.TRAIN else "evaluate",
                                        header))
        return messages

    def _to_reply(self, msg: Message, server_round: int) -> Reply:
        """A Flower reply as :class:`fedpower.round.Reply`, measured on the ledger when it carries content."""
        partition = self._partition(msg.metadata.src_node_id)
        if msg.has_error():
            return Reply(partition, error=str(msg.error.reason), dropout=is_simulated_dropout(msg))
        content = msg.content
        payload = array_bytes(content["payload"]) if "payload" in content else 0
        header = header_bytes(msg)
        self.ledger.record(Transfer(server_round, partition, "up", payload, wire_bytes(content) + header,
                                    self.dense_bytes, "train", header))
        if "payload" not in content or "metrics" not in content:
            return Reply(partition)
        try:  # numpy arrays only, never pickles (Flower loads them with allow_pickle=False)
            packed = {dtype: arr.numpy() for dtype, arr in content["payload"].items()}
        except (TypeError, ValueError, OSError) as err:
            return Reply(partition, invalid=f"payload arrays cannot be read: {err}")
        return Reply(partition, packed, dict(content["metrics"]))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand the replies to :func:`fedpower.round.server_step`; keep its parameters and codec state."""
        server_round += self.round_offset
        if server_round not in self._plans:
            return None, None  # stopped before this round was configured: nothing trained
        plan, codec, cohort, _ = self._plans[server_round]
        # Replies arrive in completion order; ledger and sums go in partition order, so runs repeat exactly.
        ordered = sorted(replies, key=lambda m: self._partition(m.metadata.src_node_id))
        outcome = server_step([self._to_reply(m, server_round) for m in ordered], plan, self.settings, codec,
                              params=self.params, optimizer=self.optimizer, codec_state=self.codec_state,
                              privacy=self.privacy, delay_key=DELAY_METRIC, sampled=len(cohort))
        if self.privacy is not None:
            self.privacy.record(cohort)  # every configured DP round releases, whoever replied
        self.stats[server_round] = outcome.stats
        if self.on_round is not None:
            self.on_round(outcome.stats)
        if outcome.params is None:
            return None, None
        self.params, self.codec_state = outcome.params, outcome.codec_state
        return tensors_to_arrays(self.params), MetricRecord({"train_loss": outcome.stats.train_loss,
                                                             "accepted": outcome.stats.accepted})

    def round_codec(self, server_round: int) -> Any:
        """The codec of a configured round (what its clients must encode with)."""
        return self._plans[server_round][1]

    def round_seconds(self, server_round: int) -> float:
        """Wall seconds since the round was configured."""
        started = self._plans.get(server_round, (None, None, None, float("nan")))[3]
        return time.perf_counter() - started

    # -- checkpoint state (fedpower/checkpoint.py writes it) ----------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything a resumed run needs to continue exactly: model, optimizer, codec state, accountant."""
        return strategy_state(self.name, self.params, self.optimizer, self.codec_state, self.privacy, self.stop_reason)

    def load_state(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` output (ValueError if it belongs to another model or strategy)."""
        self.params, self.codec_state, self.stop_reason = restore_strategy_state(
            arrays, meta, name=self.name, params=self.params, optimizer=self.optimizer,
            codec_state=self.codec_state, privacy=self.privacy)

    # -- federated evaluation (optional) --------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation on the sampled clients' own data, when enabled."""
        server_round += self.round_offset
        if not self.settings.train.federated_evaluation or self.halted():
            return []
        # On the ledger as evaluation traffic: it is downlink the clients pay for.
        record = RecordDict({"arrays": arrays, "config": ConfigRecord(RoundPlan(self.name, server_round).to_record())})
        return self._send(record, server_round, self.sampler(server_round), MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics."""
        server_round += self.round_offset
        replies = sorted(replies, key=lambda m: self._partition(m.metadata.src_node_id))
        for msg in replies:
            if not msg.has_error():
                header = header_bytes(msg)
                self.ledger.record(Transfer(server_round, self._partition(msg.metadata.src_node_id), "up", 0,
                                            wire_bytes(msg.content) + header, 0, "evaluate", header))
        rows = [m.content["metrics"] for m in replies if not m.has_error() and "metrics" in m.content]
        if not rows:
            return None
        weights = [float(r[NUM_EXAMPLES]) for r in rows]
        metrics = {key: float(np.average([r[key] for r in rows], weights=weights))
                   for key in ("eval_loss", "eval_accuracy")}
        self.federated_metrics[server_round] = metrics
        return MetricRecord(metrics)
