"""One Flower strategy for every compression method: FedAvg's sampling loop, our codecs and ledger.

Subclasses Flower's ``FedAvg`` and overrides only ``configure_train``/``aggregate_train`` (and the
evaluate pair): Flower's own aggregation multiplies arrays by float weights, which would average
int8 factors as floats, so decoding and aggregation go through ``fedpower.codecs``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpower.codecs import (
    PayloadError, basis_from_memory, build_codec, init_basis, is_shared, layout_of, next_basis, pack,
    update_basis_memory,
)
from fedpower.codecs.budget import ranks_for, spectra
from fedpower.codecs.packing import entropy_decode
from fedpower.codecs.receive import decode_contribution
from fedpower.codecs.base import Codec, weighted_sum
from fedpower.records import tensors_to_arrays
from fedpower.ledger import Ledger, Transfer
from fedpower.privacy import BudgetExceeded, PrivacyPlan, central_aggregate, contribution_norm
from fedpower.privacy import mean_aggregate
from fedpower.privacy import noise_generator as make_noise_generator
from fedpower.server_opt import ServerOptimizer
from clients.failures import DELAY_METRIC, is_simulated_dropout
from strategies.wire import array_bytes, wire_bytes

log = logging.getLogger("fedpower.strategy")


@dataclass
class RoundStats:
    """What one training round did (rejections and failures included)."""

    round: int
    sampled: int = 0
    accepted: int = 0
    failures: int = 0  # no usable reply: simulated dropouts, late replies and client errors
    dropouts: int = 0  # of the failures: simulated dropouts
    late: int = 0  # of the failures: replies past the round deadline
    rejected: int = 0  # replies refused by validation (payload, round/basis id, norm bound)
    reasons: list[str] = field(default_factory=list)
    train_loss: float = float("nan")
    client_metrics: list[dict[str, float]] = field(default_factory=list)  # per accepted reply
    largest_norm_ratio: float = float("nan")  # max over decodable replies of norm / the round's median norm
    kept_reason: str | None = None  # why the round kept the old model (None: the model was updated)


class CompressedFedAvg(FedAvg):
    """FedAvg whose clients send codec payloads; aggregation, server optimizer and ledger are ours."""

    def __init__(
        self, *, name: str, compression: Mapping[str, Any], params: Mapping[str, torch.Tensor],
        sampler: Callable[[int], list[int]], server_optimizer: ServerOptimizer, seed: int = 0,
        node_partitions: Mapping[int, int] | None = None, federated_evaluation: bool = False,
        min_valid_clients: int = 1, on_round: Callable[[RoundStats], None] | None = None,
        should_stop: Callable[[], bool] | None = None, privacy: PrivacyPlan | None = None,
        max_norm_ratio: float | None = None, round_deadline_s: float | None = None, rejoin_wait_s: float = 0.0,
    ) -> None:
        # Sampling and evaluation are driven by our own hooks; these only satisfy FedAvg's checks.
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=1, min_train_nodes=1)
        self.name = name
        self.compression = dict(compression)
        self.params = {k: v.detach().clone().float() for k, v in params.items()}
        self.inputs = layout_of(self.params)
        self.dense_bytes = sum(spec.nbytes for spec in self.inputs.values())
        self.sampler = sampler
        self.server_optimizer = server_optimizer
        self.node_partitions = dict(node_partitions or {})
        self.federated_evaluation = federated_evaluation
        self.min_valid_clients = min_valid_clients
        self.max_norm_ratio = max_norm_ratio  # reject replies with norm > this × the round's median (None: off)
        self.round_deadline_s = round_deadline_s  # replies with a larger simulated delay count as late
        self.rejoin_wait_s = rejoin_wait_s  # how long to wait for sampled nodes that are offline (rebooting)
        self.round_offset = 0  # rounds done before a resume: Flower's loop restarts at 1, our rounds do not
        self.on_round = on_round
        self.should_stop = should_stop or (lambda: False)
        self.ledger = Ledger()
        self.stats: dict[int, RoundStats] = {}
        self.federated_metrics: dict[int, dict[str, float]] = {}  # round → client-side evaluation
        self.shared = is_shared(self.compression)
        self.side = "left"
        self.basis = (init_basis(self.inputs, self.compression.get("rank", 4),
                                 self.compression.get("min_compression_rate", 2.0), seed) if self.shared else None)
        self.basis_version = 0  # bumped whenever the basis advances; clients echo the one they used
        self.memory: dict[str, torch.Tensor] | None = None  # shared mode, basis_memory > 0: decayed update sum
        self._round_basis_id = -1  # the basis id this round's replies must carry (-1: no basis sent)
        self._round_codec: Codec | None = None
        self._round_started: dict[int, float] = {}
        self.budget = self.compression.get("budget_bytes_per_round")
        self.ranks: dict[str, int] | None = None  # budget: this round's rank per matrix, sent to the clients
        self.energy: dict[str, list[float]] = {}  # budget: smoothed σ² per matrix from recent aggregates
        if self.budget is not None:
            self.ranks = self._allocate()
        self.seed = seed
        self.privacy = privacy  # DP: fixed weights, server noise (central) and the accountant
        self.stop_reason: str | None = None  # set when the privacy budget ends training early
        self._cohorts: dict[int, list[int]] = {}  # round → sampled partitions (accounting)

    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info("strategy %s: compression=%s", self.name, self.compression)
        if self.privacy is not None:
            log.info("strategy %s: %s", self.name, self.privacy.describe())

    @property
    def epsilon(self) -> float | None:
        """ε(δ) spent so far (None without DP)."""
        return None if self.privacy is None else self.privacy.epsilon

    def halted(self) -> bool:
        """Whether training must not go on (user stop or exhausted privacy budget)."""
        return self.stop_reason is not None or self.should_stop()

    def _budget_allows(self, server_round: int, cohort: list[int]) -> bool:
        """False (and the reason recorded) when this round would take ε past the budget."""
        plan = self.privacy
        if plan is None or not plan.would_exceed(cohort):
            return True
        next_epsilon = plan.epsilon_after(cohort)
        message = (f"strategy {self.name}: round {server_round} would take ε from {plan.epsilon:.4g} to "
                   f"{next_epsilon:.4g} > target_epsilon {plan.target_epsilon:g} (δ={plan.delta:g})")
        if plan.on_budget_exceeded == "error":
            raise BudgetExceeded(message)
        self.stop_reason = f"privacy budget: stopped before round {server_round} (ε={plan.epsilon:.4g})"
        log.warning("%s; stopping after round %d", message, server_round - 1)
        return False

    # -- round plumbing -------------------------------------------------------------------------
    def is_dense_round(self, server_round: int) -> bool:
        """Warm-up rounds send dense updates (epfml's start_compressing_after_num_steps)."""
        return server_round <= int(self.compression.get("start_after_rounds", 0) or 0)

    def round_codec(self, server_round: int) -> Codec:
        """The codec both ends use this round."""
        dense = self.is_dense_round(server_round)
        return build_codec(self.compression, dense=dense, basis=self.basis, side=self.side,  # type: ignore[arg-type]
                           ranks=self.ranks)

    def _allocate(self) -> dict[str, int]:
        """Ranks per matrix for the byte budget, from the smoothed spectra (uniform before any)."""
        return ranks_for(self.compression, self.inputs, self.energy)

    def _track_spectra(self, update: Mapping[str, torch.Tensor]) -> None:
        """Fold this round's aggregate spectra into the energy estimate and re-allocate the ranks."""
        assert self.ranks is not None
        try:
            fresh = spectra(update, list(self.ranks))
        except (torch.linalg.LinAlgError, RuntimeError) as err:  # keep this round's ranks rather than fail
            log.warning("%s: singular values failed (%s); ranks unchanged", self.name, err)
            return
        for name, values in fresh.items():
            old = self.energy.get(name, [])
            size = max(len(old), len(values))
            pad = lambda v: list(v) + [0.0] * (size - len(v))  # noqa: E731
            # Equal weight to the past: one round's aggregate is a noisy sample of the update's spectrum.
            self.energy[name] = [0.5 * a + 0.5 * b for a, b in zip(pad(old), pad(values))] if old else list(values)
        self.ranks = self._allocate()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
    ) -> Iterable[Message]:
        """One message per sampled node: global model, instructions and (shared mode) the basis."""
        server_round += self.round_offset
        if self.halted():
            return []
        nodes = self.sampler(server_round)
        cohort = [self.node_partitions.get(node, -1) for node in nodes]
        if not self._budget_allows(server_round, cohort):
            return []
        self._cohorts[server_round] = cohort
        self._wait_until_online(grid, nodes, server_round)
        self._round_started[server_round] = time.perf_counter()
        dense = self.is_dense_round(server_round)
        self._round_codec = self.round_codec(server_round)
        self._round_basis_id = self.basis_version if self.shared and not dense else -1
        round_config = ConfigRecord({"strategy": self.name, "server-round": server_round, "dense": dense,
                                     "side": self.side, "basis-id": self._round_basis_id})
        if self.ranks is not None and not dense:
            round_config["ranks"] = json.dumps(self.ranks, separators=(",", ":"))
        if self.privacy is not None:  # local DP clients add σ·C themselves; σ may have been calibrated here
            round_config["dp-noise-multiplier"] = float(self.privacy.noise_multiplier)
        if (self.compression.get("downlink") or {}).get("method", "none") == "fp16":
            half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in self.params.items()}
            if all(bool(torch.isfinite(v).all()) for v in half.values() if v.is_floating_point()):
                arrays = tensors_to_arrays(half)
            else:  # a weight beyond ±65504 would reach the clients as inf: send this round in fp32
                log.warning("%s round %d: model exceeds the float16 range; downlink sent as fp32", self.name,
                            server_round)
        content = {"arrays": arrays, "config": round_config}
        if self.shared and not dense:
            assert self.basis is not None
            packed = pack(self.basis, layout_of(self.basis))
            content["basis"] = ArrayRecord({"float32": Array(packed["float32"])})
        record = RecordDict(content)
        down_wire = wire_bytes(record)
        down_payload = array_bytes(arrays) + (array_bytes(content["basis"]) if "basis" in content else 0)
        self.stats[server_round] = RoundStats(round=server_round, sampled=len(nodes))
        for node in nodes:
            self.ledger.record(Transfer(server_round, self.node_partitions.get(node, -1), "down", down_payload,
                                        down_wire, self.dense_bytes))
        return [Message(content=record, dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]

    def _wait_until_online(self, grid: Grid, nodes: list[int], server_round: int) -> None:
        """Give sampled nodes that are offline (e.g. a SuperNode restarting) up to ``rejoin_wait_s`` to return.

        Why: a message to an offline node comes back as an error, so a device that reboots between
        its rounds would lose its next round although it is back seconds later.
        """
        if self.rejoin_wait_s <= 0 or not nodes:
            return
        deadline = time.monotonic() + self.rejoin_wait_s
        missing = set(nodes) - set(grid.get_node_ids())
        if missing:
            log.info("%s round %d: waiting up to %.0f s for %d offline node(s) to rejoin", self.name, server_round,
                     self.rejoin_wait_s, len(missing))
        while missing and time.monotonic() < deadline:
            time.sleep(0.5)
            missing -= set(grid.get_node_ids())
        if missing:
            log.warning("%s round %d: %d sampled node(s) still offline after %.0f s; their replies will fail",
                        self.name, server_round, len(missing), self.rejoin_wait_s)

    def _check_ids(self, metrics: Any, server_round: int) -> None:
        """Refuse a reply computed for another round or another shared basis (stale, replayed or misrouted)."""
        for key, expected in (("server-round", server_round), ("basis-id", self._round_basis_id)):
            value = metrics.get(key) if hasattr(metrics, "get") else None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != expected:
                raise PayloadError(f"reply {key} is {value!r}, expected {expected}")

    def _decode_reply(self, msg: Message, codec: Codec,
                      server_round: int) -> tuple[dict[str, torch.Tensor], float, dict[str, float]]:
        """(this client's contribution in the codec's linear space, its weight, its loss); raises PayloadError."""
        content = msg.content
        if "payload" not in content or "metrics" not in content:
            raise PayloadError("reply lacks the 'payload' or 'metrics' record")
        metrics = content["metrics"]
        self._check_ids(metrics, server_round)
        examples = metrics.get("num-examples", -1)
        if not isinstance(examples, (int, float)) or isinstance(examples, bool) or not np.isfinite(examples) \
                or examples <= 0:
            raise PayloadError(f"num-examples must be a positive number, got {examples!r}")
        examples = float(examples)
        try:  # numpy arrays only, never pickles (Flower loads them with allow_pickle=False)
            packed = {dtype: arr.numpy() for dtype, arr in content["payload"].items()}
        except (TypeError, ValueError, OSError) as err:
            raise PayloadError(f"payload arrays cannot be read: {err}") from err
        if self.compression.get("entropy_coding", "none") == "zlib":
            packed = entropy_decode(packed, codec.layout(self.inputs))
        contribution = decode_contribution(codec, packed, self.inputs)
        return contribution, examples, {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and decode every reply, aggregate (by examples, or DP's fixed weights), step the server."""
        server_round += self.round_offset
        if server_round not in self.stats:
            return None, None  # stopped before this round was configured: nothing trained
        stats = self.stats[server_round]
        codec = self._round_codec or self.round_codec(server_round)
        kept: list[tuple[int, dict[str, torch.Tensor], float, dict[str, float]]] = []
        # Replies arrive in completion order; sum in partition order so float results are reproducible.
        replies = sorted(replies, key=lambda m: self.node_partitions.get(m.metadata.src_node_id, -1))
        for msg in replies:
            partition = self.node_partitions.get(msg.metadata.src_node_id, -1)
            if msg.has_error():
                stats.failures += 1
                if is_simulated_dropout(msg):
                    stats.dropouts += 1
                else:
                    stats.reasons.append(f"partition {partition}: client error: {msg.error.reason[:200]}")
                continue
            payload = array_bytes(msg.content["payload"]) if "payload" in msg.content else 0
            self.ledger.record(Transfer(server_round, partition, "up", payload, wire_bytes(msg.content),
                                        self.dense_bytes))
            try:
                if self._is_late(msg):
                    stats.failures += 1
                    stats.late += 1
                    continue
                contribution, examples, client_metrics = self._decode_reply(msg, codec, server_round)
            except PayloadError as err:
                self._reject(stats, partition, str(err))
                continue
            kept.append((partition, contribution, examples, client_metrics))
        if self.max_norm_ratio is not None and (self.privacy is None or self.privacy.mode != "central"):
            kept = self._within_norm_bound(kept, stats)
        contributions = [c for _, c, _, _ in kept]
        weights = [w for _, _, w, _ in kept]
        losses = [m.get("train_loss", float("nan")) for _, _, _, m in kept]
        stats.client_metrics = [m for _, _, _, m in kept]
        stats.accepted = len(kept)
        if self.privacy is not None:
            # Every configured DP round releases (an empty cohort releases pure noise): skipping on a count
            # of valid replies would make the release depend on who took part.
            return self._aggregate_private(server_round, codec, contributions, losses, stats)
        if stats.accepted < self.min_valid_clients:
            return self._keep_model(server_round, stats, f"{stats.accepted} valid contribution(s) < "
                                    f"min_valid_clients {self.min_valid_clients}")
        total = sum(weights)
        reduced = weighted_sum(contributions, [w / total for w in weights])
        stats.train_loss = float(np.average(losses, weights=weights))
        return self._apply(server_round, codec, reduced, stats)

    def _is_late(self, msg: Message) -> bool:
        """Whether a reply's (simulated) delay is past the round deadline; PayloadError if unreadable."""
        if self.round_deadline_s is None or "metrics" not in msg.content:
            return False
        delay = msg.content["metrics"].get(DELAY_METRIC, 0.0)
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not np.isfinite(delay) or delay < 0:
            raise PayloadError(f"{DELAY_METRIC} must be a non-negative number, got {delay!r}")
        return float(delay) > self.round_deadline_s

    def _reject(self, stats: RoundStats, partition: int, why: str) -> None:
        """Count and log one refused reply."""
        stats.rejected += 1
        stats.reasons.append(f"partition {partition}: {why}")
        log.warning("round %d: rejected payload from partition %d: %s", stats.round, partition, why)

    def _within_norm_bound(self, kept: list[Any], stats: RoundStats) -> list[Any]:
        """Drop contributions whose norm exceeds max_norm_ratio × the round's (lower) median norm.

        The lower median of two is the smaller norm, so the bound works from two replies on; a zero
        median (most clients sent nothing) gives no scale to compare with, so nothing is dropped then.
        """
        norms = [contribution_norm(contribution) for _, contribution, _, _ in kept]
        if len(norms) < 2:
            return kept
        median = sorted(norms)[(len(norms) - 1) // 2]
        if not median > 0:
            return kept
        stats.largest_norm_ratio = max(norms) / median
        within = []
        for item, norm in zip(kept, norms):
            if norm > self.max_norm_ratio * median:  # type: ignore[operator]
                self._reject(stats, item[0], f"update norm {norm:.4g} is {norm / median:.1f}× the round's median "
                             f"{median:.4g} (max_norm_ratio {self.max_norm_ratio:g})")
            else:
                within.append(item)
        return within

    def _keep_model(self, server_round: int, stats: RoundStats,
                    why: str) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """End a round without touching the model, optimizer or basis; say why in the log and the results."""
        log.warning("round %d: %s; keeping the old model", server_round, why)
        stats.kept_reason = why
        stats.reasons.append(why)
        self._finish_round(server_round, stats)
        return None, None

    def _apply(self, server_round: int, codec: Codec, reduced: Mapping[str, torch.Tensor],
               stats: RoundStats) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Expand the linear-space aggregate, step the server optimizer, advance the shared basis."""
        update = codec.expand(reduced, self.inputs)
        if not all(bool(torch.isfinite(t).all()) for t in update.values()):
            # Finite contributions can still overflow when summed: never let Inf/NaN into the model.
            return self._keep_model(server_round, stats, "aggregate update is not finite")
        self.params = self.server_optimizer.step(self.params, update)
        if self.budget is not None and not self.is_dense_round(server_round):
            self._track_spectra(update)
        beta = float(self.compression.get("basis_memory", 0.0) or 0.0)
        if self.shared and beta > 0:  # dense warm-up rounds feed the memory too
            self.memory = update_basis_memory(self.memory, update, list(self.basis or {}), beta)
        if self.shared and not self.is_dense_round(server_round):
            if beta > 0:
                self.basis = basis_from_memory(self.memory, self.basis or {}, self.side,  # type: ignore[arg-type]
                                               steps=int(self.compression.get("basis_power_steps", 1)))
            else:
                self.basis = next_basis(reduced, self.side, names=list(self.basis or {}))  # type: ignore[arg-type]
            self.side = "right" if self.side == "left" else "left"
            self.basis_version += 1
        self._finish_round(server_round, stats)
        arrays = tensors_to_arrays(self.params)
        return arrays, MetricRecord({"train_loss": stats.train_loss, "accepted": stats.accepted})

    def _aggregate_private(
        self, server_round: int, codec: Codec, contributions: list[dict[str, torch.Tensor]], losses: list[float],
        stats: RoundStats,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """DP aggregation in the codec's linear space; every configured round releases and is accounted.

        Central: re-clip each contribution, sum, add N(0, σ²C²), divide by the expected cohort (an empty
        cohort releases pure noise). Local: the plain mean of the (already noisy) contributions.
        """
        plan = self.privacy
        assert plan is not None
        layout = codec.linear_layout(self.inputs)
        if plan.mode == "central":
            generator = make_noise_generator(plan.noise_seed, self.seed, server_round)
            reduced, info = central_aggregate(contributions, clip_norm=plan.clip_norm,
                                              noise_multiplier=plan.noise_multiplier,
                                              expected_cohort=plan.expected_cohort, layout=layout, generator=generator)
            if info["server_clipped"]:
                log.info("round %d: server re-clipped %d contribution(s) to C=%g", server_round,
                         int(info["server_clipped"]), plan.clip_norm)
        else:
            reduced = mean_aggregate(contributions, layout)
        plan.record(self._cohorts.get(server_round, []))
        finite = [loss for loss in losses if np.isfinite(loss)]
        stats.train_loss = float(np.mean(finite)) if finite else float("nan")
        return self._apply(server_round, codec, reduced, stats)

    def _finish_round(self, server_round: int, stats: RoundStats) -> None:
        """Notify the observer that a round's training part ended."""
        if self.on_round is not None:
            self.on_round(stats)

    # -- checkpoint state (fedpower/checkpoint.py writes it; numpy arrays + JSON-able metadata) ---------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything a resumed run needs to continue exactly: model, optimizer, basis, accountant."""
        arrays = {f"params/{k}": v.detach().cpu().numpy() for k, v in self.params.items()}
        for slot, tensors in self.server_optimizer.state.items():
            arrays.update({f"optimizer/{slot}/{k}": v.detach().cpu().numpy() for k, v in tensors.items()})
        for k, v in (self.basis or {}).items():
            arrays[f"basis/{k}"] = v.detach().cpu().numpy()
        for k, v in (self.memory or {}).items():
            arrays[f"memory/{k}"] = v.detach().cpu().numpy()
        meta: dict[str, Any] = {
            "name": self.name, "side": self.side, "basis_version": self.basis_version, "stop_reason": self.stop_reason,
            "basis_names": list(self.basis or {}), "memory_names": list(self.memory or {}),
            "optimizer_slots": {slot: list(tensors) for slot, tensors in self.server_optimizer.state.items()},
            "ranks": self.ranks, "energy": self.energy,
        }
        if self.privacy is not None:
            meta["privacy"] = {"accountant": self.privacy.accountant.state,
                               "noise_multiplier": self.privacy.noise_multiplier,
                               "participations": {str(p): n for p, n in self.privacy.participations.items()}}
        return arrays, meta

    def load_state(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` output (ValueError if it belongs to another model or strategy)."""
        if meta.get("name") != self.name:
            raise ValueError(f"checkpoint state is for strategy {meta.get('name')!r}, not {self.name!r}")
        params = {}
        for k, v in self.params.items():
            saved = arrays.get(f"params/{k}")
            if saved is None or tuple(saved.shape) != tuple(v.shape):
                raise ValueError(f"checkpoint has no parameter {k!r} of shape {tuple(v.shape)}")
            params[k] = torch.from_numpy(np.array(saved, dtype=np.float32))
        self.params = params
        self.server_optimizer.state = {
            slot: {k: torch.from_numpy(np.array(arrays[f"optimizer/{slot}/{k}"])) for k in names}
            for slot, names in meta.get("optimizer_slots", {}).items()}
        if self.shared:
            self.basis = {k: torch.from_numpy(np.array(arrays[f"basis/{k}"])) for k in meta["basis_names"]}
            names = meta.get("memory_names") or []
            self.memory = {k: torch.from_numpy(np.array(arrays[f"memory/{k}"])) for k in names} or None
        if self.budget is not None and meta.get("ranks") is not None:
            self.ranks = {str(k): int(v) for k, v in meta["ranks"].items()}
            self.energy = {str(k): [float(x) for x in v] for k, v in (meta.get("energy") or {}).items()}
        self.side = str(meta.get("side", "left"))
        self.basis_version = int(meta.get("basis_version", 0))
        self.stop_reason = meta.get("stop_reason")
        privacy = meta.get("privacy")
        if self.privacy is not None and privacy is not None:
            from fedpower.privacy import Accountant

            self.privacy.accountant = Accountant.restore(dict(privacy["accountant"]))
            self.privacy.noise_multiplier = float(privacy["noise_multiplier"])
            self.privacy.participations = {int(p): int(n) for p, n in privacy["participations"].items()}

    def round_seconds(self, server_round: int) -> float:
        """Wall seconds since the round was configured."""
        started = self._round_started.get(server_round)
        return time.perf_counter() - started if started is not None else float("nan")

    # -- federated evaluation (optional) --------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
    ) -> Iterable[Message]:
        """Federated evaluation on the sampled clients' own data, when enabled."""
        server_round += self.round_offset
        if not self.federated_evaluation or self.halted():
            return []
        record = RecordDict({"arrays": arrays, "config": ConfigRecord({"strategy": self.name,
                                                                          "server-round": server_round})})
        return [Message(content=record, dst_node_id=node, message_type=MessageType.EVALUATE)
                for node in self.sampler(server_round)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics."""
        server_round += self.round_offset
        rows = [m.content["metrics"] for m in replies if not m.has_error() and "metrics" in m.content]
        if not rows:
            return None
        weights = [float(r["num-examples"]) for r in rows]
        metrics = {
            "eval_loss": float(np.average([r["eval_loss"] for r in rows], weights=weights)),
            "eval_accuracy": float(np.average([r["eval_accuracy"] for r in rows], weights=weights)),
        }
        self.federated_metrics[server_round] = metrics
        return MetricRecord(metrics)
