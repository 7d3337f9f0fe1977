"""Rank per tensor under a byte budget (L-GreCo-style): spend each message's bytes where they capture most.

The uplink payload of independent PowerSGD is Σ_l r_l·(n_l + m_l) factor values plus the tensors sent
dense (biases, small layers); bytes are counted from the codec's own layouts (codes, scales, headers),
so the budget is the payload the ledger measures per message (Flower's framing comes on top).
Given per-tensor spectra (σ² of a recent update, largest first), rank k+1 of tensor l captures σ²_{l,k+1} more energy for (n_l + m_l) more values, so the greedy choice
by energy per byte is optimal for decreasing spectra (each tensor's gains are concave in its rank),
which is the error-minimising allocation of L-GreCo (Markov et al., 2023) solved exactly for this
separable case. Without spectra the budget is spread as a uniform rank.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch

from fedpower.codecs.base import ArraySpec
from fedpower.codecs.lowrank import compressible, max_rank
from fedpower.codecs.quantize import Quantize

if TYPE_CHECKING:
    from fedpower.config import CompressionConfig


NPY_HEADER_BYTES = 128  # each packed dtype buffer travels as one .npy array with a 128-byte header


def payload_sizer(bits: int | None, block_size: int = 128) -> Callable[[Mapping[str, ArraySpec]], int]:
    """Bytes of the arrays a layout becomes on the uplink: fp32, or quantized (codes + float16 scales)."""
    if bits is None:
        return lambda layout: sum(4 * math.prod(spec.shape) for spec in layout.values())
    quantizer = Quantize(bits=bits, block_size=block_size)
    return lambda layout: sum(spec.nbytes for spec in quantizer.layout(dict(layout)).values())


def _factor_bytes(size: Callable[[Mapping[str, ArraySpec]], int], n: int, m: int, rank: int) -> int:
    """Bytes of one matrix's P (n × r) and Q (m × r) as sent."""
    return size({"P": ArraySpec((n, rank)), "Q": ArraySpec((m, rank))}) if rank > 0 else 0


def _candidates(inputs: Mapping[str, ArraySpec], min_compression_rate: float) -> dict[str, tuple[int, int, int]]:
    """Name → (n, m, highest useful rank) of the tensors that can be sent low rank at all."""
    return {name: (n, m, max_rank(n, m, min_compression_rate))
            for name, (n, m, _) in compressible(inputs, 1, min_compression_rate).items()}


def message_bytes(inputs: Mapping[str, ArraySpec], ranks: Mapping[str, int], *, bits: int | None,
                  block_size: int = 128, min_compression_rate: float = 2.0) -> int:
    """Payload bytes of one client message at these ranks, as the ledger counts them (.npy headers included)."""
    size = payload_sizer(bits, block_size)
    candidates = _candidates(inputs, min_compression_rate)
    dense = {name: spec for name, spec in inputs.items() if name not in candidates}
    factors = sum(_factor_bytes(size, n, m, ranks.get(name, 1)) for name, (n, m, _) in candidates.items())
    buffers = 1 if bits in (None, 16) else 2  # fp32/fp16 values; or codes + float16 scales
    return size(dense) + factors + NPY_HEADER_BYTES * buffers


def minimum_budget(inputs: Mapping[str, ArraySpec], *, bits: int | None, block_size: int = 128,
                   min_compression_rate: float = 2.0) -> int:
    """Bytes of the cheapest message: rank 1 for every matrix plus the tensors sent dense."""
    return message_bytes(inputs, {}, bits=bits, block_size=block_size, min_compression_rate=min_compression_rate)


def allocate_ranks(
    inputs: Mapping[str, ArraySpec], budget_bytes: float, *, bits: int | None, block_size: int = 128,
    min_compression_rate: float = 2.0, energy: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, int]:
    """Rank per compressible tensor so one client's payload fits ``budget_bytes``, maximising captured energy.

    ``energy[name]`` are σ² of that tensor's recent update, largest first. Without any energy the
    budget is spread as a uniform rank; with energy, a tensor that has none stays at rank 1.
    ValueError when even rank 1 everywhere does not fit.
    """
    size = payload_sizer(bits, block_size)
    candidates = _candidates(inputs, min_compression_rate)
    floor = minimum_budget(inputs, bits=bits, block_size=block_size, min_compression_rate=min_compression_rate)
    if budget_bytes < floor:
        raise ValueError(f"the byte budget, {budget_bytes:.0f} B, is below the smallest message, "
                         f"{floor:.0f} B (rank 1 for every matrix plus the dense tensors)")
    ranks = {name: 1 for name in candidates}
    left = budget_bytes - floor

    def step_cost(name: str) -> int:
        n, m, _ = candidates[name]
        return _factor_bytes(size, n, m, ranks[name] + 1) - _factor_bytes(size, n, m, ranks[name])

    if not energy:
        grew = True
        while grew:  # uniform: one more rank for every tensor that has room, in turn
            grew = False
            for name, (_, _, top) in candidates.items():
                cost = step_cost(name)
                if ranks[name] < top and cost <= left:
                    ranks[name] += 1
                    left -= cost
                    grew = True
        return ranks

    def gain(name: str) -> float:
        values = energy.get(name, ())
        return float(values[ranks[name]]) if ranks[name] < len(values) else 0.0

    heap = [(-gain(name) / step_cost(name), name) for name in candidates]
    heapq.heapify(heap)
    while heap:
        neg, name = heapq.heappop(heap)
        cost = step_cost(name)
        if -neg <= 0 or ranks[name] >= candidates[name][2] or cost > left:
            continue  # nothing left to gain here, or no room: the next-best tensor may still fit
        ranks[name] += 1
        left -= cost
        heapq.heappush(heap, (-gain(name) / step_cost(name), name))
    return ranks


def budget_bytes(compression: "CompressionConfig", inputs: Mapping[str, ArraySpec]) -> float:
    """One client's payload budget in bytes: ``budget_bytes_per_round``, or dense fp32 bytes / ``budget_reduction``."""
    if compression.budget_bytes_per_round is not None:
        return float(compression.budget_bytes_per_round)
    if compression.budget_reduction is None:
        raise ValueError("no byte budget: set compression.budget_bytes_per_round or budget_reduction")
    return payload_sizer(None)(inputs) / compression.budget_reduction  # dense fp32 bytes of the update


def ranks_for(compression: "CompressionConfig | Mapping[str, object]", inputs: Mapping[str, ArraySpec],
              energy: Mapping[str, Sequence[float]] | None = None) -> dict[str, int]:
    """:func:`allocate_ranks` with the budget, bits, block size and rate of a strategy's ``compression``."""
    from fedpower.codecs.factory import as_compression  # the factory imports this module's sizes

    settings = as_compression(compression)
    return allocate_ranks(inputs, budget_bytes(settings, inputs), bits=settings.quantize_bits,
                          block_size=settings.block_size, min_compression_rate=settings.min_compression_rate,
                          energy=energy)


def spectra(update: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, list[float]]:
    """σ² (largest first) of each named tensor viewed as an n × m matrix."""
    out = {}
    for name in names:
        tensor = update[name].detach().to(torch.float32)
        matrix = tensor.reshape(tensor.shape[0], -1)
        out[name] = (torch.linalg.svdvals(matrix) ** 2).tolist()
    return out
