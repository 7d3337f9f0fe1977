"""Dense codec: the identity, sending float32 arrays under their own names (the fp32 baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from fedpower.codecs.base import WIRE_DTYPES, ArraySpec, Codec, Layout, Tensors, validated_layout


@dataclass(frozen=True)
class Dense(Codec):
    """Identity codec: every array travels as it is (float32 inputs stay float32)."""

    def layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """The input specs themselves."""
        for name, spec in inputs.items():
            if spec.dtype not in WIRE_DTYPES:
                raise ValueError(f"{name}: dtype {spec.dtype} cannot travel in a payload")
        return {name: ArraySpec(tuple(spec.shape), spec.dtype) for name, spec in inputs.items()}

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """Copies of the tensors (copies, so later in-place edits of either side cannot leak across)."""
        encoded = {name: t.detach().clone() for name, t in tensors.items()}
        self.layout({name: ArraySpec(tuple(t.shape), t.dtype) for name, t in encoded.items()})
        return encoded, {}

    def decode(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Validated copies of the arrays, with the input shapes and dtypes."""
        validated_layout(self, encoded, inputs)
        return {name: encoded[name].clone() for name in inputs}
