"""Wire packing: all arrays of a payload in one flat array per dtype.

Each array in a Flower message costs ≈600 B of headers, so a rank-4 reply of dozens of factors
would be mostly overhead. The layout (names, shapes, dtypes) is derived on both sides from the
model shapes and the codec config, so only the flat buffers travel.
"""

from __future__ import annotations

import zlib
from typing import Mapping

import numpy as np
import torch

from fedpower.codecs.base import ArraySpec, PayloadError, Tensors

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32", torch.float16: "float16", torch.int8: "int8", torch.uint8: "uint8", torch.int32: "int32",
}
NUMPY_DTYPES: dict[str, np.dtype] = {name: np.dtype(name) for name in DTYPE_NAMES.values()}


def _groups(layout: Mapping[str, ArraySpec]) -> dict[str, list[tuple[str, ArraySpec]]]:
    """Layout entries grouped by dtype name, each group in sorted-name order (same on both ends)."""
    groups: dict[str, list[tuple[str, ArraySpec]]] = {}
    for name in sorted(layout):
        spec = layout[name]
        if spec.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {spec.dtype} cannot be packed")
        groups.setdefault(DTYPE_NAMES[spec.dtype], []).append((name, spec))
    return groups


def packed_layout(layout: Mapping[str, ArraySpec]) -> dict[str, int]:
    """Element count of each flat buffer (by dtype name) for ``layout``."""
    return {dtype: sum(spec.numel for _, spec in items) for dtype, items in _groups(layout).items()}


def pack(encoded: Mapping[str, torch.Tensor], layout: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    """Concatenate the encoded arrays into one flat numpy buffer per dtype."""
    out: dict[str, np.ndarray] = {}
    for dtype, items in _groups(layout).items():
        parts = [encoded[name].detach().reshape(-1).cpu() for name, _ in items]
        out[dtype] = torch.cat(parts).numpy() if parts else np.zeros(0, NUMPY_DTYPES[dtype])
    return out


def unpack(packed: Mapping[str, np.ndarray], layout: Mapping[str, ArraySpec], device: torch.device | str = "cpu") -> Tensors:
    """Split flat buffers back into named arrays; raises PayloadError if anything does not fit."""
    groups = _groups(layout)
    extra = sorted(set(packed) - set(groups))
    missing = sorted(set(groups) - set(packed))
    if extra or missing:
        raise PayloadError(f"payload buffers do not match the layout: missing={missing} unexpected={extra}")
    out: Tensors = {}
    for dtype, items in groups.items():
        buffer = packed[dtype]
        if not isinstance(buffer, np.ndarray):
            raise PayloadError(f"buffer {dtype}: expected a numpy array, got {type(buffer).__name__}")
        if buffer.dtype != NUMPY_DTYPES[dtype] or buffer.ndim != 1:
            raise PayloadError(f"buffer {dtype}: got dtype {buffer.dtype} with {buffer.ndim} dims, expected flat {dtype}")
        expected = sum(spec.numel for _, spec in items)
        if buffer.size != expected:
            raise PayloadError(f"buffer {dtype}: {buffer.size} values, expected {expected}")
        flat = torch.from_numpy(np.ascontiguousarray(buffer)).to(device)
        offset = 0
        for name, spec in items:
            out[name] = flat[offset:offset + spec.numel].reshape(spec.shape)
            offset += spec.numel
    return out


ZLIB_PREFIX = "zlib-"  # buffer key of an entropy-coded buffer: "zlib-<dtype>"


def entropy_encode(packed: Mapping[str, np.ndarray], level: int = 9) -> dict[str, np.ndarray]:
    """Each flat buffer deflated (zlib) into a uint8 array keyed ``zlib-<dtype>``; lossless.

    Quantized codes are far from uniform (stochastic rounding piles them near zero), so they compress:
    measured 1.08× for int8, 1.2× for int4, 1.57× for int2 PowerSGD factors of real updates.
    """
    return {f"{ZLIB_PREFIX}{dtype}": np.frombuffer(zlib.compress(np.ascontiguousarray(buf).tobytes(), level),
                                                    dtype=np.uint8).copy()
            for dtype, buf in packed.items()}


def entropy_decode(payload: Mapping[str, np.ndarray], layout: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    """Inverse of :func:`entropy_encode` for ``layout``; PayloadError on anything that does not fit.

    Inflation is bounded by the size the layout allows, so a hostile payload cannot expand into a
    huge buffer (a "zip bomb") before it is rejected.
    """
    groups = _groups(layout)
    expected = {f"{ZLIB_PREFIX}{dtype}": dtype for dtype in groups}
    if set(payload) != set(expected):
        raise PayloadError(f"entropy-coded buffers do not match the layout: got {sorted(payload)}, "
                           f"expected {sorted(expected)}")
    out: dict[str, np.ndarray] = {}
    for key, dtype in expected.items():
        buffer = payload[key]
        if not isinstance(buffer, np.ndarray) or buffer.dtype != np.uint8 or buffer.ndim != 1:
            raise PayloadError(f"buffer {key}: expected a flat uint8 array")
        size = sum(spec.numel for _, spec in groups[dtype]) * NUMPY_DTYPES[dtype].itemsize
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(buffer.tobytes(), size + 1)
        except zlib.error as err:
            raise PayloadError(f"buffer {key}: not a zlib stream ({err})") from err
        if len(raw) != size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
            raise PayloadError(f"buffer {key}: inflates to {len(raw)}{'+' if not inflater.eof else ''} bytes, "
                               f"expected exactly {size}")
        out[dtype] = np.frombuffer(raw, dtype=NUMPY_DTYPES[dtype]).copy()
    return out
