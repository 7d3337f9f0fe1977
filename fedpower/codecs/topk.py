"""Top-k sparsification: per array, the k entries of largest magnitude as (values, indices).

For a float32 input ``name`` with ``numel`` entries, ``k = max(1, ceil(ratio · numel))`` (0 when the
array is empty; ``ratio · numel`` is rounded to 9 decimals first so that e.g. 0.07 · 100 gives 7, not
8). Encoded: ``name.values`` float32 ``(k,)`` and ``name.indices`` int32 ``(k,)``, indices into the
row-major flattened array, sorted ascending. Arrays that are not float32 pass through unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from fedpower.codecs.base import (
    WIRE_DTYPES, ArraySpec, Codec, Layout, PayloadError, Tensors, layout_of, validated_layout,
)

_INT32_MAX = int(torch.iinfo(torch.int32).max)


@dataclass(frozen=True)
class TopK(Codec):
    """Keep the ``ratio`` fraction of entries with the largest |x| in every float32 array."""

    ratio: float  # fraction of each array's entries sent (0 < ratio <= 1); at least one entry per array

    def __post_init__(self) -> None:
        """Reject ratios outside (0, 1]."""
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(f"TopK.ratio must be in (0, 1], got {self.ratio!r}")

    def k(self, numel: int) -> int:
        """Entries kept for an array of ``numel`` entries."""
        if numel == 0:
            return 0
        return min(numel, max(1, math.ceil(round(self.ratio * numel, 9))))

    def layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """``name.values`` float32 (k,) and ``name.indices`` int32 (k,) per float32 input."""
        out: Layout = {}
        for name, spec in inputs.items():
            if spec.dtype not in WIRE_DTYPES:
                raise ValueError(f"{name}: dtype {spec.dtype} cannot travel in a payload")
            if spec.dtype != torch.float32:
                entries = {name: spec}
            else:
                if spec.numel > _INT32_MAX:
                    raise ValueError(f"{name}: {spec.numel} entries do not fit int32 indices")
                k = self.k(spec.numel)
                entries = {f"{name}.values": ArraySpec((k,), torch.float32),
                           f"{name}.indices": ArraySpec((k,), torch.int32)}
            for encoded_name, encoded_spec in entries.items():
                if encoded_name in out:
                    raise ValueError(f"encoded name {encoded_name!r} is produced twice; rename the inputs")
                out[encoded_name] = encoded_spec
        return out

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """Values and (ascending) indices of the largest-|x| entries; deterministic, no randomness."""
        self.layout(layout_of(tensors))  # fail early on unsendable dtypes or name collisions
        encoded: Tensors = {}
        for name, tensor in tensors.items():
            x = tensor.detach()
            if x.dtype != torch.float32:
                encoded[name] = x.clone()
                continue
            flat = x.reshape(-1)
            indices = flat.abs().topk(self.k(flat.numel()), sorted=False).indices.sort().values
            encoded[f"{name}.values"] = flat[indices]
            encoded[f"{name}.indices"] = indices.to(torch.int32)
        return encoded, {}

    def decode(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Scatter the values into zeros of the input shapes; rejects bad or repeated indices."""
        validated_layout(self, encoded, inputs)
        out: Tensors = {}
        for name, spec in inputs.items():
            if spec.dtype != torch.float32:
                out[name] = encoded[name].clone()
                continue
            values, indices = encoded[f"{name}.values"], encoded[f"{name}.indices"].long()
            numel = spec.numel
            ordered = indices.sort().values
            out_of_range, repeated = torch.stack([
                ((indices < 0) | (indices >= numel)).any(), (ordered[1:] == ordered[:-1]).any(),
            ]).tolist()
            if out_of_range:
                raise PayloadError(f"{name}.indices: index outside [0, {numel})")
            if repeated:
                raise PayloadError(f"{name}.indices: repeated index")
            dense = torch.zeros(numel, dtype=torch.float32, device=values.device)
            out[name] = dense.scatter(0, indices, values).reshape(tuple(spec.shape))
        return out
