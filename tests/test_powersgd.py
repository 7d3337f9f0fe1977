"""Tests for PowerSGD (independent + shared modes) and its low-rank helpers."""

from __future__ import annotations

import contextlib
import math
import socket
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

from fedpower.codecs.base import ArraySpec, PayloadError, layout_nbytes, layout_of, payload_nbytes, to_numpy
from fedpower.codecs.powersgd import (
    PowerSGD,
    SharedPowerSGD,
    basis_layout,
    compressible,
    init_basis,
    next_basis,
    orthogonalize,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def specs(tensors: dict[str, torch.Tensor]) -> dict[str, ArraySpec]:
    """Input specs of a dict of tensors."""
    return {name: ArraySpec(tuple(t.shape)) for name, t in tensors.items()}


def low_rank(n: int, m: int, singular_values: list[float], seed: int, noise: float = 0.0) -> torch.Tensor:
    """U diag(s) Vᵀ (+ Gaussian noise) with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    return u @ torch.diag(torch.tensor(singular_values)) @ v.T + noise * torch.randn(n, m, generator=g)


def svd_optimum(matrix: torch.Tensor, rank: int) -> float:
    """Frobenius error of the best rank-``rank`` approximation (Eckart–Young)."""
    s = torch.linalg.svdvals(matrix.double())
    return float(s[rank:].square().sum().sqrt())


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖."""
    return float((approx - exact).norm() / exact.norm())


def assert_orthonormal(batch: torch.Tensor, atol: float = 1e-5) -> None:
    """Columns of every matrix in the batch are orthonormal."""
    gram = batch.transpose(-2, -1) @ batch
    eye = torch.eye(batch.shape[-1]).expand_as(gram)
    torch.testing.assert_close(gram.cpu(), eye, atol=atol, rtol=0)


# ---------------------------------------------------------------- orthogonalize


def test_orthogonalize_orthonormal_and_same_span() -> None:
    batch = torch.randn(3, 10, 4, generator=torch.Generator().manual_seed(0))
    out = orthogonalize(batch)
    assert_orthonormal(out)
    # Same column space: projecting the input onto the output changes nothing.
    torch.testing.assert_close(out @ out.transpose(1, 2) @ batch, batch, atol=1e-5, rtol=1e-5)


def test_orthogonalize_matches_torch_gram_schmidt() -> None:
    batch = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(1))
    reference = batch.clone()
    torch_powersgd._orthogonalize_gram_schmidt(reference)
    torch.testing.assert_close(orthogonalize(batch), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 3])
def test_orthogonalize_zero_gives_zero(rank: int) -> None:
    out = orthogonalize(torch.zeros(2, 6, rank))
    assert torch.equal(out, torch.zeros(2, 6, rank))


def test_orthogonalize_degenerate_columns_stay_finite() -> None:
    g = torch.Generator().manual_seed(2)
    batch = torch.randn(1, 8, 4, generator=g)
    batch[0, :, 1] = 0.0  # zero column: exactly zero out
    batch[0, :, 3] = 2.0 * batch[0, :, 0]  # dependent column: zero or a unit direction, never NaN
    out = orthogonalize(batch)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :, 1], torch.zeros(8))
    kept = [0, 2] + ([3] if out[0, :, 3].norm() > 0 else [])
    assert_orthonormal(out[:, :, kept])


def test_orthogonalize_rank1_uses_each_matrix_norm() -> None:
    g = torch.Generator().manual_seed(3)
    scales = torch.tensor([1e-6, 1.0, 1e6]).view(3, 1, 1)
    batch = torch.randn(3, 7, 1, generator=g) * scales
    batch = torch.cat([batch, torch.zeros(1, 7, 1)])  # a zero matrix in the same batch
    out = orthogonalize(batch)
    torch.testing.assert_close(out[:3].norm(dim=1).squeeze(), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:3], batch[:3] / batch[:3].norm(dim=1, keepdim=True))
    assert torch.equal(out[3], torch.zeros(7, 1))


# ---------------------------------------------------------------- independent mode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deflation", [False, True])
def test_recovers_low_rank_matrix_and_conv(device: str, deflation: bool) -> None:
    matrix = low_rank(30, 20, [5.0, 3.0, 1.0], seed=0)
    conv = low_rank(16, 4 * 3 * 3, [2.0, 1.0], seed=1).reshape(16, 4, 3, 3)
    tensors = {"fc": matrix.to(device), "conv": conv.to(device)}
    codec = PowerSGD(rank=4, power_iterations=4, deflation=deflation)
    state = codec.init_state(specs(tensors), device=device, seed=0)
    encoded, new_state = codec.encode(tensors, state)
    assert all(t.device.type == device for t in [*encoded.values(), *new_state.values()])
    decoded = codec.decode(encoded, specs(tensors))
    assert decoded["conv"].shape == (16, 4, 3, 3) and decoded["fc"].dtype == torch.float32
    assert relative_error(decoded["fc"].cpu(), matrix) < 1e-5
    assert relative_error(decoded["conv"].cpu(), conv) < 1e-5


# With one power step, deflation equals Gram–Schmidt on M Q (the independent result); two steps differ.
@pytest.mark.parametrize("deflation, iterations", [(False, 1), (True, 1), (True, 2)])
def test_warm_start_approaches_svd_optimum(deflation: bool, iterations: int) -> None:
    matrix = low_rank(40, 30, [10.0, 6.0, 3.5, 2.0], seed=4, noise=0.05)
    tensors, codec = {"w": matrix}, PowerSGD(rank=4, deflation=deflation, power_iterations=iterations)
    state = codec.init_state(specs(tensors), seed=1)
    errors = []
    for _ in range(4):
        encoded, state = codec.encode(tensors, state)
        errors.append(float((codec.decode(encoded, specs(tensors))["w"] - matrix).norm()))
    optimum = svd_optimum(matrix, 4)
    assert errors[-1] <= 1.1 * optimum, (errors, optimum)
    assert errors[-1] < errors[0]


def test_state_is_seeded_and_inputs_untouched() -> None:
    tensors = {"w": torch.randn(12, 10), "b": torch.randn(12)}
    codec = PowerSGD(rank=2)
    first, again = codec.init_state(specs(tensors), seed=7), codec.init_state(specs(tensors), seed=7)
    assert torch.equal(first["w.Q"], again["w.Q"])
    assert not torch.equal(first["w.Q"], codec.init_state(specs(tensors), seed=8)["w.Q"])
    before = {k: v.clone() for k, v in tensors.items()}
    state_before = {k: v.clone() for k, v in first.items()}
    encoded, _ = codec.encode(tensors, first)
    assert all(torch.equal(tensors[k], before[k]) for k in tensors)
    assert all(torch.equal(first[k], state_before[k]) for k in first)
    tensors["b"].add_(1.0)  # the caller editing its tensors later must not change the payload
    assert torch.equal(encoded["b"], before["b"])


def test_zero_and_rank_deficient_updates_do_not_collapse_the_warm_start() -> None:
    codec = PowerSGD(rank=3)
    zero = {"w": torch.zeros(16, 12)}
    state = codec.init_state(specs(zero), seed=0)
    encoded, state = codec.encode(zero, state)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in encoded.values())
    assert (state["w.Q"].norm(dim=0) > 0).all()
    rank_one = {"w": torch.outer(torch.randn(16), torch.randn(12))}
    _, state = codec.encode(rank_one, state)
    # After a zero round and a rank-1 round, one power step must still find a full rank-3 update.
    full = {"w": low_rank(16, 12, [3.0, 2.0, 1.0], seed=5)}
    encoded, _ = codec.encode(full, state)
    assert relative_error(codec.decode(encoded, specs(full))["w"], full["w"]) < 1e-5


def test_byte_counts_and_fallback() -> None:
    tensors = {
        "fc": torch.randn(64, 32), "conv": torch.randn(16, 8, 3, 3), "bias": torch.randn(64),
        "small": torch.randn(4, 4), "scalar": torch.tensor(1.5),
    }
    codec = PowerSGD(rank=4)
    assert compressible(specs(tensors), 4, 2.0) == {"fc": (64, 32, 4), "conv": (16, 72, 4)}
    layout = codec.layout(specs(tensors))
    expected = 4 * (64 + 32) * 4 + 4 * (16 + 72) * 4 + (64 + 16 + 1) * 4
    assert layout_nbytes(layout) == expected
    encoded, _ = codec.encode(tensors, codec.init_state(specs(tensors)))
    assert layout_of(encoded) == layout and payload_nbytes(to_numpy(encoded)) == expected
    for name in ("bias", "small", "scalar"):
        assert encoded[name].dtype == torch.float32 and torch.equal(encoded[name], tensors[name])
    # Threshold is n·m / (r'·(n+m)) ≥ rate: 8×8 at rank 2 saves exactly 2×.
    square = {"sq": ArraySpec((8, 8))}
    assert compressible(square, 2, 2.0) == {"sq": (8, 8, 2)}
    assert compressible(square, 2, 2.01) == {}
    assert PowerSGD(rank=2, min_compression_rate=2.01).layout(square) == {"sq": ArraySpec((8, 8))}
    # r' = min(rank, n, m)
    assert compressible({"tall": ArraySpec((100, 2))}, 8, 0.5) == {"tall": (100, 2, 2)}


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 9), max_size=4), min_size=1, max_size=4),
    rank=st.integers(1, 4), deflation=st.booleans(), seed=st.integers(0, 2**16),
)
def test_roundtrip_shapes_dtypes_finite(shapes: list[list[int]], rank: int, deflation: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(tuple(shape), generator=g) for i, shape in enumerate(shapes)}
    codec = PowerSGD(rank=rank, deflation=deflation, min_compression_rate=0.5)
    inputs = specs(tensors)
    encoded, state = codec.encode(tensors, codec.init_state(inputs, seed=seed))
    assert layout_of(encoded) == codec.layout(inputs)
    assert layout_of(state) == layout_of(codec.init_state(inputs))
    decoded = codec.decode(encoded, inputs)
    assert list(decoded) == list(tensors)
    for name, t in tensors.items():
        assert decoded[name].shape == t.shape and decoded[name].dtype == torch.float32
        assert torch.isfinite(decoded[name]).all()


# ---------------------------------------------------------------- malformed payloads


def _malformed_variants(encoded: dict[str, torch.Tensor], factor: str) -> list[dict[str, torch.Tensor]]:
    """Copies of ``encoded`` each broken in one way."""
    variants = []
    missing = dict(encoded)
    del missing[factor]
    variants.append(missing)
    variants.append({**encoded, "unexpected": torch.zeros(1)})
    variants.append({**encoded, factor: torch.zeros(encoded[factor].shape[0] + 1, encoded[factor].shape[1])})
    variants.append({**encoded, factor: encoded[factor].to(torch.float16)})
    variants.append({**encoded, factor: encoded[factor].to(torch.float64)})
    nan = encoded[factor].clone()
    nan[0, 0] = float("nan")
    variants.append({**encoded, factor: nan})
    inf = encoded["b"].clone()
    inf[0] = float("inf")
    variants.append({**encoded, "b": inf})
    return variants


def test_malformed_payloads_raise_payload_error() -> None:
    tensors = {"w": torch.randn(12, 10), "b": torch.randn(12)}
    inputs = specs(tensors)
    codec = PowerSGD(rank=2)
    encoded, _ = codec.encode(tensors, codec.init_state(inputs))
    for bad in _malformed_variants(encoded, "w.Q"):
        with pytest.raises(PayloadError):
            codec.decode(bad, inputs)
    shared = SharedPowerSGD(rank=2, min_compression_rate=2.0, side="left", basis=init_basis(inputs, 2, 2.0, seed=0))
    encoded, _ = shared.encode(tensors)
    for bad in _malformed_variants(encoded, "w.P"):
        for call in (lambda: shared.decode(bad, inputs), lambda: shared.reduce([encoded, bad], [0.5, 0.5], inputs)):
            with pytest.raises(PayloadError):
                call()
    broken_basis = {"w": torch.full((10, 2), float("nan"))}
    for basis in (broken_basis, {"w": torch.zeros(9, 2)}, {}):
        codec_with_bad_basis = SharedPowerSGD(rank=2, min_compression_rate=2.0, side="left", basis=basis)
        with pytest.raises(PayloadError):
            codec_with_bad_basis.encode(tensors)


# ---------------------------------------------------------------- shared mode


@pytest.mark.parametrize("device", DEVICES)
def test_shared_mode_aggregation_equals_centralized_projection(device: str) -> None:
    g = torch.Generator().manual_seed(6)
    shapes = {"fc": (20, 12), "fc2": (20, 12), "conv": (6, 2, 3, 3), "bias": (20,)}
    clients = [{k: torch.randn(s, generator=g).to(device) for k, s in shapes.items()} for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    inputs, rank, rate = specs(clients[0]), 2, 2.0
    total = {k: sum(w * c[k] for w, c in zip(weights, clients)) for k in shapes}

    basis = init_basis(inputs, rank, rate, seed=3, device=device)
    assert layout_of(basis) == basis_layout(inputs, rank, rate, "left")
    for b in basis.values():
        assert_orthonormal(b.unsqueeze(0))
    assert all(torch.equal(basis[k], init_basis(inputs, rank, rate, seed=3, device=device)[k]) for k in basis)

    left = SharedPowerSGD(rank=rank, min_compression_rate=rate, side="left", basis=basis)
    assert left.linear_space_is_factors and left.init_state(inputs) == {}
    encoded = [left.encode(c)[0] for c in clients]
    assert layout_of(encoded[0]) == left.layout(inputs) and "fc.P" in encoded[0]
    own = left.decode(encoded[0], inputs)
    q_hat = basis["fc"]
    torch.testing.assert_close(own["fc"], clients[0]["fc"] @ q_hat @ q_hat.T, atol=1e-5, rtol=1e-5)
    reduced = left.reduce(encoded, weights, inputs)
    update = left.expand(reduced, inputs)
    for name in ("fc", "conv"):
        q_hat = basis[name]
        expected = total[name].reshape(total[name].shape[0], -1) @ q_hat @ q_hat.T
        torch.testing.assert_close(update[name], expected.reshape(shapes[name]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(update["bias"], total["bias"], atol=1e-6, rtol=1e-6)

    p_basis = next_basis(reduced, "left")
    assert layout_of(p_basis) == basis_layout(inputs, rank, rate, "right")
    assert_orthonormal(torch.stack([p_basis["fc"], p_basis["fc2"]]))
    right = SharedPowerSGD(rank=rank, min_compression_rate=rate, side="right", basis=p_basis)
    encoded = [right.encode(c)[0] for c in clients]
    assert "fc.Q" in encoded[0] and "fc.P" not in encoded[0]
    reduced = right.reduce(encoded, weights, inputs)
    update = right.expand(reduced, inputs)
    for name in ("fc", "conv"):
        p_hat = p_basis[name]
        expected = p_hat @ p_hat.T @ total[name].reshape(p_hat.shape[0], -1)
        torch.testing.assert_close(update[name], expected.reshape(shapes[name]), atol=1e-5, rtol=1e-5)
    q_next = next_basis(reduced, "right")
    assert layout_of(q_next) == basis_layout(inputs, rank, rate, "left")
    assert_orthonormal(q_next["conv"].unsqueeze(0))


def test_next_basis_of_zero_factors_is_orthonormal() -> None:
    reduced = {"w.P": torch.zeros(10, 3), "b": torch.zeros(10)}
    basis = next_basis(reduced, "left")
    assert list(basis) == ["w"] and torch.isfinite(basis["w"]).all()
    assert_orthonormal(basis["w"].unsqueeze(0))
    assert list(next_basis({"x.P": torch.ones(4, 2), "w.P": torch.ones(4, 2)}, "left", names=["w"])) == ["w"]


@settings(max_examples=25, deadline=None)
@given(
    a=st.floats(-3, 3), b=st.floats(-3, 3), side=st.sampled_from(["left", "right"]),
    n=st.integers(4, 12), m=st.integers(4, 12), seed=st.integers(0, 2**16),
)
def test_shared_mode_is_linear(a: float, b: float, side: str, n: int, m: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = {"w": torch.randn(n, m, generator=g), "v": torch.randn(n, generator=g)}
    y = {"w": torch.randn(n, m, generator=g), "v": torch.randn(n, generator=g)}
    inputs = specs(x)
    basis = init_basis(inputs, 1, 1.0, seed=seed)
    if side == "right":
        basis = {"w": orthogonalize(torch.randn(1, n, 1, generator=g))[0]}
    codec = SharedPowerSGD(rank=1, min_compression_rate=1.0, side=side, basis=basis)
    combined = codec.encode({k: a * x[k] + b * y[k] for k in x})[0]
    separate = codec.reduce([codec.encode(x)[0], codec.encode(y)[0]], [a, b], inputs)
    for key in combined:
        torch.testing.assert_close(combined[key], separate[key], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- reference: torch's powerSGD_hook


@contextlib.contextmanager
def gloo_group() -> Iterator[None]:
    """A single-process gloo group on a free local port, always destroyed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _FakeBucket:
    """Duck-typed GradBucket, used only if torch stops exposing a way to build a real one."""

    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        self._buffer = torch.zeros(sum(math.prod(s) for s in shapes))
        self._grads, offset = [], 0
        for s in shapes:
            self._grads.append(self._buffer[offset : offset + math.prod(s)].view(s))
            offset += math.prod(s)

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return self._grads

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True


def grad_bucket(shapes: list[tuple[int, ...]]):  # noqa: ANN201 - GradBucket or its stand-in
    """A real dist.GradBucket holding one gradient per shape (via the Reducer DDP itself uses)."""
    try:
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        reducer = dist.Reducer(params, [list(range(len(params)))], [1 << 26], dist.group.WORLD)
        bucket = reducer._get_zeros_like_grad_buckets()[0]
        assert [tuple(t.shape) for t in bucket.gradients()] == shapes
        return bucket
    except Exception:  # private API: fall back to a stand-in with the same methods
        return _FakeBucket(shapes)


def unpack_hook_qs(flat: torch.Tensor, shapes: dict[str, tuple[int, ...]], rank: int, rate: float) -> dict:
    """Per-tensor Q (m, r') from the hook's flat q memory (batched by matrix shape, first-seen order)."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, shape in shapes.items():
        n, m = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
        r = min(rank, n, m)
        if len(shape) > 1 and torch_powersgd._should_compress(n, m, r, rate)[0]:
            groups.setdefault((n, m), []).append(name)
    out, offset = {}, 0
    for (n, m), names in groups.items():
        r = min(rank, n, m)
        block = flat[offset : offset + len(names) * m * r].view(len(names), m, r)
        out.update({f"{name}.Q": block[i].clone() for i, name in enumerate(names)})
        offset += len(names) * m * r
    return out


@pytest.mark.parametrize("rank", [1, 3])
def test_matches_torch_powersgd_hook(rank: int) -> None:
    shapes = {"fc": (20, 12), "fc2": (20, 12), "conv": (8, 4, 3, 3), "bias": (20,)}
    g = torch.Generator().manual_seed(8)
    updates = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(4)]
    codec = PowerSGD(rank=rank, min_compression_rate=2.0)
    inputs = {k: ArraySpec(s) for k, s in shapes.items()}
    assert set(codec.dims(inputs)) == {"fc", "fc2", "conv"}
    with gloo_group():
        bucket = grad_bucket(list(shapes.values()))
        hook_state = torch_powersgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=2, min_compression_rate=2,
            use_error_feedback=True, warm_start=True, batch_tensors_with_same_shape=True, random_seed=0,
        )
        # The constructor insists on ≥ 2 warm-up steps (DDP rebuilds buckets after step 1); a fixed
        # bucket has no such rebuild, so compress from step 0.
        hook_state.start_powerSGD_iter = 0
        error = {k: torch.zeros(s) for k, s in shapes.items()}
        state = None
        for step, update in enumerate(updates):
            bucket.buffer().copy_(torch.cat([update[k].reshape(-1) for k in shapes]))
            hook_flat = torch_powersgd.powerSGD_hook(hook_state, bucket).wait().clone()
            hook_out, offset = {}, 0
            for k, s in shapes.items():
                hook_out[k] = hook_flat[offset : offset + math.prod(s)].view(s)
                offset += math.prod(s)
            hook_q = unpack_hook_qs(hook_state.q_memory_dict[0], shapes, rank, 2.0)
            corrected = {k: update[k] + error[k] for k in shapes}  # the hook's own error feedback
            if step > 0:  # step 0: the hook draws a random Q we cannot see; from then on, share its warm start
                encoded, state = codec.encode(corrected, state)
                decoded = codec.decode(encoded, inputs)
                for k in shapes:
                    scale = float(hook_out[k].abs().max())
                    torch.testing.assert_close(decoded[k], hook_out[k], atol=1e-5 * scale, rtol=1e-5)
                for key, q in hook_q.items():  # same warm start, up to column signs (QR sign convention)
                    signs = torch.sign((q * state[key]).sum(dim=0))
                    torch.testing.assert_close(state[key] * signs, q, atol=1e-4 * float(q.abs().max()), rtol=1e-5)
            else:
                state = hook_q
            error = {k: corrected[k] - hook_out[k] for k in shapes}
