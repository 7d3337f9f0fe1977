"""Flower ArrayRecord ↔ torch tensors: the one conversion both the ClientApp and the ServerApp use.

Glue, not math: the only Flower import in ``fedpower/`` outside the adapters.
"""

from __future__ import annotations

from typing import Mapping

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def arrays_to_tensors(record: ArrayRecord, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """ArrayRecord → dict of tensors (numpy only: nothing a peer sends is unpickled)."""
    return {name: torch.from_numpy(np.array(arr.numpy())).to(device) for name, arr in record.items()}


def model_from_arrays(record: ArrayRecord, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The global model a client received, floating tensors as float32 (a fp16 downlink is widened here)."""
    return {name: (t.to(torch.float32) if t.is_floating_point() else t)
            for name, t in arrays_to_tensors(record, device).items()}


def tensors_to_arrays(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """dict of tensors/ndarrays → ArrayRecord."""
    out = {}
    for name, t in tensors.items():
        arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        out[name] = Array(np.ascontiguousarray(arr))
    return ArrayRecord(out)


def half_precision(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The model rounded to float16 for the downlink, or None when a weight is beyond ±65504 (would arrive as inf)."""
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in params.items()}
    if all(bool(torch.isfinite(v).all()) for v in half.values() if v.is_floating_point()):
        return half
    logging.getLogger("fedpower.strategy").warning("model exceeds the float16 range; this round's downlink is fp32")
    return None
