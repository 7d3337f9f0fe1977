"""Server-side codec state as explicit ``init``/``advance`` values, like the codecs' own state.

What the server must remember between rounds for the clients' codec: the shared PowerSGD basis
(its side and version), the decayed update memory the basis may track, and the byte-budget rank
allocation with its smoothed spectra. :func:`init_server_state` makes it, :func:`plan_round` turns it
into the round's :class:`~fedpower.plan.RoundPlan`, :func:`advance` returns the next state from the
round's aggregate; nothing is mutated. :func:`to_arrays`/:func:`from_arrays` checkpoint it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

import numpy as np
import torch

from fedpower.codecs import build_codec, init_basis, is_shared, layout_of, pack
from fedpower.codecs.base import ArraySpec, Codec, Tensors
from fedpower.codecs.budget import ranks_for, spectra
from fedpower.codecs.powersgd import basis_from_memory, basis_layout, next_basis, update_basis_memory
from fedpower.config import CompressionConfig
from fedpower.plan import RoundPlan, Side

log = logging.getLogger("fedpower.server_state")


@dataclass(frozen=True)
class ServerCodecState:
    """What the server's side of a codec carries from one round to the next."""

    basis: Optional[Tensors] = None  # shared PowerSGD: the orthonormal basis sent next round
    side: Side = "left"  # shared PowerSGD: which factor the clients send next round
    basis_version: int = 0  # bumped whenever the basis advances; replies echo the one they used
    memory: Optional[Tensors] = None  # shared PowerSGD with basis_memory > 0: decayed sum of updates
    ranks: Optional[dict[str, int]] = None  # byte budget: next round's rank per matrix
    energy: dict[str, list[float]] = field(default_factory=dict)  # byte budget: smoothed σ² per matrix


def is_dense_round(compression: CompressionConfig, server_round: int) -> bool:
    """Warm-up rounds send dense updates (epfml's start_compressing_after_num_steps)."""
    return server_round <= compression.start_after_rounds


def init_server_state(compression: CompressionConfig, inputs: Mapping[str, ArraySpec], seed: int) -> ServerCodecState:
    """The state before round 1: a seeded basis (shared mode), uniform ranks (byte budget)."""
    basis = init_basis(inputs, compression.rank, compression.min_compression_rate, seed) if is_shared(compression) \
        else None
    ranks = ranks_for(compression, inputs) if compression.uses_budget else None
    return ServerCodecState(basis=basis, ranks=ranks)


def plan_round(state: ServerCodecState, compression: CompressionConfig, strategy: str, server_round: int,
               noise_multiplier: Optional[float] = None) -> RoundPlan:
    """The round's instructions to the clients."""
    dense = is_dense_round(compression, server_round)
    return RoundPlan(strategy=strategy, round=server_round, dense=dense, side=state.side,
                     basis_id=state.basis_version if is_shared(compression) and not dense else -1,
                     ranks=None if dense or state.ranks is None else dict(state.ranks),
                     noise_multiplier=noise_multiplier)


def round_codec(compression: CompressionConfig, plan: RoundPlan, basis: Optional[Tensors],
                privacy: Any = None) -> Codec:
    """The codec of the round ``plan`` describes; ``privacy`` (a client's ClientPrivacy) adds its DP stages.

    The server decodes with the codec without DP stages: they change values, never the layout or the
    linear space.
    """
    return build_codec(compression, dense=plan.dense, basis=basis, side=plan.side, ranks=plan.ranks, privacy=privacy)


def sends_basis(compression: CompressionConfig, plan: RoundPlan) -> bool:
    """Whether the round's message carries the shared basis."""
    return is_shared(compression) and not plan.dense


def packed_basis(state: ServerCodecState) -> np.ndarray:
    """The basis as the one flat float32 array the round message carries."""
    assert state.basis is not None
    return pack(state.basis, layout_of(state.basis))["float32"]


def received_basis_layout(compression: CompressionConfig, plan: RoundPlan,
                          inputs: Mapping[str, ArraySpec]) -> dict[str, ArraySpec]:
    """Layout of the basis a client receives (derived on both ends, never sent)."""
    return basis_layout(inputs, compression.rank, compression.min_compression_rate, plan.side)


def advance(state: ServerCodecState, compression: CompressionConfig, plan: RoundPlan,
            update: Mapping[str, torch.Tensor], reduced: Mapping[str, torch.Tensor]) -> ServerCodecState:
    """The state after a round whose dense ``update`` (and linear-space aggregate ``reduced``) was applied."""
    new = state
    if new.ranks is not None and not plan.dense:
        new = _track_spectra(new, compression, update)
    if not is_shared(compression):
        return new
    names = list(new.basis or {})
    memory = new.memory
    if compression.basis_memory > 0:  # dense warm-up rounds feed the memory too
        memory = update_basis_memory(memory, update, names, compression.basis_memory)
    if plan.dense:
        return replace(new, memory=memory)
    if compression.basis_memory > 0:
        basis = basis_from_memory(memory or {}, new.basis or {}, new.side, steps=compression.basis_power_steps)
    else:
        basis = next_basis(reduced, new.side, names=names)
    return replace(new, basis=basis, memory=memory, side="right" if new.side == "left" else "left",
                   basis_version=new.basis_version + 1)


def _track_spectra(state: ServerCodecState, compression: CompressionConfig,
                   update: Mapping[str, torch.Tensor]) -> ServerCodecState:
    """Fold this round's aggregate spectra into the energy estimate and re-allocate the ranks."""
    assert state.ranks is not None
    try:
        fresh = spectra(update, list(state.ranks))
    except (torch.linalg.LinAlgError, RuntimeError) as err:  # keep this round's ranks rather than fail
        log.warning("singular values failed (%s); ranks unchanged", err)
        return state
    energy = dict(state.energy)
    for name, values in fresh.items():
        old = energy.get(name, [])
        size = max(len(old), len(values))
        padded_old, padded_new = list(old) + [0.0] * (size - len(old)), list(values) + [0.0] * (size - len(values))
        # Equal weight to the past: one round's aggregate is a noisy sample of the update's spectrum.
        energy[name] = [0.5 * a + 0.5 * b for a, b in zip(padded_old, padded_new)] if old else list(values)
    inputs = layout_of(update)
    return replace(state, energy=energy, ranks=ranks_for(compression, inputs, energy))


def to_arrays(state: ServerCodecState) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, JSON-able metadata) for a checkpoint."""
    arrays = {f"basis/{k}": v.detach().cpu().numpy() for k, v in (state.basis or {}).items()}
    arrays.update({f"memory/{k}": v.detach().cpu().numpy() for k, v in (state.memory or {}).items()})
    meta = {"side": state.side, "basis_version": state.basis_version, "basis_names": list(state.basis or {}),
            "memory_names": list(state.memory or {}), "ranks": state.ranks, "energy": state.energy}
    return arrays, meta


def from_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                initial: ServerCodecState) -> ServerCodecState:
    """The state a checkpoint holds (``initial`` says which parts this strategy has)."""
    def tensors(prefix: str, names: Any) -> Optional[Tensors]:
        return {k: torch.from_numpy(np.array(arrays[f"{prefix}/{k}"])) for k in names or []} or None

    ranks = initial.ranks
    energy = initial.energy
    if initial.ranks is not None and meta.get("ranks") is not None:
        ranks = {str(k): int(v) for k, v in meta["ranks"].items()}
        energy = {str(k): [float(x) for x in v] for k, v in (meta.get("energy") or {}).items()}
    side = str(meta.get("side", "left"))
    return ServerCodecState(
        basis=tensors("basis", meta.get("basis_names")) if initial.basis is not None else None,
        side="right" if side == "right" else "left", basis_version=int(meta.get("basis_version", 0)),
        memory=tensors("memory", meta.get("memory_names")) if initial.basis is not None else None,
        ranks=ranks, energy=energy)
