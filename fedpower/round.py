"""One federated round as two pure functions: :func:`client_step` and :func:`server_step` (no Flower here).

The Flower ClientApp (``clients/app.py``) and strategy (``strategies/compressed.py``) only move
records in and out of these; benchmarks and tests call them directly, so there is one round loop.

- ``client_step(update, saved_state, plan, settings, ...) -> (payload, state, metrics)``: the codec
  of the round (with privacy stages under DP), error feedback against what is really sent, the
  packed (and optionally entropy-coded) payload.
- ``server_step(replies, plan, settings, codec, ...) -> RoundOutcome``: validate and decode every
  reply, aggregate (example-weighted, or DP's fixed weights with server noise), apply the server
  optimizer, and return the next server codec state (:mod:`fedpower.server_state`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from fedpower.codecs import PayloadError, layout_of, pack
from fedpower.codecs.base import ArraySpec, Codec, Tensors, weighted_sum
from fedpower.codecs.packing import entropy_decode, entropy_encode
from fedpower.codecs.receive import decode_contribution
from fedpower.config import StrategyConfig
from fedpower.plan import RoundPlan
from fedpower.experiment import planned_noise_multiplier
from fedpower.privacy import central_aggregate, client_privacy, contribution_norm, mean_aggregate, noise_generator
from fedpower.server_opt import ServerOptimizer
from fedpower.server_state import ServerCodecState, advance, round_codec

log = logging.getLogger("fedpower.round")

Payload = dict[str, np.ndarray]

#: Reply metric keys beyond the plan's echo (RoundPlan.echo).
NUM_EXAMPLES, TRAIN_LOSS, PARTITION = "num-examples", "train_loss", "partition-id"
STATE_NORM_IN, STATE_NORM_OUT, UPDATE_NORM = "state_norm_in", "state_norm_out", "update_norm"


# -- client ------------------------------------------------------------------------------------
def usable_state(saved: Optional[Mapping[str, np.ndarray]], fresh: Mapping[str, torch.Tensor]) -> Optional[Tensors]:
    """``saved`` as tensors like ``fresh`` if its names and shapes fit the codec, else None (start fresh).

    A warm-start ``*.Q`` may have another column count when ranks were re-allocated (the codec refits
    it), so those are matched by rows only.
    """
    if saved is None:
        return None

    def rows(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[:1] if name.endswith(".Q") and len(shape) == 2 else shape

    if {n: rows(n, tuple(t.shape)) for n, t in fresh.items()} != {n: rows(n, tuple(a.shape)) for n, a in saved.items()}:
        log.warning("saved client state does not fit the codec (%d saved arrays, %d expected, or shapes differ); "
                    "starting from a fresh state", len(saved), len(fresh))
        return None
    any_fresh = next(iter(fresh.values()), None)
    device = any_fresh.device if any_fresh is not None else "cpu"
    return {n: torch.from_numpy(np.asarray(a)).to(device=device, dtype=fresh[n].dtype) for n, a in saved.items()}


def client_codec(settings: StrategyConfig, plan: RoundPlan, basis: Optional[Tensors], partition: int) -> Codec:
    """The codec a client encodes with this round: the round's codec with its privacy stages (clip, local noise).

    Under local DP σ comes from the client's own settings (calibrated locally when only a budget is
    set); the server's plan may only raise it.
    """
    dp = None
    if settings.privacy is not None:
        noise = noise_generator(settings.noise_seed, settings.seed, plan.round, partition)
        dp = client_privacy(settings.privacy, calibrated=lambda: planned_noise_multiplier(settings),
                            server_sigma=plan.noise_multiplier, noise_generator=noise)
    return round_codec(settings.compression, plan, basis, privacy=dp)


def client_step(
    update: Mapping[str, torch.Tensor], saved_state: Optional[Mapping[str, np.ndarray]], plan: RoundPlan,
    settings: StrategyConfig, codec: Codec, *, partition: int, seed: int,
) -> tuple[Payload, Tensors, dict[str, float]]:
    """Encode one client's update for the round: (packed payload, codec state to keep, metrics).

    ``codec`` is the client's codec of the round (:func:`client_codec`); ``saved_state`` the state this
    client kept from its last round (None: fresh). Dense warm-up rounds neither use nor change the
    state (the returned state is then empty: keep the saved one).
    """
    inputs = layout_of(update)
    device = next(iter(update.values())).device
    fresh = codec.init_state(inputs, device, seed=settings.seed + partition)
    state = fresh if plan.dense else (usable_state(saved_state, fresh) or fresh)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    metrics = {STATE_NORM_IN: codec.residual_norm(state)}
    if settings.privacy is not None:
        metrics[UPDATE_NORM] = contribution_norm(update)  # to a trusted server only: helps choosing C
    encoded, new_state = codec.encode(update, None if plan.dense else state, generator)
    new_state = {} if plan.dense else new_state
    metrics[STATE_NORM_OUT] = metrics[STATE_NORM_IN] if plan.dense else codec.residual_norm(new_state)
    packed = pack(encoded, codec.layout(inputs))
    if settings.compression.entropy_coding == "zlib":
        packed = entropy_encode(packed)
    return packed, new_state, metrics


# -- server ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """One client's answer as the server received it, independent of the transport."""

    partition: int
    payload: Optional[Payload] = None  # packed arrays, one per dtype (None: the reply carried none)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    error: Optional[str] = None  # the client failed (a client error, or a simulated dropout)
    dropout: bool = False  # the error is a simulated dropout
    invalid: Optional[str] = None  # the transport could not read the reply: rejected with this reason


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
    kept_reason: Optional[str] = None  # why the round kept the old model (None: the model was updated)

    @property
    def discarded_after_commit(self) -> int:
        """Replies whose clients had already saved their new residual but which never reached the model.

        Their error-feedback mass is lost: the client subtracted what it sent from its residual. Rejected
        and late replies, and every accepted reply of a round that kept the old model.
        """
        return self.rejected + self.late + (self.accepted if self.kept_reason is not None else 0)

    def reject(self, partition: int, why: str) -> None:
        """Count and log one refused reply."""
        self.rejected += 1
        self.reasons.append(f"partition {partition}: {why}")
        log.warning("round %d: rejected payload from partition %d: %s", self.round, partition, why)


@dataclass(frozen=True)
class RoundOutcome:
    """The result of :func:`server_step`: new parameters (None: the old model is kept) and server codec state."""

    params: Optional[Tensors]
    codec_state: ServerCodecState
    stats: RoundStats


@dataclass(frozen=True)
class _Decoded:
    """A reply that passed validation: its contribution in the codec's linear space."""

    partition: int
    contribution: Tensors
    weight: float
    metrics: dict[str, float]


def decode_reply(reply: Reply, plan: RoundPlan, codec: Codec, inputs: Mapping[str, ArraySpec],
                 settings: StrategyConfig) -> _Decoded:
    """Validate one reply (echo, example count, arrays) and decode it; PayloadError says why not."""
    if reply.payload is None:
        raise PayloadError("reply lacks the 'payload' or 'metrics' record")
    plan.check_echo(reply.metrics)
    examples = reply.metrics.get(NUM_EXAMPLES, -1)
    if not isinstance(examples, (int, float)) or isinstance(examples, bool) or not np.isfinite(examples) \
            or examples <= 0:
        raise PayloadError(f"num-examples must be a positive number, got {examples!r}")
    packed = dict(reply.payload)
    if settings.compression.entropy_coding == "zlib":
        packed = entropy_decode(packed, codec.layout(inputs))
    contribution = decode_contribution(codec, packed, inputs)
    numbers = {k: float(v) for k, v in reply.metrics.items() if isinstance(v, (int, float))}
    return _Decoded(reply.partition, contribution, float(examples), numbers)


def is_late(metrics: Mapping[str, Any], deadline_s: Optional[float], key: str) -> bool:
    """Whether a reply's (simulated) delay is past the round deadline; PayloadError if unreadable."""
    if deadline_s is None:
        return False
    delay = metrics.get(key, 0.0)
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not np.isfinite(delay) or delay < 0:
        raise PayloadError(f"{key} must be a non-negative number, got {delay!r}")
    return float(delay) > deadline_s


def _within_norm_bound(kept: list[_Decoded], ratio: float, stats: RoundStats) -> list[_Decoded]:
    """Drop contributions whose norm exceeds ``ratio`` × the round's (lower) median norm.

    The lower median of two is the smaller norm, so the bound works from two replies on; a zero
    median (most clients sent nothing) gives no scale to compare with, so nothing is dropped then.
    """
    norms = [contribution_norm(item.contribution) for item in kept]
    if len(norms) < 2:
        return kept
    median = sorted(norms)[(len(norms) - 1) // 2]
    if not median > 0:
        return kept
    stats.largest_norm_ratio = max(norms) / median
    within = []
    for item, norm in zip(kept, norms):
        if norm > ratio * median:
            stats.reject(item.partition, f"update norm {norm:.4g} is {norm / median:.1f}× the round's median "
                                         f"{median:.4g} (max_norm_ratio {ratio:g})")
        else:
            within.append(item)
    return within


def _collect(replies: Sequence[Reply], plan: RoundPlan, settings: StrategyConfig, codec: Codec,
             inputs: Mapping[str, ArraySpec], stats: RoundStats, delay_key: str) -> list[_Decoded]:
    """Count failures, refuse late or invalid replies, decode the rest (in partition order)."""
    kept = []
    # Replies arrive in completion order; sum in partition order so float results are reproducible.
    for reply in sorted(replies, key=lambda r: r.partition):
        if reply.error is not None:
            stats.failures += 1
            if reply.dropout:
                stats.dropouts += 1
            else:
                stats.reasons.append(f"partition {reply.partition}: client error: {reply.error[:200]}")
            continue
        try:
            if reply.invalid is not None:
                raise PayloadError(reply.invalid)
            if is_late(reply.metrics, settings.train.failures.round_deadline_s, delay_key):
                stats.failures += 1
                stats.late += 1
                continue
            kept.append(decode_reply(reply, plan, codec, inputs, settings))
        except PayloadError as err:
            stats.reject(reply.partition, str(err))
    return kept


def server_step(
    replies: Sequence[Reply], plan: RoundPlan, settings: StrategyConfig, codec: Codec, *,
    params: Mapping[str, torch.Tensor], optimizer: ServerOptimizer, codec_state: ServerCodecState,
    privacy: Any = None, delay_key: str = "reply-delay-s", sampled: int = 0,
) -> RoundOutcome:
    """Validate, decode and aggregate one round's replies; step the server optimizer; advance the codec state.

    ``privacy`` is the strategy's :class:`~fedpower.privacy.PrivacyPlan` (None without DP): central DP
    re-clips every contribution, sums, adds N(0, σ²C²) and divides by the expected cohort; local DP
    takes the plain mean of the already noisy contributions. Every DP round releases, whoever replied.
    ``optimizer`` keeps its own moment buffers (it is the strategy's server optimizer).
    """
    inputs = layout_of(params)
    stats = RoundStats(round=plan.round, sampled=sampled)
    kept = _collect(replies, plan, settings, codec, inputs, stats, delay_key)
    ratio = settings.train.robustness.max_norm_ratio
    central = privacy is not None and privacy.mode == "central"
    if ratio is not None and not central:
        kept = _within_norm_bound(kept, ratio, stats)
    stats.client_metrics = [item.metrics for item in kept]
    stats.accepted = len(kept)
    losses = [item.metrics.get(TRAIN_LOSS, float("nan")) for item in kept]
    if privacy is not None:
        reduced = _private_reduce([item.contribution for item in kept], codec, inputs, privacy, settings, plan)
        finite = [loss for loss in losses if np.isfinite(loss)]
        stats.train_loss = float(np.mean(finite)) if finite else float("nan")
    elif stats.accepted < settings.train.robustness.min_valid_clients:
        return _keep(stats, codec_state, f"{stats.accepted} valid contribution(s) < min_valid_clients "
                                         f"{settings.train.robustness.min_valid_clients}")
    else:
        total = sum(item.weight for item in kept)
        reduced = weighted_sum([item.contribution for item in kept], [item.weight / total for item in kept])
        stats.train_loss = float(np.average(losses, weights=[item.weight for item in kept]))
    update = codec.expand(reduced, inputs)
    if not all(bool(torch.isfinite(t).all()) for t in update.values()):
        # Finite contributions can still overflow when summed: never let Inf/NaN into the model.
        return _keep(stats, codec_state, "aggregate update is not finite")
    new_params = optimizer.step(params, update)
    return RoundOutcome(new_params, advance(codec_state, settings.compression, plan, update, reduced), stats)


def _private_reduce(contributions: list[Tensors], codec: Codec, inputs: Mapping[str, ArraySpec], privacy: Any,
                    settings: StrategyConfig, plan: RoundPlan) -> Tensors:
    """DP aggregation in the codec's linear space (an empty cohort releases pure noise under central DP)."""
    layout = codec.linear_layout(inputs)
    if privacy.mode != "central":
        return mean_aggregate(contributions, layout)
    generator = noise_generator(privacy.noise_seed, settings.seed, plan.round)
    reduced, info = central_aggregate(contributions, clip_norm=privacy.clip_norm,
                                      noise_multiplier=privacy.noise_multiplier,
                                      expected_cohort=privacy.expected_cohort, layout=layout, generator=generator)
    if info["server_clipped"]:
        log.info("round %d: server re-clipped %d contribution(s) to C=%g", plan.round, int(info["server_clipped"]),
                 privacy.clip_norm)
    return reduced


def _keep(stats: RoundStats, codec_state: ServerCodecState, why: str) -> RoundOutcome:
    """End a round without touching the model, optimizer or codec state; say why in the log and the results."""
    log.warning("round %d: %s; keeping the old model", stats.round, why)
    stats.kept_reason = why
    stats.reasons.append(why)
    return RoundOutcome(None, codec_state, stats)
