"""Flower ArrayRecord ↔ torch tensors: the one conversion both the ClientApp and the ServerApp use.

Glue, not math: the only Flower import in ``fedpower/`` outside the adapters.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def arrays_to_tensors(record: ArrayRecord, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """ArrayRecord → dict of tensors (numpy only: nothing a peer sends is unpickled)."""
    return {name: torch.from_numpy(np.array(arr.numpy())).to(device) for name, arr in record.items()}


def tensors_to_arrays(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """dict of tensors/ndarrays → ArrayRecord."""
    out = {}
    for name, t in tensors.items():
        arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        out[name] = Array(np.ascontiguousarray(arr))
    return ArrayRecord(out)
