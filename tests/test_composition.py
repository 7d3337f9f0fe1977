"""Error feedback, chains, packing and the codec factory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpower.codecs import (ArraySpec, PayloadError, build_codec, init_basis, layout_nbytes, layout_of, pack,
                             payload_nbytes, unpack)
from fedpower.codecs.packing import packed_layout

SETTINGS = [
    {"method": "none"},
    {"method": "fp16"},
    {"method": "int8"},
    {"method": "quantize", "quantize_bits": 4},
    {"method": "topk", "ratio": 0.05},
    {"method": "topk", "ratio": 0.05, "quantize_bits": 8},
    {"method": "powersgd", "rank": 2, "power_iterations": 2},
    {"method": "powersgd", "rank": 2, "quantize_bits": 8},
    {"method": "powersgd", "rank": 2, "quantize_bits": 4, "deflation": True, "power_iterations": 2},
]


def _model_like(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(8, 4, 3, generator=g), "fc.weight": torch.randn(20, 30, generator=g),
            "fc.bias": torch.randn(20, generator=g)}


@pytest.mark.parametrize("compression", SETTINGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_error_feedback_telescopes(compression: dict) -> None:
    """Σ decoded payloads + final residual == Σ inputs: nothing is lost, only delayed."""
    codec = build_codec({**compression, "error_feedback": True})
    inputs = layout_of(_model_like())
    state = codec.init_state(inputs, seed=1)
    gen = torch.Generator().manual_seed(3)
    sent = {n: torch.zeros(s.shape) for n, s in inputs.items()}
    total = {n: torch.zeros(s.shape) for n, s in inputs.items()}
    for step in range(5):
        update = _model_like(seed=10 + step)
        encoded, state = codec.encode(update, state, gen)
        decoded = codec.decode(unpack(pack(encoded, codec.layout(inputs)), codec.layout(inputs)), inputs)
        for n in inputs:
            sent[n] += decoded[n]
            total[n] += update[n]
    for n in inputs:
        torch.testing.assert_close(sent[n] + state.get(f"residual/{n}", 0), total[n], atol=1e-4, rtol=1e-4)


def test_error_feedback_does_not_touch_caller_tensors() -> None:
    """The residual is explicit state, never written into the caller's update."""
    codec = build_codec({"method": "topk", "ratio": 0.1})
    update = _model_like()
    before = {n: t.clone() for n, t in update.items()}
    state = codec.init_state(layout_of(update))
    codec.encode(update, state)
    for n in update:
        assert torch.equal(update[n], before[n])


@pytest.mark.parametrize("compression", SETTINGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_packed_bytes_equal_layout_bytes(compression: dict) -> None:
    """One flat buffer per dtype; its bytes equal the sum of the layout's array bytes."""
    codec = build_codec(compression)
    x = _model_like()
    inputs = layout_of(x)
    encoded, _ = codec.encode(x, codec.init_state(inputs), torch.Generator().manual_seed(0))
    packed = pack(encoded, codec.layout(inputs))
    assert payload_nbytes(packed) == layout_nbytes(codec.layout(inputs)) == payload_nbytes(encoded)
    assert {k: v.size for k, v in packed.items()} == packed_layout(codec.layout(inputs))


def test_independent_fp32_bytes_formula() -> None:
    """r·(n+m)·4 per compressed matrix plus dense fallbacks."""
    codec = build_codec({"method": "powersgd", "rank": 2, "error_feedback": False, "quantize_bits": None, "entropy_coding": "none"})
    inputs = {"w": ArraySpec((100, 50)), "b": ArraySpec((100,))}
    assert layout_nbytes(codec.layout(inputs)) == 2 * (100 + 50) * 4 + 100 * 4


def test_shared_chain_reduce_is_linear_in_factors() -> None:
    """Shared mode + int8: the server's aggregate equals Σ w_i decode_i (factors summed, not int8 codes)."""
    inputs = {"w": ArraySpec((40, 30)), "b": ArraySpec((40,))}
    basis = init_basis(inputs, rank=3, min_compression_rate=2.0, seed=0)
    codec = build_codec({"method": "powersgd", "mode": "shared", "rank": 3, "quantize_bits": 8, "error_feedback": False},
                        basis=basis, side="left")
    g = torch.Generator().manual_seed(0)
    encs = [codec.encode({"w": torch.randn(40, 30, generator=g), "b": torch.randn(40, generator=g)}, None, g)[0]
            for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    reduced = codec.reduce(encs, weights, inputs)
    assert reduced["w.P"].shape == (40, 3)
    dense = codec.expand(reduced, inputs)
    expected = sum(w * codec.decode(e, inputs)["w"] for w, e in zip(weights, encs))
    torch.testing.assert_close(dense["w"], expected, atol=1e-5, rtol=1e-5)


def test_unpack_rejects_malformed_buffers() -> None:
    """Wrong dtype, size, shape or buffer names raise PayloadError, never IndexError."""
    layout = {"a": ArraySpec((3, 2)), "b": ArraySpec((5,), torch.int8)}
    good = {"float32": np.zeros(6, np.float32), "int8": np.zeros(5, np.int8)}
    unpack(good, layout)
    bad_cases = [
        {"float32": np.zeros(6, np.float32)},
        {**good, "int32": np.zeros(1, np.int32)},
        {**good, "float32": np.zeros(7, np.float32)},
        {**good, "float32": np.zeros(6, np.float64)},
        {**good, "float32": np.zeros((2, 3), np.float32)},
        {**good, "int8": [0, 0, 0, 0, 0]},
    ]
    for bad in bad_cases:
        with pytest.raises(PayloadError):
            unpack(bad, layout)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=4),
       st.sampled_from(SETTINGS))
def test_pack_roundtrip_any_shapes(shapes: list[tuple[int, int]], compression: dict) -> None:
    """pack → unpack is exact for any layout a codec produces."""
    codec = build_codec(compression)
    x = {f"t{i}": torch.randn(*s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)}
    inputs = layout_of(x)
    encoded, _ = codec.encode(x, codec.init_state(inputs), torch.Generator().manual_seed(0))
    layout = codec.layout(inputs)
    back = unpack(pack(encoded, layout), layout)
    for name in layout:
        assert torch.equal(back[name], encoded[name].reshape(layout[name].shape))


def test_factory_rejects_unknown_method() -> None:
    """A clear ValueError naming the valid methods."""
    with pytest.raises(ValueError, match="valid"):
        build_codec({"method": "zip"})
