"""Low-rank building blocks shared by the PowerSGD codecs: which tensors to compress, batching of
same-shape matrices, orthogonalization and seeded random starts.

Every tensor of ≥ 2 dims is viewed as a matrix ``n × m`` with ``n = shape[0]`` and
``m = prod(shape[1:])`` (conv kernels ``out × in·kh·kw``, as in ``powerSGD_hook``).
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import torch

from fedpower.codecs.base import ArraySpec

#: (n, m, r') of one compressed tensor: matrix rows, matrix columns, effective rank.
MatrixDims = tuple[int, int, int]


def matrix_dims(shape: Sequence[int], rank: int) -> MatrixDims | None:
    """(n, m, r') of a tensor viewed as a matrix, or None when it has fewer than 2 dims or no elements."""
    if len(shape) < 2:
        return None
    n, m = int(shape[0]), math.prod(int(d) for d in shape[1:])
    effective_rank = min(rank, n, m)
    if effective_rank < 1:
        return None
    return n, m, effective_rank


def compressible(
    inputs: Mapping[str, ArraySpec], rank: int, min_compression_rate: float = 2.0,
    ranks: Mapping[str, int] | None = None,
) -> dict[str, MatrixDims]:
    """Name → (n, m, r') of the tensors whose rank-r' form saves at least ``min_compression_rate``.

    ``ranks`` gives some tensors their own rank (e.g. from a byte budget); the rest use ``rank``.
    """
    out: dict[str, MatrixDims] = {}
    for name, spec in inputs.items():
        dims = matrix_dims(tuple(spec.shape), (ranks or {}).get(name, rank))
        if dims is None:
            continue
        n, m, r = dims
        # n·m / (r·(n+m)) ≥ rate, written without division so equality is exact.
        if n * m >= min_compression_rate * r * (n + m):
            out[name] = dims
    return out


def max_rank(n: int, m: int, min_compression_rate: float) -> int:
    """Largest rank whose factors still save ``min_compression_rate`` on an n × m matrix (0: none does)."""
    rank = min(n, m, int(n * m // (min_compression_rate * (n + m))))
    # The very inequality ``compressible`` uses, so a rounding edge never makes the two disagree: the
    # float quotient above can land one below (19 × 19 at rate 1.9) or above the exact answer.
    while rank >= 1 and n * m < min_compression_rate * rank * (n + m):
        rank -= 1
    while rank < min(n, m) and n * m >= min_compression_rate * (rank + 1) * (n + m):
        rank += 1
    return rank


def group_by_dims(dims: Mapping[str, MatrixDims]) -> dict[MatrixDims, list[str]]:
    """Names grouped by (n, m, r'), in first-seen order, so each group runs as one batched op."""
    groups: dict[MatrixDims, list[str]] = defaultdict(list)
    for name, d in dims.items():
        groups[d].append(name)
    return dict(groups)


def stack(tensors: Mapping[str, torch.Tensor], names: Iterable[str], shape: tuple[int, ...]) -> torch.Tensor:
    """Stack ``tensors[name]`` reshaped to ``shape`` into one float32 batch (b, *shape)."""
    return torch.stack([tensors[name].detach().reshape(shape).to(torch.float32) for name in names])


def orthogonalize(batch: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Orthonormalize the columns of each matrix in a (b, n, r) batch; degenerate columns become 0.

    A column whose distance to the span of the earlier columns is at most ``eps`` × the largest
    column norm of *its own* matrix is treated as zero (scale-invariant, so tiny updates are not
    mistaken for zeros); all-zero input gives zeros, never NaN. Signs follow Gram–Schmidt
    (positive diagonal of R), so the result is the unique Gram–Schmidt basis when it exists.
    """
    if batch.ndim != 3 or batch.shape[2] > batch.shape[1]:
        raise ValueError(f"orthogonalize expects (b, n, r) with r <= n, got {tuple(batch.shape)}")
    batch = batch.to(torch.float32)
    if batch.shape[2] == 1:
        # Rank 1: each matrix by its own norm (a batch-wide norm would shrink small matrices to ~0).
        norms = torch.linalg.vector_norm(batch, dim=1, keepdim=True)
        return torch.where(norms > 0, batch / torch.where(norms > 0, norms, torch.ones_like(norms)), 0.0)
    # Householder QR: stable even when P's columns are nearly parallel (power iteration makes them so).
    basis, triangular = torch.linalg.qr(batch, mode="reduced")
    diagonal = triangular.diagonal(dim1=-2, dim2=-1)
    reference = torch.linalg.vector_norm(batch, dim=1).amax(dim=1, keepdim=True)
    keep = diagonal.abs() > eps * reference
    sign = torch.where(diagonal < 0, -1.0, 1.0)
    return basis * (sign * keep).unsqueeze(1)


def orthonormal_basis(batch: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning each (n, r) matrix's column space, completed when it is degenerate.

    Unlike :func:`orthogonalize` this never returns zero columns: bases and warm starts must stay
    full rank, or a round with a zero/rank-deficient update would freeze those directions forever.
    """
    if batch.ndim != 3 or batch.shape[2] > batch.shape[1]:
        raise ValueError(f"orthonormal_basis expects (b, n, r) with r <= n, got {tuple(batch.shape)}")
    basis, triangular = torch.linalg.qr(batch.to(torch.float32), mode="reduced")
    sign = torch.where(triangular.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0)
    return basis * sign.unsqueeze(1)


def seeded_gaussian(shape: tuple[int, ...], seed: int, name: str) -> torch.Tensor:
    """Standard Gaussian on CPU from a generator keyed by (seed, name).

    Keying by name (not by position) makes a tensor's start independent of which other tensors
    exist and of dict order, so server and clients agree; CPU generation makes it device-independent.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63))
    return torch.randn(shape, generator=generator, dtype=torch.float32)
