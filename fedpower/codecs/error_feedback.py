"""Error feedback around any codec: the part of an update that was not sent is sent later.

``M = Δ + e``; send ``C(M)``; keep ``e ← M − decode(C(M))``. The residual is explicit state
(returned, never written into the caller's tensors), so a client can persist it between rounds.

What counts as sent comes from the wrapped codec's :meth:`Codec.trace`: with DP stages inside, it is
the noise-free twin of the message (noise fed back would random-walk in the residual), and mass a
clip stage chose to drop (``clip_feedback: false``) is taken out of the residual too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from fedpower.codecs.base import ArraySpec, Codec, Tensors, Wrapper

RESIDUAL = "residual/"
INNER = "inner/"


def split_state(state: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    """``state`` with every key put under ``prefix``."""
    return {prefix + k: v for k, v in state.items()}


@dataclass(frozen=True)
class ErrorFeedback(Wrapper):
    """Wraps ``inner`` and carries its compression error into the next encode."""

    inner: Codec  # the codec whose error is fed back

    def init_state(self, inputs: Mapping[str, ArraySpec], device: torch.device | str = "cpu", seed: int = 0) -> Tensors:
        """Zero residuals plus the wrapped codec's state."""
        residual = {RESIDUAL + n: torch.zeros(s.shape, dtype=torch.float32, device=device) for n, s in inputs.items()}
        return {**residual, **prefixed(self.inner.init_state(inputs, device, seed), INNER)}

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """Encode ``tensors + residual``; the new residual is what decoding will not give back."""
        state = dict(state or {})
        residual = split_state(state, RESIDUAL)
        inner_state = split_state(state, INNER)
        if not inner_state:
            inner_state = None
        corrected = {n: t + residual[n] if n in residual else t.clone() for n, t in tensors.items()}
        traced = self.inner.trace(corrected, inner_state, generator)
        sent = traced.back(traced.reference)
        new_residual = {n: corrected[n] - sent[n] for n in corrected}
        if traced.dropped is not None:
            new_residual = {n: new_residual[n] - traced.dropped[n] for n in new_residual}
        return traced.encoded, {**prefixed(new_residual, RESIDUAL), **prefixed(traced.state, INNER)}

    def residual_norm(self, state: Mapping[str, torch.Tensor]) -> float:
        """L2 norm of the residual part of ``state`` (float64 sum)."""
        return sum(float(t.double().pow(2).sum()) for t in split_state(state, RESIDUAL).values()) ** 0.5
