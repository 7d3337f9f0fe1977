"""PowerSGD low-rank compression for federated updates (DESIGN §2).

Two modes:

- :class:`PowerSGD` ("independent"): each client keeps a warm-started ``Q`` per tensor and runs power
  iteration on its own update (``P = M Q; P = orth(P); Q = Mᵀ P``), sending ``P`` and ``Q``.
  ``deflation=True`` finds the rank-r components one at a time on the deflated residual
  (epfml "Algorithm 2", arXiv 2008.01425). The server sums ``w_i P_i Q_iᵀ``.
- :class:`SharedPowerSGD` ("shared"): the server broadcasts an orthonormal basis per tensor and
  clients send one factor (``M Q̂`` or ``Mᵀ P̂``); aggregation is linear in the factors, so secure
  aggregation and central DP work in the small factor space. The server alternates sides
  (:func:`next_basis`).

Tensors whose low-rank form would not save ``min_compression_rate`` (biases, small layers) are
passed through dense, float32, under their own name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

import torch

from fedpower.codecs.base import ArraySpec, Codec, Layout, Tensors, scale_tensor, validate, weighted_sum
from fedpower.codecs.lowrank import (
    MatrixDims,
    compressible,
    group_by_dims,
    orthogonalize,
    orthonormal_basis,
    seeded_gaussian,
    stack,
)

__all__ = [
    "PowerSGD", "SharedPowerSGD", "Side", "basis_layout", "compressible", "init_basis", "next_basis",
    "orthogonalize",
]

Side = Literal["left", "right"]


def _dense_layout(inputs: Mapping[str, ArraySpec], dims: Mapping[str, MatrixDims]) -> Layout:
    """Layout of the tensors that are not compressed: their own name and shape, float32."""
    return {name: ArraySpec(tuple(spec.shape), torch.float32) for name, spec in inputs.items() if name not in dims}


def _merge_layouts(*parts: Layout) -> Layout:
    """Union of layouts; a name clash (e.g. a parameter literally called ``w.P``) is a configuration error."""
    out: Layout = {}
    for part in parts:
        for name, spec in part.items():
            if name in out:
                raise ValueError(f"encoded name {name!r} is produced twice; rename the model tensor")
            out[name] = spec
    return out


def _dense_passthrough(tensors: Mapping[str, torch.Tensor], dims: Mapping[str, MatrixDims]) -> Tensors:
    """Uncompressed tensors as float32 copies (a copy, so later in-place edits by the caller cannot leak in)."""
    return {name: t.detach().to(torch.float32).clone() for name, t in tensors.items() if name not in dims}


def _keep_nonzero_columns(new: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """New warm start, but columns that came out zero keep their previous direction (no rank collapse)."""
    alive = torch.linalg.vector_norm(new, dim=-2, keepdim=True) > 0
    return torch.where(alive, new, previous)


def _resized_warm_start(q: torch.Tensor | None, name: str, m: int, r: int) -> torch.Tensor:
    """The saved Q of a tensor fitted to rank r: extra columns seeded Gaussian, surplus columns dropped.

    Ranks change when a byte budget is re-allocated between rounds; the warm start of the kept
    directions is still good, so it is kept instead of restarting cold.
    """
    if q is None or q.ndim != 2 or q.shape[0] != m:
        raise ValueError(f"{name}: PowerSGD state needs '{name}.Q' with {m} rows; use init_state")
    if q.shape[1] == r:
        return q
    if q.shape[1] > r:
        return q[:, :r]
    extra = seeded_gaussian((m, r), q.shape[1], name)[:, q.shape[1]:].to(device=q.device, dtype=q.dtype)
    return torch.cat([q, extra], dim=1)


def _power_iteration(matrices: torch.Tensor, q: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched subspace iteration from warm start ``q``: returns orthonormal P (b, n, r) and Q = Mᵀ P."""
    p = q.new_empty(0)
    for _ in range(iterations):
        # Orthonormal Q first (as powerSGD_hook does): the result is the same projection, but
        # column scales stay comparable so the relative zero test in orthogonalize is meaningful.
        p = orthogonalize(torch.bmm(matrices, orthonormal_basis(q)))
        q = torch.bmm(matrices.transpose(1, 2), p)
    return p, q


def _deflated_power_iteration(
    matrices: torch.Tensor, q: torch.Tensor, iterations: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 power steps on the deflated residual, one component after another (epfml Algorithm 2)."""
    residual = matrices.clone()
    ps, qs = [], []
    for k in range(q.shape[2]):
        q_k = q[:, :, k : k + 1]
        for _ in range(iterations):
            p_k = orthogonalize(torch.bmm(residual, q_k))
            q_k = torch.bmm(residual.transpose(1, 2), p_k)
        # R ← R − p qᵀ = (I − p pᵀ) R, so later p's come out orthogonal to this one.
        residual = torch.baddbmm(residual, p_k, q_k.transpose(1, 2), alpha=-1.0)
        ps.append(p_k)
        qs.append(q_k)
    return torch.cat(ps, dim=2), torch.cat(qs, dim=2)


def _reconstruct(
    left: Mapping[str, torch.Tensor], right: Mapping[str, torch.Tensor], dims: Mapping[str, MatrixDims],
    inputs: Mapping[str, ArraySpec],
) -> Tensors:
    """Dense ``left[name] @ right[name]ᵀ`` reshaped to each input shape, batched per (n, m, r')."""
    out: Tensors = {}
    for (n, m, r), names in group_by_dims(dims).items():
        left_batch = stack(left, names, (n, r))
        right_batch = stack(right, names, (m, r)).to(left_batch.device)
        products = torch.bmm(left_batch, right_batch.transpose(1, 2))
        for name, product in zip(names, products):
            out[name] = product.reshape(tuple(inputs[name].shape))
    return out


def _ordered(inputs: Mapping[str, ArraySpec], parts: Tensors) -> Tensors:
    """``parts`` in the order of ``inputs`` (decoded dicts mirror the model's order)."""
    return {name: parts[name] for name in inputs}


@dataclass(frozen=True)
class PowerSGD(Codec):
    """Independent-mode PowerSGD: per-client warm-started power iteration, sends P and Q per tensor."""

    rank: int = 4  # target rank r; each tensor uses r' = min(r, n, m)
    power_iterations: int = 1  # power steps per encode (client compute only, no extra bytes)
    min_compression_rate: float = 2.0  # compress a tensor only if n·m / (r'·(n+m)) reaches this
    deflation: bool = False  # find components one by one on the deflated residual (epfml Algorithm 2)
    ranks: Mapping[str, int] | None = None  # per-tensor ranks (a byte-budget allocation); others use ``rank``

    def __post_init__(self) -> None:
        """Reject settings that cannot work."""
        if self.rank < 1 or self.power_iterations < 1 or self.min_compression_rate <= 0 or any(
                r < 1 for r in (self.ranks or {}).values()):
            raise ValueError(f"invalid PowerSGD config: {self}")

    def __hash__(self) -> int:
        """Hashable despite the ranks mapping (frozen dataclasses hash their fields)."""
        return hash((self.rank, self.power_iterations, self.min_compression_rate, self.deflation,
                     tuple(sorted((self.ranks or {}).items()))))

    def dims(self, inputs: Mapping[str, ArraySpec]) -> dict[str, MatrixDims]:
        """Name → (n, m, r') of the tensors this codec compresses."""
        return compressible(inputs, self.rank, self.min_compression_rate, self.ranks)

    def layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """``{name}.P`` (n, r') and ``{name}.Q`` (m, r') per compressed tensor, the rest dense float32."""
        dims = self.dims(inputs)
        factors: Layout = {}
        for name, (n, m, r) in dims.items():
            factors[f"{name}.P"] = ArraySpec((n, r))
            factors[f"{name}.Q"] = ArraySpec((m, r))
        return _merge_layouts(factors, _dense_layout(inputs, dims))

    def init_state(self, inputs: Mapping[str, ArraySpec], device: torch.device | str = "cpu", seed: int = 0) -> Tensors:
        """Seeded Gaussian warm start ``{name}.Q`` (m, r') per compressed tensor."""
        return {
            f"{name}.Q": seeded_gaussian((m, r), seed, name).to(device)
            for name, (_, m, r) in self.dims(inputs).items()
        }

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """Factors of each compressed tensor plus dense pass-through; new state = the sent Q's.

        ``state=None`` starts from ``init_state(..., seed=0)``; ``generator`` is unused (deterministic).
        """
        inputs = {name: ArraySpec(tuple(t.shape)) for name, t in tensors.items()}
        dims = self.dims(inputs)
        if state is None:
            state = self.init_state(inputs, seed=0)
        encoded: Tensors = {}
        new_state: Tensors = {}
        for (n, m, r), names in group_by_dims(dims).items():
            warm = {name: _resized_warm_start(state.get(f"{name}.Q"), name, m, r) for name in names}
            matrices = stack(tensors, names, (n, m))
            previous_q = stack(warm, names, (m, r)).to(matrices.device)
            step = _deflated_power_iteration if self.deflation else _power_iteration
            p, q = step(matrices, previous_q, self.power_iterations)
            warm_q = _keep_nonzero_columns(q, previous_q)
            for i, name in enumerate(names):
                encoded[f"{name}.P"] = p[i].contiguous()
                encoded[f"{name}.Q"] = q[i].contiguous()
                new_state[f"{name}.Q"] = warm_q[i].contiguous()
        encoded.update(_dense_passthrough(tensors, dims))
        return {key: encoded[key] for key in self.layout(inputs)}, new_state

    def decode(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Dense ``P Qᵀ`` per compressed tensor, dense pass-through for the rest."""
        validate(encoded, self.layout(inputs))
        dims = self.dims(inputs)
        left = {name: encoded[f"{name}.P"] for name in dims}
        right = {name: encoded[f"{name}.Q"] for name in dims}
        out = _reconstruct(left, right, dims, inputs)
        out.update({name: encoded[name].clone() for name in inputs if name not in dims})
        return _ordered(inputs, out)

    def output_norm(self, encoded: Mapping[str, torch.Tensor]) -> float:
        """‖decoded‖ without decoding: P is orthonormal, so ‖P Qᵀ‖_F = ‖Q‖_F; dense tensors count as they are.

        A P with a zero column (a degenerate direction) only makes this an upper bound, which is the
        safe side for clipping.
        """
        total = 0.0
        for name, t in encoded.items():
            if t.is_floating_point() and not _is_left_factor(name, encoded):
                total += float(t.detach().double().pow(2).sum())
        return total ** 0.5

    def scale_output(self, encoded: Mapping[str, torch.Tensor], factor: float) -> Tensors:
        """Scale Q (not the orthonormal P) and the dense tensors: ``P (cQ)ᵀ = c P Qᵀ`` exactly."""
        return {name: t.detach().clone() if _is_left_factor(name, encoded) else scale_tensor(t, factor)
                for name, t in encoded.items()}


def _is_left_factor(name: str, encoded: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``name`` is the orthonormal P of a factor pair (``{tensor}.P`` next to ``{tensor}.Q``)."""
    return name.endswith(".P") and f"{name[:-2]}.Q" in encoded


def basis_layout(inputs: Mapping[str, ArraySpec], rank: int, min_compression_rate: float, side: Side) -> Layout:
    """Specs of the shared basis: Q̂ (m, r') per compressed tensor for "left", P̂ (n, r') for "right"."""
    _check_side(side)
    return {
        name: ArraySpec((m if side == "left" else n, r))
        for name, (n, m, r) in compressible(inputs, rank, min_compression_rate).items()
    }


def init_basis(
    inputs: Mapping[str, ArraySpec], rank: int, min_compression_rate: float, seed: int,
    device: torch.device | str = "cpu",
) -> Tensors:
    """Seeded random orthonormal Q̂ (m, r') per compressed tensor, for the first ("left") round."""
    dims = compressible(inputs, rank, min_compression_rate)
    out: Tensors = {}
    for (_, m, r), names in group_by_dims(dims).items():
        bases = orthonormal_basis(torch.stack([seeded_gaussian((m, r), seed, name) for name in names]))
        out.update({name: basis.to(device) for name, basis in zip(names, bases)})
    return _ordered({name: inputs[name] for name in dims}, out)


def next_basis(reduced: Mapping[str, torch.Tensor], side: Side, names: Iterable[str] | None = None) -> Tensors:
    """Basis for the next round: orth(P) after a "left" round (for "right"), orth(Q) after "right".

    ``names`` are the compressed tensors; by default every ``{name}.P`` ("left") or ``{name}.Q``
    ("right") key of ``reduced`` is taken as a factor (pass ``names`` if a dense tensor could end
    that way). Degenerate factors (e.g. all-zero) are completed, so the basis is always orthonormal.
    """
    _check_side(side)
    suffix = ".P" if side == "left" else ".Q"
    if names is None:
        names = [key[: -len(suffix)] for key in reduced if key.endswith(suffix) and reduced[key].ndim == 2]
    factors = {name: reduced[name + suffix] for name in names}
    out: Tensors = {}
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, factor in factors.items():
        shapes.setdefault(tuple(factor.shape), []).append(name)
    for shape, group in shapes.items():
        bases = orthonormal_basis(stack(factors, group, shape))
        out.update(zip(group, bases))
    return {name: out[name] for name in factors}


def update_basis_memory(
    memory: Mapping[str, torch.Tensor] | None, update: Mapping[str, torch.Tensor], names: Iterable[str], beta: float,
) -> Tensors:
    """``β·memory + update`` for the compressed tensors, kept as (n, m) matrices on the server.

    The memory is a decayed sum of the (already aggregated, possibly DP-noised) dense updates: a
    subspace that persists over rounds adds up linearly while round-to-round noise only grows like
    √rounds, so a basis taken from it tracks the update better than one round's factor does.
    """
    out: Tensors = {}
    for name in names:
        matrix = update[name].reshape(update[name].shape[0], -1).to(torch.float32)
        previous = (memory or {}).get(name)
        out[name] = matrix.clone() if previous is None else beta * previous.to(matrix.device) + matrix
    return out


def basis_from_memory(memory: Mapping[str, torch.Tensor], basis: Mapping[str, torch.Tensor], side: Side,
                      steps: int = 1) -> Tensors:
    """Next round's basis from the memory: orth(A Q̂) after a "left" round, orth(Aᵀ P̂) after "right".

    One power step on the accumulated update, started from the basis just used; with zero decay it
    equals :func:`next_basis` on this round's aggregated factor (A Q̂ = P̄ because Q̂ᵀQ̂ = I).
    ``steps`` > 1 runs more (server-only, byte-free) subspace iterations on A, converging to the top
    singular subspace of the memory (an exact-SVD refresh in the limit, as in PowerSGD+).
    """
    _check_side(side)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out: Tensors = {}
    for name, b in basis.items():
        forward = memory[name] if side == "left" else memory[name].transpose(0, 1)  # maps the used basis to the next
        new = orthonormal_basis((forward @ b.to(forward.device))[None])[0]
        for _ in range(steps - 1):
            new = orthonormal_basis((forward @ orthonormal_basis((forward.transpose(0, 1) @ new)[None])[0])[None])[0]
        out[name] = new
    return out


def _check_side(side: str) -> None:
    """Raise ValueError unless ``side`` is "left" or "right"."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")


@dataclass(frozen=True, eq=False)
class SharedPowerSGD(Codec):
    """Shared-basis PowerSGD for one round: clients project onto the server's basis and send one factor."""

    rank: int  # target rank r; each tensor uses r' = min(r, n, m)
    min_compression_rate: float  # compress a tensor only if n·m / (r'·(n+m)) reaches this
    side: Side  # "left": basis Q̂ (m, r'), send P = M Q̂; "right": basis P̂ (n, r'), send Q = Mᵀ P̂
    basis: Mapping[str, torch.Tensor]  # orthonormal basis per compressed tensor, keyed by tensor name

    linear_space_is_factors = True

    def __post_init__(self) -> None:
        """Reject settings that cannot work."""
        _check_side(self.side)
        if self.rank < 1 or self.min_compression_rate <= 0:
            raise ValueError(f"invalid SharedPowerSGD config: rank={self.rank}, rate={self.min_compression_rate}")

    @property
    def suffix(self) -> str:
        """Name suffix of the factor clients send this round."""
        return ".P" if self.side == "left" else ".Q"

    def dims(self, inputs: Mapping[str, ArraySpec]) -> dict[str, MatrixDims]:
        """Name → (n, m, r') of the tensors this codec compresses."""
        return compressible(inputs, self.rank, self.min_compression_rate)

    def layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """``{name}.P`` (n, r') ("left") or ``{name}.Q`` (m, r') ("right") per compressed tensor, rest dense."""
        dims = self.dims(inputs)
        factors = {
            f"{name}{self.suffix}": ArraySpec((n if self.side == "left" else m, r)) for name, (n, m, r) in dims.items()
        }
        return _merge_layouts(factors, _dense_layout(inputs, dims))

    def _checked_basis(self, inputs: Mapping[str, ArraySpec]) -> Mapping[str, torch.Tensor]:
        """The basis, validated against the inputs (it comes over the network, so PayloadError)."""
        validate(self.basis, basis_layout(inputs, self.rank, self.min_compression_rate, self.side))
        return self.basis

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """Project each compressed tensor on the basis (``M Q̂`` or ``Mᵀ P̂``); no client state."""
        inputs = {name: ArraySpec(tuple(t.shape)) for name, t in tensors.items()}
        dims = self.dims(inputs)
        basis = self._checked_basis(inputs)
        encoded: Tensors = {}
        for (n, m, r), names in group_by_dims(dims).items():
            matrices = stack(tensors, names, (n, m))
            bases = stack(basis, names, (m, r) if self.side == "left" else (n, r)).to(matrices.device)
            factors = torch.bmm(matrices if self.side == "left" else matrices.transpose(1, 2), bases)
            encoded.update({f"{name}{self.suffix}": f.contiguous() for name, f in zip(names, factors)})
        encoded.update(_dense_passthrough(tensors, dims))
        return {key: encoded[key] for key in self.layout(inputs)}, {}

    def decode(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """This client's own contribution as dense tensors (for error feedback): factor ⊗ basis."""
        return self.expand(encoded, inputs)

    def reduce(
        self, encoded_list: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
        inputs: Mapping[str, ArraySpec],
    ) -> Tensors:
        """Weighted sum of the factor arrays and dense tensors (linear: secure-aggregation / DP friendly)."""
        layout = self.layout(inputs)
        for encoded in encoded_list:
            validate(encoded, layout)
        return weighted_sum(encoded_list, weights)

    def linear_layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """The factor space: this round's factors plus the dense pass-through tensors (all float32)."""
        return self.layout(inputs)

    def expand(self, reduced: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Dense update: ``P Q̂ᵀ`` ("left") or ``P̂ Qᵀ`` ("right") per tensor, dense tensors as they are."""
        validate(reduced, self.layout(inputs))
        basis = self._checked_basis(inputs)
        dims = self.dims(inputs)
        factors = {name: reduced[f"{name}{self.suffix}"] for name in dims}
        if self.side == "left":
            out = _reconstruct(factors, basis, dims, inputs)
        else:
            out = _reconstruct(basis, factors, dims, inputs)
        out.update({name: reduced[name].clone() for name in inputs if name not in dims})
        return _ordered(inputs, out)
