"""Fuzzing the server-side decode path: random and mutated payloads raise PayloadError or decode finite.

The strategy's path per reply is ``decode_contribution`` (unpack, validate, reduce, finiteness); this
throws ≥ 10,000 payloads at it for every codec family and asserts no other exception escapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpower.codecs import PayloadError, build_codec, init_basis, layout_of, pack
from fedpower.codecs.receive import decode_contribution

SETTINGS = [
    {"method": "none"},
    {"method": "fp16"},
    {"method": "int8"},
    {"method": "quantize", "quantize_bits": 4},
    {"method": "quantize", "quantize_bits": 4, "quantize_scheme": "log"},
    {"method": "topk", "ratio": 0.1},
    {"method": "topk", "ratio": 0.1, "quantize_bits": 8},
    {"method": "powersgd", "rank": 2, "quantize_bits": 8},
    {"method": "powersgd", "rank": 2},
    {"method": "powersgd", "mode": "shared", "rank": 2, "quantize_bits": 8},
]
ITERATIONS_PER_SETTING = 1000


def _mutate(rng: np.random.Generator, packed: dict[str, np.ndarray]) -> dict:
    """One random corruption of a valid packed payload."""
    out = {k: v.copy() for k, v in packed.items()}
    key = rng.choice(sorted(out)) if out else None
    kind = rng.integers(0, 10)
    if kind == 0 and key is not None:  # random bytes, same dtype and length (NaN/Inf/huge/garbage codes)
        raw = out[key].view(np.uint8)
        raw[:] = rng.integers(0, 256, raw.size, dtype=np.uint8)
    elif kind == 1 and key is not None:  # flip a few bytes
        raw = out[key].view(np.uint8)
        idx = rng.integers(0, max(raw.size, 1), 3)
        raw[idx % max(raw.size, 1)] ^= rng.integers(1, 256, 3, dtype=np.uint8)
    elif kind == 2 and key is not None:  # wrong length
        out[key] = np.resize(out[key], max(0, out[key].size + int(rng.integers(-5, 6)) or 1))
    elif kind == 3 and key is not None:  # wrong dtype
        out[key] = out[key].astype(rng.choice([np.float64, np.int64, np.float16, np.uint8, np.int8]))
    elif kind == 4 and key is not None:  # missing buffer
        del out[key]
    elif kind == 5:  # unexpected buffer
        out["int32"] = rng.integers(-10, 10, 7).astype(np.int32)
    elif kind == 6 and key is not None:  # not an array
        out[key] = out[key].tolist()
    elif kind == 7 and key is not None:  # wrong rank
        out[key] = out[key].reshape(1, -1)
    elif kind == 8 and key is not None:  # extreme finite values
        if out[key].dtype.kind == "f":
            out[key][:] = np.finfo(out[key].dtype).max * rng.choice([-1, 1], out[key].size)
    else:  # a fully random payload
        out = {str(rng.choice(["float32", "int8", "uint8", "float16", "int32"])):
               rng.normal(size=int(rng.integers(0, 50))).astype(np.float32) for _ in range(int(rng.integers(0, 3)))}
    return out


@pytest.mark.parametrize("compression", SETTINGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_mutated_payloads_raise_only_payload_error(compression: dict) -> None:
    """≥ 1,000 mutations per codec (10,000 in all): PayloadError or a finite aggregate, nothing else."""
    g = torch.Generator().manual_seed(0)
    update = {"conv.weight": torch.randn(6, 2, 3, generator=g), "fc.weight": torch.randn(24, 16, generator=g),
              "fc.bias": torch.randn(24, generator=g)}
    inputs = layout_of(update)
    basis = init_basis(inputs, 2, 2.0, seed=0) if compression.get("mode") == "shared" else None
    codec = build_codec({**compression, "error_feedback": False}, basis=basis, side="left")
    layout = codec.layout(inputs)
    encoded, _ = codec.encode(update, codec.init_state(inputs), g)
    valid = pack(encoded, layout)
    rng = np.random.default_rng(1)
    rejected = 0
    for _ in range(ITERATIONS_PER_SETTING):
        payload = _mutate(rng, valid)
        try:
            contribution = decode_contribution(codec, payload, inputs)
        except PayloadError:
            rejected += 1
            continue
        dense = codec.expand(contribution, inputs)
        assert set(dense) == set(inputs)
        for t in list(contribution.values()) + list(dense.values()):
            assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())
    assert rejected > ITERATIONS_PER_SETTING // 3
