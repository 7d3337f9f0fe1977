"""Server-side intake of one client payload: unpack, validate, reduce — or a PayloadError."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from fedpower.codecs.base import ArraySpec, Codec, PayloadError, Tensors
from fedpower.codecs.packing import unpack


def decode_contribution(codec: Codec, packed: Mapping[str, np.ndarray], inputs: Mapping[str, ArraySpec]) -> Tensors:
    """One client's contribution in the codec's linear space; PayloadError if anything is off.

    Besides layout, dtype and value checks, both the contribution and its dense expansion must be
    finite: huge-but-finite factors could otherwise overflow to Inf once multiplied out.
    """
    contribution = codec.reduce([unpack(packed, codec.layout(inputs))], [1.0], inputs)
    for name, t in contribution.items():
        if not bool(torch.isfinite(t).all()):
            raise PayloadError(f"{name}: decodes to non-finite values")
    for name, t in codec.expand(contribution, inputs).items():
        if not bool(torch.isfinite(t).all()):
            raise PayloadError(f"{name}: expands to non-finite values")
    return contribution
