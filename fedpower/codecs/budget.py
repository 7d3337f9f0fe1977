"""Rank per tensor under a byte budget (L-GreCo-style): spend each message's bytes where they capture most.

The uplink payload of independent PowerSGD is Σ_l r_l·(n_l + m_l) factor values plus the tensors sent
dense (biases, small layers). Given per-tensor spectra (σ² of a recent update, largest first),
rank k+1 of tensor l captures σ²_{l,k+1} more energy for (n_l + m_l) more values, so the greedy choice
by energy per byte is optimal for decreasing spectra (each tensor's gains are concave in its rank),
which is the error-minimising allocation of L-GreCo (Markov et al., 2023) solved exactly for this
separable case. Without spectra the budget is spread as a uniform rank.
"""

from __future__ import annotations

import heapq
import math
from typing import Mapping, Sequence

import torch

from fedpower.codecs.base import ArraySpec
from fedpower.codecs.lowrank import matrix_dims, max_rank


def bytes_per_value(bits: int | None, block_size: int = 128) -> float:
    """Uplink bytes per sent number: fp32, fp16, or n-bit codes plus one float16 scale per block."""
    if bits is None:
        return 4.0
    if bits == 16:
        return 2.0
    return bits / 8 + 2 / block_size


def _candidates(inputs: Mapping[str, ArraySpec], min_compression_rate: float) -> dict[str, tuple[int, int, int]]:
    """Name → (n, m, highest useful rank) of the tensors that can be sent low rank at all."""
    out = {}
    for name, spec in inputs.items():
        dims = matrix_dims(tuple(spec.shape), 1)
        if dims is None:
            continue
        n, m, _ = dims
        top = max_rank(n, m, min_compression_rate)
        if top >= 1:
            out[name] = (n, m, top)
    return out


def minimum_budget(inputs: Mapping[str, ArraySpec], *, bits: int | None, block_size: int = 128,
                   min_compression_rate: float = 2.0) -> float:
    """Bytes of the cheapest message: rank 1 everywhere plus the tensors sent dense."""
    per_value = bytes_per_value(bits, block_size)
    candidates = _candidates(inputs, min_compression_rate)
    dense = sum(math.prod(spec.shape) for name, spec in inputs.items() if name not in candidates)
    return per_value * (dense + sum(n + m for n, m, _ in candidates.values()))


def allocate_ranks(
    inputs: Mapping[str, ArraySpec], budget_bytes: float, *, bits: int | None, block_size: int = 128,
    min_compression_rate: float = 2.0, energy: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, int]:
    """Rank per compressible tensor so one client's payload fits ``budget_bytes``, maximising captured energy.

    ``energy[name]`` are σ² of that tensor's recent update, largest first (missing: spread uniformly).
    ValueError when even rank 1 everywhere does not fit.
    """
    per_value = bytes_per_value(bits, block_size)
    candidates = _candidates(inputs, min_compression_rate)
    floor = minimum_budget(inputs, bits=bits, block_size=block_size, min_compression_rate=min_compression_rate)
    if budget_bytes < floor:
        raise ValueError(f"budget_bytes_per_round {budget_bytes:.0f} B is below the smallest message, "
                         f"{floor:.0f} B (rank 1 for every matrix plus the dense tensors)")
    ranks = {name: 1 for name in candidates}
    left = budget_bytes - floor
    if not energy:
        grew = True
        while grew:  # uniform: one more rank for every tensor that has room, in turn
            grew = False
            for name, (n, m, top) in candidates.items():
                cost = per_value * (n + m)
                if ranks[name] < top and cost <= left:
                    ranks[name] += 1
                    left -= cost
                    grew = True
        return ranks

    def gain(name: str, rank: int) -> float:
        values = energy.get(name, ())
        return float(values[rank]) if rank < len(values) else 0.0

    heap = [(-gain(name, 1) / (n + m), name) for name, (n, m, _) in candidates.items()]
    heapq.heapify(heap)
    while heap:
        neg, name = heapq.heappop(heap)
        n, m, top = candidates[name]
        cost = per_value * (n + m)
        if -neg <= 0 or ranks[name] >= top or cost > left:
            continue  # nothing left to gain here, or no room: the next-best tensor may still fit
        ranks[name] += 1
        left -= cost
        heapq.heappush(heap, (-gain(name, ranks[name]) / (n + m), name))
    return ranks


def spectra(update: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, list[float]]:
    """σ² (largest first) of each named tensor viewed as an n × m matrix."""
    out = {}
    for name in names:
        tensor = update[name].detach().to(torch.float32)
        matrix = tensor.reshape(tensor.shape[0], -1)
        out[name] = (torch.linalg.svdvals(matrix) ** 2).tolist()
    return out
