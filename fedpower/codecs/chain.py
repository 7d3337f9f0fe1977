"""Composition of codecs: each stage encodes what the previous one produced (e.g. low rank → clip → int8).

In the spirit of optax's ``chain``: one uniform interface whatever the parts are, any number of
stages. The first stage owns the linear space (``reduce``/``expand``); the later stages are decoded
per client before reducing, so int8 factors are never averaged as if they were floats. Stage ``i``
keeps its state under the key prefix ``"{i}/"``; that naming stays inside this package.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedpower.codecs.base import ArraySpec, Codec, Layout, Tensors, Trace
from fedpower.codecs.error_feedback import prefixed, split_state


def _add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Tensors:
    """Name-by-name sum of two dicts with the same keys."""
    return {name: t + b[name].to(t.device) for name, t in a.items()}


class Chain(Codec):
    """``stages[-1] ∘ … ∘ stages[0]``: encode with each stage in turn, decode in reverse."""

    def __init__(self, *stages: Codec) -> None:
        """A pipeline of at least two codecs, applied in the given order."""
        if len(stages) < 2:
            raise ValueError(f"a Chain needs at least two stages, got {len(stages)}")
        self.stages: tuple[Codec, ...] = tuple(stages)

    def __repr__(self) -> str:
        """The stages, in order."""
        return f"Chain({', '.join(map(repr, self.stages))})"

    def __eq__(self, other: object) -> bool:
        """Equal when the stages are."""
        return type(other) is type(self) and self.stages == other.stages  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        """Hash of the stages."""
        return hash(self.stages)

    @property
    def first(self) -> Codec:
        """The stage that owns the linear space."""
        return self.stages[0]

    @property
    def linear_space_is_factors(self) -> bool:  # type: ignore[override]
        """The first stage decides what is aggregated."""
        return self.first.linear_space_is_factors

    def _layouts(self, inputs: Mapping[str, ArraySpec]) -> list[Layout]:
        """The input layout of every stage, and last the wire layout."""
        layouts = [dict(inputs)]
        for stage in self.stages:
            layouts.append(stage.layout(layouts[-1]))
        return layouts

    def layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """The last stage's layout over what the earlier stages produce."""
        return self._layouts(inputs)[-1]

    def linear_layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """The first stage's linear space."""
        return self.first.linear_layout(inputs)

    def init_state(self, inputs: Mapping[str, ArraySpec], device: torch.device | str = "cpu", seed: int = 0) -> Tensors:
        """Every stage's state, kept apart by its index."""
        layouts = self._layouts(inputs)
        state: Tensors = {}
        for i, stage in enumerate(self.stages):
            state.update(prefixed(stage.init_state(layouts[i], device, seed), f"{i}/"))
        return state

    def _stage_states(self, state: Mapping[str, torch.Tensor] | None) -> list[Tensors | None]:
        """Each stage's part of ``state`` (None for a stage with nothing saved)."""
        return [split_state(state or {}, f"{i}/") or None for i in range(len(self.stages))]

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """Encode with every stage in turn."""
        out: Mapping[str, torch.Tensor] = tensors
        new_state: Tensors = {}
        for i, (stage, own) in enumerate(zip(self.stages, self._stage_states(state))):
            out, stage_state = stage.encode(out, own, generator)
            new_state.update(prefixed(stage_state, f"{i}/"))
        return dict(out), new_state

    def trace(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None, clean: Mapping[str, torch.Tensor] | None = None,
    ) -> Trace:
        """Trace every stage in turn; the way back runs through the stages in reverse.

        The noise-free twin travels alongside once a stage (noise) makes it differ. What a stage
        drops is in *its* input space, so it is mapped back through the stages before it.
        """
        out: Mapping[str, torch.Tensor] = tensors
        twin = None if clean is None else dict(clean)
        new_state: Tensors = {}
        traces: list[Trace] = []
        for i, (stage, own) in enumerate(zip(self.stages, self._stage_states(state))):
            step = stage.trace(out, own, generator, twin)
            traces.append(step)
            new_state.update(prefixed(step.state, f"{i}/"))
            out, twin = step.encoded, step.clean

        def back(encoded: Mapping[str, torch.Tensor]) -> Tensors:
            value = dict(encoded)
            for step in reversed(traces):
                value = step.back(value)
            return value

        dropped: Tensors | None = None
        for i, step in enumerate(traces):
            if step.dropped is None:
                continue
            value = step.dropped
            for earlier in reversed(traces[:i]):
                value = earlier.back(value)
            dropped = value if dropped is None else _add(dropped, value)
        return Trace(dict(out), new_state, back, twin, dropped)

    def decode(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Decode with every stage, last first."""
        layouts = self._layouts(inputs)
        value: Mapping[str, torch.Tensor] = encoded
        for i in reversed(range(len(self.stages))):
            value = self.stages[i].decode(value, layouts[i])
        return dict(value)

    def _decode_after_first(self, encoded: Mapping[str, torch.Tensor], layouts: Sequence[Layout]) -> Tensors:
        """Undo every stage but the first: the first stage's own encoding."""
        value: Mapping[str, torch.Tensor] = encoded
        for i in reversed(range(1, len(self.stages))):
            value = self.stages[i].decode(value, layouts[i])
        return dict(value)

    def reduce(
        self, encoded_list: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
        inputs: Mapping[str, ArraySpec],
    ) -> Tensors:
        """Undo the later stages per client, then aggregate in the first stage's linear space."""
        layouts = self._layouts(inputs)
        return self.first.reduce([self._decode_after_first(e, layouts) for e in encoded_list], weights, inputs)

    def expand(self, reduced: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Expansion is the first stage's."""
        return self.first.expand(reduced, inputs)

    def output_norm(self, encoded: Mapping[str, torch.Tensor]) -> float:
        """Not defined without the input layout: measure ``reduce([encoded], [1.0], inputs)`` instead."""
        raise TypeError("a chain's decoded norm needs the input layout; measure its reduce() output")

    def scale_output(self, encoded: Mapping[str, torch.Tensor], factor: float) -> Tensors:
        """Rescale the last stage's output (exact where the earlier stages decode linearly)."""
        return self.stages[-1].scale_output(encoded, factor)
