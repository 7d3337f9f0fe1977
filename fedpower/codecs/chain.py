"""Composition of two codecs: the second encodes what the first produced (e.g. low rank → int8).

In the spirit of optax's ``chain``: one uniform interface whatever the parts are. The first codec
owns the linear space (``reduce``/``expand``); the second is decoded per client before reducing,
so int8 factors are never averaged as if they were floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from fedpower.codecs.base import ArraySpec, Codec, Layout, Tensors
from fedpower.codecs.error_feedback import prefixed, split_state


@dataclass(frozen=True)
class Chain(Codec):
    """``second ∘ first``: encode with ``first``, then encode its output with ``second``."""

    first: Codec  # e.g. PowerSGD or TopK (owns the aggregation space)
    second: Codec  # e.g. Quantize (applied to every float array the first one emits)

    @property
    def linear_space_is_factors(self) -> bool:  # type: ignore[override]
        """The first codec decides what is aggregated."""
        return self.first.linear_space_is_factors

    def layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """The second codec's layout over the first codec's output."""
        return self.second.layout(self.first.layout(inputs))

    def init_state(self, inputs: Mapping[str, ArraySpec], device: torch.device | str = "cpu", seed: int = 0) -> Tensors:
        """Both parts' states, kept apart by prefix."""
        first = self.first.init_state(inputs, device, seed)
        second = self.second.init_state(self.first.layout(inputs), device, seed)
        return {**prefixed(first, "0/"), **prefixed(second, "1/")}

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """Encode with ``first`` then ``second``."""
        state = state or {}
        first_state = split_state(state, "0/") or None
        second_state = split_state(state, "1/") or None
        middle, new_first = self.first.encode(tensors, first_state, generator)
        encoded, new_second = self.second.encode(middle, second_state, generator)
        return encoded, {**prefixed(new_first, "0/"), **prefixed(new_second, "1/")}

    def decode(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Decode with ``second`` then ``first``."""
        return self.first.decode(self.second.decode(encoded, self.first.layout(inputs)), inputs)

    def reduce(
        self, encoded_list: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
        inputs: Mapping[str, ArraySpec],
    ) -> Tensors:
        """Undo ``second`` per client, then aggregate in ``first``'s linear space."""
        middle_layout = self.first.layout(inputs)
        return self.first.reduce([self.second.decode(e, middle_layout) for e in encoded_list], weights, inputs)

    def expand(self, reduced: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Expansion is the first codec's."""
        return self.first.expand(reduced, inputs)
