"""Shared PowerSGD's server-side basis memory: exact reduction to the plain rule, and better tracking under noise."""

from __future__ import annotations

import torch

from fedpower.codecs import SharedPowerSGD, basis_from_memory, init_basis, layout_of, next_basis, update_basis_memory

SHAPES = {"conv": (12, 3, 5), "fc": (20, 30), "bias": (20,)}


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def test_zero_decay_equals_the_plain_next_basis_rule() -> None:
    """β = 0: orth(A Q̂) with A = this round's expanded aggregate is exactly next_basis(P̄), both sides."""
    inputs = layout_of(_tensors(0))
    for side in ("left", "right"):
        basis = init_basis(inputs, 3, 1.0, seed=1) if side == "left" else None
        if basis is None:  # a right-side basis has the other factor's shape: take it from a left round
            left = SharedPowerSGD(rank=3, min_compression_rate=1.0, side="left", basis=init_basis(inputs, 3, 1.0, seed=1))
            basis = next_basis(left.reduce([left.encode(_tensors(2))[0]], [1.0], inputs), "left", names=list(left.basis))
        codec = SharedPowerSGD(rank=3, min_compression_rate=1.0, side=side, basis=basis)  # type: ignore[arg-type]
        reduced = codec.reduce([codec.encode(_tensors(s))[0] for s in (3, 4)], [0.5, 0.5], inputs)
        update = codec.expand(reduced, inputs)
        memory = update_basis_memory(None, update, list(basis), beta=0.9)
        from_memory = basis_from_memory(memory, basis, side)  # type: ignore[arg-type]
        plain = next_basis(reduced, side, names=list(basis))  # type: ignore[arg-type]
        assert set(from_memory) == set(plain) == {"conv", "fc"}
        for name in plain:
            torch.testing.assert_close(from_memory[name], plain[name], rtol=1e-4, atol=1e-5)


def test_memory_decays_and_accumulates() -> None:
    """A ← β·A + Δ on (n, m) matrices; tensors not named are not kept."""
    update = _tensors(5)
    first = update_basis_memory(None, update, ["conv", "fc"], beta=0.5)
    assert set(first) == {"conv", "fc"} and first["conv"].shape == (12, 15)
    second = update_basis_memory(first, update, ["conv", "fc"], beta=0.5)
    torch.testing.assert_close(second["fc"], 1.5 * update["fc"])


def _alignment(basis: torch.Tensor, true: torch.Tensor) -> float:
    """Share of the true subspace's energy inside span(basis): ‖Bᵀ U‖² / r."""
    return float((basis.transpose(0, 1) @ true).pow(2).sum() / true.shape[1])


def test_memory_tracks_a_persistent_subspace_through_noise() -> None:
    """A fixed rank-2 signal under large fresh noise each round: the memory's basis finds it, one round's does not."""
    n, m, r = 60, 40, 2
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
    v = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
    signal = 0.3 * (u @ v.T)
    inputs = {"w": layout_of({"w": signal})["w"]}
    results = {}
    for beta in (0.0, 0.9):
        noise_gen = torch.Generator().manual_seed(1)
        basis = init_basis(inputs, r, 1.0, seed=2)
        side, memory = "left", None
        for _ in range(40):
            codec = SharedPowerSGD(rank=r, min_compression_rate=1.0, side=side, basis=basis)  # type: ignore[arg-type]
            observed = {"w": signal + 0.05 * torch.randn(n, m, generator=noise_gen)}
            reduced = codec.reduce([codec.encode(observed)[0]], [1.0], inputs)
            if beta > 0:
                memory = update_basis_memory(memory, codec.expand(reduced, inputs), ["w"], beta)
                basis = basis_from_memory(memory, basis, side)  # type: ignore[arg-type]
            else:
                basis = next_basis(reduced, side, names=["w"])  # type: ignore[arg-type]
            side = "right" if side == "left" else "left"
        # side is "left" again after an even number of rounds: the basis is Q̂ (m × r), compare with v
        results[beta] = _alignment(basis["w"], v if side == "left" else u)
    assert results[0.9] > 0.8  # measured 0.90 vs 0.17 without memory
    assert results[0.9] > results[0.0] + 0.4


def test_more_server_power_steps_reach_the_top_singular_subspace() -> None:
    """basis_power_steps > 1 converges to the memory's top-r left/right singular subspace (SVD refresh)."""
    import torch

    from fedpower.codecs.powersgd import basis_from_memory

    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen))
    spectrum = torch.tensor([1.0, 0.95, 0.9, 0.85] + [0.8 * 0.7 ** k for k in range(26)])
    a = u[:, :30] * spectrum @ v.T  # slowly decaying top: one power step cannot separate it
    start = {"w": torch.linalg.qr(torch.randn(30, 3, generator=gen))[0]}

    def distance(basis: torch.Tensor, target: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(basis @ basis.T - target @ target.T, ord=2))

    one = basis_from_memory({"w": a}, start, "left", steps=1)["w"]
    many = basis_from_memory({"w": a}, start, "left", steps=60)["w"]
    assert many.shape == (40, 3) and torch.allclose(many.T @ many, torch.eye(3), atol=1e-5)
    assert distance(many, u[:, :3]) < 0.05 < distance(one, u[:, :3])
    right = basis_from_memory({"w": a}, {"w": many}, "right", steps=60)["w"]
    assert right.shape == (30, 3) and distance(right, v[:, :3]) < 0.05
