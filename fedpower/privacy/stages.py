"""The Gaussian mechanism as codec stages: clip and noise compose with compression like optax transforms.

A private pipeline, as :func:`fedpower.codecs.build_codec` assembles it::

    ErrorFeedback(NormBound(Chain(project?, Clip, GaussianNoise?, quantize/top-k?)))

- :class:`Clip` bounds its input's L2 norm, measured in the geometry of the stage before it (the
  space the server sums in, ``Codec.reduce``): shared PowerSGD's factors, independent PowerSGD's
  ``P Qᵀ`` (‖Q‖ with P orthonormal), or the dense update.
- :class:`GaussianNoise` (local DP) adds N(0, std²) there. Its *trace* carries a noise-free twin, so
  error feedback takes the residual against a noise-free encoding of the same clipped contribution:
  noise fed back would random-walk in the residual.
- :class:`NormBound` (central DP) makes the decoded contribution, exactly as the server computes
  it, satisfy the bound after quantization (int2 rounding alone adds ≈50 % norm); the server's
  re-clip is then a no-op for honest clients, and error feedback sees what the server uses.

A round's message depends on the data and on public outputs only, so the per-round bound, and with
it the accounting, holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from fedpower.codecs.base import ArraySpec, Codec, Layout, Tensors, Trace, Wrapper, layout_of, validate
from fedpower.codecs.dense import Dense
from fedpower.privacy.mechanism import add, contribution_norm, gaussian_noise_like


def _identity_layout(inputs: Mapping[str, ArraySpec]) -> Layout:
    """The input specs themselves (stages that change values, never the wire layout)."""
    return {name: ArraySpec(tuple(spec.shape), spec.dtype) for name, spec in inputs.items()}


def _copies(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Detached copies (so later in-place edits of either side cannot leak across)."""
    return {name: t.detach().clone() for name, t in tensors.items()}


class _ValueStage(Codec):
    """Shared plumbing of stages that transform values in place of the layout: identity layout and decode."""

    def layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """Same arrays in, same arrays out."""
        return _identity_layout(inputs)

    def decode(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Validated copies: the stage's output is already a value of its input space."""
        validate(encoded, _identity_layout(inputs))
        return {name: encoded[name].clone() for name in inputs}


@dataclass(frozen=True)
class Clip(_ValueStage):
    """Scale the whole contribution so that its L2 norm, in ``geometry``'s terms, is at most ``clip_norm``."""

    clip_norm: float  # C: L2 bound on the whole contribution
    feedback: bool = True  # False: what clipping cut off is dropped from the error-feedback residual
    geometry: Codec = field(default_factory=Dense)  # the stage whose output this clips (its norm and scaling)

    def __post_init__(self) -> None:
        """Reject a bound that cannot be met."""
        if not self.clip_norm > 0 or not math.isfinite(self.clip_norm):
            raise ValueError(f"clip_norm must be positive and finite, got {self.clip_norm}")

    def _factor(self, tensors: Mapping[str, torch.Tensor]) -> float:
        """The scale that brings ``tensors`` into the ball of radius C (1.0 when already inside)."""
        norm = self.geometry.output_norm(tensors)
        if not math.isfinite(norm):
            raise ValueError("cannot clip a contribution holding NaN or Inf")
        return 1.0 if norm <= self.clip_norm else self.clip_norm / norm

    def clip(self, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        """``tensors`` scaled into the ball of radius C (copies when already inside)."""
        factor = self._factor(tensors)
        return _copies(tensors) if factor == 1.0 else self.geometry.scale_output(tensors, factor)

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """The clipped contribution; stateless."""
        return self.clip(tensors), {}

    def trace(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None, clean: Mapping[str, torch.Tensor] | None = None,
    ) -> Trace:
        """Clip (the twin too); with feedback off, the cut mass is reported as dropped."""
        clipped = self.clip(tensors)
        clean_clipped = None if clean is None else self.clip(clean)
        source = tensors if clean is None else clean
        factor = self._factor(source)
        dropped = None
        if not self.feedback and factor < 1.0:
            # The cut is the same contribution scaled by 1 − factor: written with the geometry's own
            # scaling, it stays a valid encoding (for PowerSGD, P with (1 − factor)·Q), so the stages
            # before this one map it back to the dense space exactly.
            dropped = self.geometry.scale_output(source, 1.0 - factor)
        return Trace(clipped, {}, _copies, clean_clipped, dropped)


@dataclass(frozen=True, eq=False)
class GaussianNoise(_ValueStage):
    """Add N(0, std²) to every float coordinate (local DP); the twin stays noise-free."""

    std: float  # σ·C
    generator: torch.Generator  # the noise's own stream (OS entropy unless a noise_seed is configured)

    def __post_init__(self) -> None:
        """Reject a negative or non-finite std."""
        if not self.std >= 0 or not math.isfinite(self.std):
            raise ValueError(f"noise std must be non-negative and finite, got {self.std}")

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """``tensors`` + noise, drawn from the stage's own generator (never the codec's)."""
        return add(tensors, gaussian_noise_like(tensors, self.std, self.generator)), {}

    def trace(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None, clean: Mapping[str, torch.Tensor] | None = None,
    ) -> Trace:
        """Noisy message, noise-free twin: the stages after this one encode both."""
        noisy, _ = self.encode(tensors, state, generator)
        return Trace(noisy, {}, _copies, _copies(tensors if clean is None else clean))


def _power_law_guess(first: tuple[float, float], second: tuple[float, float], target: float) -> float:
    """The factor where the curve a·factorᵏ through two (factor, norm) points reaches ``target`` (NaN if undefined)."""
    (f1, n1), (f2, n2) = first, second
    if min(f1, n1, f2, n2) <= 0 or f1 == f2 or n1 == n2:
        return math.nan
    exponent = math.log(n2 / n1) / math.log(f2 / f1)
    if not exponent > 0:
        return math.nan
    return f2 * (target / n2) ** (1 / exponent)


#: Accept a bounded message once its norm is within this fraction of C (the budget is nearly all used).
_BOUND_TOLERANCE = 1e-3
_BOUND_STEPS = 40


@dataclass(frozen=True, eq=False)
class NormBound(Wrapper):
    """``inner``, with every message shrunk until the contribution the server decodes has norm ≤ C.

    Clipping happens before quantization, and stochastic rounding can add norm (int2 ≈ 1.5·C); the
    server re-clips what it decodes, so without this the excess would be cut there and the
    residual would never learn it. Shrinking uses ``inner.scale_output`` and is verified by
    measuring ``inner.reduce`` (the server's own computation), so the bound holds for any codec.
    """

    inner: Codec  # the pipeline whose decoded contribution is bounded
    clip_norm: float  # C

    def init_state(self, inputs: Mapping[str, ArraySpec], device: torch.device | str = "cpu", seed: int = 0) -> Tensors:
        """The wrapped codec's state (under the same names: the bound keeps none of its own)."""
        return self.inner.init_state(inputs, device, seed)

    def residual_norm(self, state: Mapping[str, torch.Tensor]) -> float:
        """The wrapped codec's."""
        return self.inner.residual_norm(state)

    def _norm(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> float:
        """Norm of the contribution exactly as the server decodes it (``reduce`` of one message)."""
        return contribution_norm(self.inner.reduce([encoded], [1.0], inputs))

    def bound(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """``encoded``, shrunk as little as possible so that its decoded contribution is within C."""
        norm = self._norm(encoded, inputs)
        if norm <= self.clip_norm:
            return dict(encoded)
        if not math.isfinite(norm):
            raise ValueError("the encoded contribution decodes to NaN or Inf")
        # Search the largest factor that passes. Model the decoded norm as a·factorᵏ through the last
        # two measurements: a homogeneous rescaling (k = 1) hits C in one step, quantized P and Q
        # shrinking together (k ≈ 2, with dense tensors in between) in a few; bisection is the fallback.
        low, high, best = 0.0, 1.0, None
        previous = (1.0, norm)
        factor = self.clip_norm / norm
        for _ in range(_BOUND_STEPS):
            candidate = self.inner.scale_output(encoded, factor)
            measured = self._norm(candidate, inputs)
            if measured <= self.clip_norm:
                low, best = factor, candidate
                if measured >= self.clip_norm * (1 - _BOUND_TOLERANCE):
                    break
            else:
                high = factor
            guess = _power_law_guess(previous, (factor, measured), self.clip_norm * (1 - _BOUND_TOLERANCE / 2))
            previous = (factor, measured)
            factor = guess if low < guess < high else (low + high) / 2
        return best if best is not None else self.inner.scale_output(encoded, 0.0)

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """Encode with ``inner``, then bound."""
        traced = self.trace(tensors, state, generator)
        return traced.encoded, traced.state

    def trace(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None, clean: Mapping[str, torch.Tensor] | None = None,
    ) -> Trace:
        """The wrapped trace with the message (and its twin) bounded; the way back decodes the bounded one."""
        traced = self.inner.trace(tensors, state, generator, clean)
        inputs = layout_of(tensors)
        twin = None if traced.clean is None else self.bound(traced.clean, inputs)
        return Trace(self.bound(traced.encoded, inputs), traced.state, traced.back, twin, traced.dropped)
