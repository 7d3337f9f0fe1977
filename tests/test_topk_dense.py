"""Tests for the top-k and dense codecs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fedpower.codecs.base import ArraySpec, PayloadError, from_numpy, layout_of, payload_nbytes, to_numpy
from fedpower.codecs.dense import Dense
from fedpower.codecs.topk import TopK


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


# --- top-k ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio, numel, k",
    [(0.01, 1000, 10), (0.07, 100, 7), (0.1, 10, 1), (1e-9, 50, 1), (1.0, 37, 37), (0.5, 1, 1), (0.3, 0, 0),
     (0.011, 1000, 11), (0.0105, 1000, 11), (0.999, 3, 3)],
)
def test_k_formula(ratio: float, numel: int, k: int) -> None:
    """k = max(1, ceil(ratio · numel)), 0 for empty arrays, not tripped by float error."""
    assert TopK(ratio).k(numel) == k


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1"])
def test_invalid_ratio(ratio: object) -> None:
    """Ratios outside (0, 1] are refused."""
    with pytest.raises(ValueError):
        TopK(ratio)  # type: ignore[arg-type]


def test_topk_keeps_largest_magnitudes() -> None:
    """The kept entries are the largest |x| (negatives included); the rest decode to zero."""
    x = torch.tensor([[0.1, -5.0, 0.2], [3.0, -0.3, 0.0], [0.05, 4.0, -2.0]])
    codec = TopK(0.4)  # k = ceil(3.6) = 4
    encoded, state = codec.encode({"w": x})
    assert state == {}
    assert encoded["w.indices"].dtype == torch.int32 and encoded["w.values"].dtype == torch.float32
    assert encoded["w.indices"].tolist() == [1, 3, 7, 8]  # ascending
    assert encoded["w.values"].tolist() == [-5.0, 3.0, 4.0, -2.0]
    decoded = codec.decode(encoded, {"w": ArraySpec((3, 3))})["w"]
    expected = torch.where(x.abs() >= 2.0, x, torch.zeros(()))
    assert torch.equal(decoded, expected)


@pytest.mark.parametrize("shape", [(), (1,), (5,), (1000,), (30, 7), (2, 3, 4, 5)])
@pytest.mark.parametrize("ratio", [0.01, 0.25, 1.0])
def test_topk_bytes_and_roundtrip(shape: tuple[int, ...], ratio: float) -> None:
    """8 bytes per kept entry; decode keeps exactly the selected entries."""
    x = torch.randn(shape, generator=gen())
    codec = TopK(ratio)
    encoded, _ = codec.encode({"w": x})
    k = codec.k(x.numel())
    assert payload_nbytes(to_numpy(encoded)) == 8 * k
    decoded = codec.decode(encoded, {"w": ArraySpec(shape)})["w"]
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    kept = decoded != 0
    assert int(kept.sum()) == k
    assert torch.equal(decoded[kept], x[kept])
    if k < x.numel():
        assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())
    if ratio == 1.0:
        assert torch.equal(decoded, x)


def test_topk_through_numpy() -> None:
    """The payload survives the numpy wire format."""
    x = {"a": torch.randn(40, 3, generator=gen()), "b": torch.randn(17, generator=gen(1))}
    codec = TopK(0.2)
    encoded, _ = codec.encode(x)
    decoded = codec.decode(from_numpy(to_numpy(encoded)), layout_of(x))
    direct = codec.decode(encoded, layout_of(x))
    assert all(torch.equal(decoded[k], direct[k]) for k in x)


def test_topk_pass_through_and_no_aliasing() -> None:
    """Non-float32 arrays pass through; encoded arrays never alias the caller's tensors."""
    x = {"w": torch.randn(10, generator=gen()), "i": torch.arange(4, dtype=torch.int32)}
    encoded, _ = TopK(0.5).encode(x)
    assert torch.equal(encoded["i"], x["i"])
    encoded["i"].add_(1)
    encoded["w.values"].mul_(0)
    assert x["i"].tolist() == [0, 1, 2, 3] and bool((x["w"] != 0).all())
    assert TopK(0.5).decode(TopK(0.5).encode(x)[0], layout_of(x))["i"].tolist() == [0, 1, 2, 3]


def test_topk_deterministic() -> None:
    """Same input, same payload (no randomness; ties resolved the same way)."""
    x = {"w": torch.randint(-3, 4, (500,), generator=gen()).float()}  # many ties
    first, _ = TopK(0.1).encode(x, generator=gen(1))
    second, _ = TopK(0.1).encode(x, generator=gen(2))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_topk_name_collision_rejected() -> None:
    """An input named like an encoded array is refused rather than silently overwritten."""
    with pytest.raises(ValueError):
        TopK(0.5).encode({"w": torch.randn(4), "w.values": torch.zeros(2, dtype=torch.int32)})


def _topk_malformations() -> list[tuple[str, dict[str, torch.Tensor]]]:
    encoded, _ = TopK(0.5).encode({"w": torch.randn(4, 5, generator=gen())})
    values, indices = encoded["w.values"], encoded["w.indices"]  # k = 10 of 20
    def with_index(position: int, index: int) -> dict[str, torch.Tensor]:
        bad = indices.clone()
        bad[position] = index
        return {"w.values": values, "w.indices": bad}
    return [
        ("missing", {"w.values": values}),
        ("extra", {**encoded, "x": torch.zeros(1)}),
        ("index too large", with_index(3, 20)),
        ("index huge", with_index(0, 2**31 - 1)),
        ("negative index", with_index(9, -1)),
        ("duplicate index", with_index(1, int(indices[5]))),
        ("index dtype", {"w.values": values, "w.indices": indices.long()}),
        ("values dtype", {"w.values": values.half(), "w.indices": indices}),
        ("k mismatch", {"w.values": values[:-1], "w.indices": indices[:-1]}),
        ("values shape", {"w.values": values[:, None], "w.indices": indices}),
        ("nan value", {"w.values": torch.where(torch.arange(10) == 2, float("nan"), values), "w.indices": indices}),
        ("inf value", {"w.values": torch.full_like(values, float("inf")), "w.indices": indices}),
        ("not a tensor", {"w.values": values.numpy(), "w.indices": indices}),
    ]


@pytest.mark.parametrize("label, bad", _topk_malformations(), ids=lambda v: v if isinstance(v, str) else "")
def test_topk_malformed_payloads_raise_payload_error(label: str, bad: dict[str, torch.Tensor]) -> None:
    """Bad indices or layouts are PayloadErrors, never IndexErrors from deep inside."""
    with pytest.raises(PayloadError):
        TopK(0.5).decode(bad, {"w": ArraySpec((4, 5))})


def test_topk_with_nan_input_is_rejected_at_decode() -> None:
    """A NaN in the update is selected (largest) and the decoder refuses the payload."""
    x = torch.randn(10, generator=gen())
    x[3] = float("nan")
    encoded, _ = TopK(0.3).encode({"w": x})
    with pytest.raises(PayloadError):
        TopK(0.3).decode(encoded, {"w": ArraySpec((10,))})


# --- dense ----------------------------------------------------------------------------------------------


def test_dense_identity_and_bytes() -> None:
    """fp32 arrays under their own names, 4 bytes per value, exact round trip, no aliasing."""
    x = {"a": torch.randn(7, 3, generator=gen()), "b": torch.randn(5, generator=gen(1)), "c": torch.zeros(0, 2)}
    codec = Dense()
    encoded, state = codec.encode(x)
    assert state == {} and codec.init_state(layout_of(x)) == {}
    assert layout_of(encoded) == layout_of(x) == codec.layout(layout_of(x))
    assert payload_nbytes(to_numpy(encoded)) == 4 * (21 + 5)
    decoded = codec.decode(from_numpy(to_numpy(encoded)), layout_of(x))
    assert all(torch.equal(decoded[k], x[k]) for k in x)
    encoded["a"].zero_()
    assert bool((x["a"] != 0).any())


def test_dense_reduce_is_weighted_sum() -> None:
    """The default reduce/expand of a dense codec is the weighted sum of the decoded updates."""
    codec = Dense()
    x1, x2 = {"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}
    reduced = codec.reduce([codec.encode(x1)[0], codec.encode(x2)[0]], [0.25, 0.75], layout_of(x1))
    assert torch.allclose(codec.expand(reduced, layout_of(x1))["w"], torch.full((3,), 1.75))


def _dense_malformations() -> list[tuple[str, dict[str, object]]]:
    w = torch.randn(4, 5, generator=gen())
    return [
        ("missing", {}),
        ("extra", {"w": w, "v": w}),
        ("shape", {"w": w.reshape(5, 4)}),
        ("dtype", {"w": w.half()}),
        ("nan", {"w": torch.full_like(w, float("nan"))}),
        ("inf", {"w": torch.full_like(w, -float("inf"))}),
        ("not a tensor", {"w": np.zeros((4, 5), np.float32)}),
    ]


@pytest.mark.parametrize("label, bad", _dense_malformations(), ids=lambda v: v if isinstance(v, str) else "")
def test_dense_malformed_payloads_raise_payload_error(label: str, bad: dict[str, torch.Tensor]) -> None:
    """Malformed dense payloads are PayloadErrors."""
    with pytest.raises(PayloadError):
        Dense().decode(bad, {"w": ArraySpec((4, 5))})


def test_unsendable_input_dtype_rejected() -> None:
    """A float64 input cannot travel: refused at encode, PayloadError at decode."""
    for codec in (Dense(), TopK(0.5)):
        with pytest.raises(ValueError):
            codec.encode({"w": torch.zeros(3, dtype=torch.float64)})
        with pytest.raises(PayloadError):
            codec.decode({}, {"w": ArraySpec((3,), torch.float64)})


def test_zero_d_array_survives_numpy_payload() -> None:
    """A scalar sent by the dense codec keeps shape () across the numpy wire format."""
    x = {"s": torch.tensor(2.5)}
    encoded, _ = Dense().encode(x)
    assert Dense().decode(from_numpy(to_numpy(encoded)), layout_of(x))["s"].shape == ()


# --- device ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("codec", [Dense(), TopK(0.1)], ids=repr)
def test_cuda_matches_cpu(codec: Dense | TopK) -> None:
    """Outputs stay on the input's device and equal the CPU payload."""
    x = {"a": torch.randn(300, generator=gen()), "b": torch.randn(64, 5, generator=gen(1))}
    cpu, _ = codec.encode(x)
    cuda, _ = codec.encode({k: v.cuda() for k, v in x.items()})
    assert all(v.is_cuda for v in cuda.values())
    assert all(torch.equal(cpu[k], cuda[k].cpu()) for k in cpu)
    decoded = codec.decode(cuda, layout_of(x))
    assert all(decoded[k].is_cuda and torch.equal(decoded[k].cpu(), codec.decode(cpu, layout_of(x))[k]) for k in x)


# --- property test ---------------------------------------------------------------------------------------

shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 300)),
    st.tuples(st.integers(0, 40), st.integers(0, 6)),
    st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 3), st.integers(0, 5)),
)
codecs = st.one_of(st.just(Dense()), st.builds(TopK, st.floats(1e-4, 1.0)))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(codec=codecs, shape_list=st.lists(shapes, min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_property_layout_and_decode(codec: Dense | TopK, shape_list: list[tuple[int, ...]], seed: int) -> None:
    """For random shapes: the layout predicts the payload exactly; decode gives float32 input shapes."""
    x = {f"t{i}": torch.randn(shape, generator=gen(seed + i)) for i, shape in enumerate(shape_list)}
    encoded, state = codec.encode(x)
    assert state == {}
    assert layout_of(encoded) == codec.layout(layout_of(x))
    decoded = codec.decode(encoded, layout_of(x))
    assert decoded.keys() == x.keys()
    for name, t in x.items():
        assert decoded[name].dtype == torch.float32 and decoded[name].shape == t.shape
        if isinstance(codec, TopK):
            assert int((decoded[name] != 0).sum()) <= codec.k(t.numel())
            assert math.isclose(float(decoded[name].norm() ** 2 + (t - decoded[name]).norm() ** 2),
                                float(t.norm() ** 2), rel_tol=1e-4, abs_tol=1e-6)
        else:
            assert torch.equal(decoded[name], t)
