"""DP as stages of the codec pipeline: what the server decodes stays within C, and the residual is right."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpower.codecs import ErrorFeedback, Quantize, SharedPowerSGD, build_codec, init_basis
from fedpower.codecs.base import ArraySpec, Codec
from fedpower.privacy import ClientPrivacy, central_aggregate, contribution_norm, gaussian_noise_like
from fedpower.privacy.stages import Clip

SHAPES = {"w1": (32, 20), "b1": (32,), "w2": (10, 32), "b2": (10,)}
INPUTS = {name: ArraySpec(shape) for name, shape in SHAPES.items()}


def update(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A random model update with the test shapes."""
    g = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def residual_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The error-feedback residual in a codec state, named by tensor."""
    return {k[len("residual/"):]: v for k, v in state.items() if k.startswith("residual/")}


def server_view(codec: Codec, encoded: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """What a central-DP server adds to its sum for this message: the re-clipped linear-space contribution."""
    layout = codec.linear_layout(INPUTS)
    reduced, _ = central_aggregate([codec.reduce([encoded], [1.0], INPUTS)], clip_norm=clip, noise_multiplier=0.0,
                                   expected_cohort=1.0, layout=layout, generator=torch.Generator())
    return reduced


# -- Task A: a pipeline of several stages -------------------------------------------------------------
def test_shared_clip_noise_int8_residual_is_noise_free_and_exact() -> None:
    """shared PowerSGD → clip → noise → int8: the residual is raw − decode(noise-free encoding of the clip)."""
    clip, std = 1.0, 0.3
    basis = init_basis(INPUTS, 2, 1.0, seed=0)
    compression = {"method": "powersgd", "mode": "shared", "rank": 2, "quantize_bits": 8, "min_compression_rate": 1.0}
    raw = update(1, 10.0)

    def run(noise_seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        privacy = ClientPrivacy(clip, noise_std=std, noise_generator=torch.Generator().manual_seed(noise_seed))
        codec = build_codec(compression, basis=basis, privacy=privacy)
        encoded, state = codec.encode(raw, codec.init_state(INPUTS), torch.Generator().manual_seed(7))
        return encoded, residual_of(state)

    encoded, residual = run(noise_seed=3)
    # The same computation by hand: project, clip in factor space, quantize noisy then noise-free values.
    projection = SharedPowerSGD(rank=2, min_compression_rate=1.0, side="left", basis=basis)
    factors, _ = projection.encode(raw)
    norm = contribution_norm(factors)
    assert norm > clip
    clipped = {k: v * (clip / norm) for k, v in factors.items()}
    noisy = {k: v + n for (k, v), n in zip(clipped.items(),
                                            gaussian_noise_like(clipped, std, torch.Generator().manual_seed(3)).values())}
    quantizer, g = Quantize(bits=8), torch.Generator().manual_seed(7)
    sent, _ = quantizer.encode(noisy, None, g)
    reference, _ = quantizer.encode(clipped, None, g)  # the quantizer's next draws: the noise-free twin
    for name in encoded:
        torch.testing.assert_close(encoded[name], sent[name])
    factor_layout = projection.layout(INPUTS)
    delivered = projection.decode(quantizer.decode(reference, factor_layout), INPUTS)
    for name in raw:
        torch.testing.assert_close(residual[name], raw[name] - delivered[name], rtol=1e-5, atol=1e-5)
    # Noise never reaches the residual: another noise draw, the same residual.
    _, other = run(noise_seed=4)
    for name in raw:
        torch.testing.assert_close(other[name], residual[name])
    # What the server decodes is the clipped factors plus N(0, std²) noise (and int8 rounding).
    decoded = projection.reduce([quantizer.decode(encoded, factor_layout)], [1.0], INPUTS)
    deviation = torch.cat([(decoded[k] - clipped[k]).reshape(-1) for k in decoded])
    assert float(deviation.std()) == pytest.approx(std, rel=0.15)


def test_topk_int8_central_bound_holds_on_what_the_server_decodes() -> None:
    """clip → top-k → int8 (three stages): the server's contribution is within C; residual = raw − decoded."""
    clip = 0.5
    codec = build_codec({"method": "topk", "ratio": 0.2, "quantize_bits": 8}, privacy=ClientPrivacy(clip))
    server = build_codec({"method": "topk", "ratio": 0.2, "quantize_bits": 8})
    for seed in range(5):
        raw = update(seed, 5.0)
        encoded, state = codec.encode(raw, codec.init_state(INPUTS), torch.Generator().manual_seed(seed))
        contribution = server.reduce([encoded], [1.0], INPUTS)
        assert contribution_norm(contribution) <= clip * 1.02  # int8 rounding; the server re-clips the rest
        assert contribution_norm(server_view(server, encoded, clip)) <= clip * (1 + 1e-6)
        decoded = server.decode(encoded, INPUTS)
        residual = residual_of(state)
        for name in raw:
            torch.testing.assert_close(residual[name] + decoded[name], raw[name], rtol=1e-5, atol=1e-5)


def test_clip_is_a_stage_like_any_other() -> None:
    """A Clip stage alone bounds its input; it changes no layout and decodes as the identity."""
    stage = Clip(2.0)
    raw = update(5, 3.0)
    clipped, state = stage.encode(raw)
    assert state == {} and contribution_norm(clipped) == pytest.approx(2.0, rel=1e-6)
    assert stage.layout(INPUTS) == INPUTS
    assert all(torch.equal(stage.decode(clipped, INPUTS)[k], clipped[k]) for k in raw)
    with pytest.raises(ValueError):
        Clip(0.0)


# -- #18 item 3: the bound holds on the dequantized message, and the residual is against it ------------
LOW_BIT = {
    "quantize": {"method": "quantize"},
    "topk": {"method": "topk", "ratio": 0.3},
    "powersgd": {"method": "powersgd", "rank": 2, "power_iterations": 2, "min_compression_rate": 1.0},
    "shared": {"method": "powersgd", "mode": "shared", "rank": 2, "min_compression_rate": 1.0},
}


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(sorted(LOW_BIT)), bits=st.sampled_from([2, 4, 8]), clip=st.floats(0.1, 5.0),
       scale=st.sampled_from([0.001, 1.0, 20.0]), seed=st.integers(0, 10_000))
def test_dequantized_contribution_is_within_c_and_the_residual_is_what_the_server_uses(
    kind: str, bits: int, clip: float, scale: float, seed: int,
) -> None:
    """Central DP, any bits: ‖what the server decodes‖ ≤ C exactly (its re-clip cuts nothing); EF keeps the rest."""
    compression = {**LOW_BIT[kind], "quantize_bits": bits}
    basis = init_basis(INPUTS, 2, 1.0, seed=seed) if kind == "shared" else None
    client = build_codec(compression, basis=basis, privacy=ClientPrivacy(clip))
    server = build_codec(compression, basis=basis)  # the server builds its codec without privacy settings
    raw = update(seed, scale)
    encoded, state = client.encode(raw, client.init_state(INPUTS), torch.Generator().manual_seed(seed))
    contribution = server.reduce([encoded], [1.0], INPUTS)
    norm = contribution_norm(contribution)
    assert norm <= clip, (kind, bits, norm / clip)
    used = server_view(server, encoded, clip)  # the server's re-clip leaves it as it is
    for name in used:
        torch.testing.assert_close(used[name], contribution[name], rtol=0, atol=0)
    if kind == "quantize" and contribution_norm(raw) > 1.5 * clip:
        assert norm >= 0.97 * clip, (bits, norm / clip)  # clipped clients use (nearly) all of C
    decoded = server.expand(contribution, INPUTS)  # what the server adds to the model, per unit weight
    residual = residual_of(state)
    for name in raw:
        torch.testing.assert_close(residual[name] + decoded[name], raw[name], rtol=1e-4, atol=1e-5 * max(1.0, scale))


def test_int2_message_would_exceed_c_without_the_bound() -> None:
    """Why the bound is needed: int2 rounding of a clipped update decodes ≈1.4–1.5× C."""
    raw = update(3, 10.0)
    clip = 1.0
    quantizer = Quantize(bits=2)
    clipped = Clip(clip).encode(raw)[0]
    encoded, _ = quantizer.encode(clipped, None, torch.Generator().manual_seed(0))
    assert contribution_norm(quantizer.decode(encoded, INPUTS)) > 1.3 * clip
    codec = build_codec({"method": "quantize", "quantize_bits": 2}, privacy=ClientPrivacy(clip))
    bounded, _ = codec.encode(raw, codec.init_state(INPUTS), torch.Generator().manual_seed(0))
    assert 0.99 * clip <= contribution_norm(codec.decode(bounded, INPUTS)) <= clip


# -- #18 item 4: independent PowerSGD under central DP clips the projection, not the dense update -------
def low_rank_update(seed: int, scale: float) -> dict[str, torch.Tensor]:
    """An update whose matrices are rank 2 plus a little noise (so rank-2 PowerSGD keeps most of it)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        if len(shape) == 2:
            low = torch.randn(shape[0], 2, generator=g) @ torch.randn(2, shape[1], generator=g)
            out[name] = scale * (low + 0.1 * torch.randn(shape, generator=g))
        else:
            out[name] = scale * torch.randn(shape, generator=g)
    return out


@pytest.mark.parametrize("bits", [None, 8, 2])
@pytest.mark.parametrize("low_rank", [True, False])
def test_independent_powersgd_uses_the_whole_clip_budget(bits: int | None, low_rank: bool) -> None:
    """A large update arrives with norm ≈ C (not ≈0.3·C), still ≤ C; the residual is raw − what was decoded."""
    clip = 1.0
    compression = {"method": "powersgd", "rank": 2, "power_iterations": 4, "min_compression_rate": 1.0}
    if bits is not None:
        compression["quantize_bits"] = bits
    client = build_codec(compression, privacy=ClientPrivacy(clip))
    server = build_codec(compression)
    for seed in range(3):
        raw = (low_rank_update if low_rank else update)(seed, 10.0)
        encoded, state = client.encode(raw, client.init_state(INPUTS), torch.Generator().manual_seed(seed))
        contribution = server.reduce([encoded], [1.0], INPUTS)
        norm = contribution_norm(contribution)
        assert 0.99 * clip <= norm <= clip, (seed, norm)
        residual = residual_of(state)
        for name in raw:
            torch.testing.assert_close(residual[name] + contribution[name], raw[name], rtol=1e-4, atol=1e-4)


def test_independent_powersgd_clip_feedback_off_drops_exactly_the_cut() -> None:
    """clip_feedback=False: kept − dropped residual = (1 − C/‖P Qᵀ‖)·P Qᵀ, the clipping loss of the projection."""
    compression = {"method": "powersgd", "rank": 2, "power_iterations": 2, "min_compression_rate": 1.0, "quantize_bits": None, "entropy_coding": "none"}
    raw = update(9, 10.0)
    states = []
    for feedback in (True, False):
        codec = build_codec(compression, privacy=ClientPrivacy(1.0, clip_feedback=feedback))
        states.append(residual_of(codec.encode(raw, codec.init_state(INPUTS))[1]))
    projection = build_codec({**compression, "error_feedback": False})
    projected = projection.decode(projection.encode(raw, projection.init_state(INPUTS))[0], INPUTS)
    cut = 1.0 - 1.0 / contribution_norm(projected)
    for name in raw:
        torch.testing.assert_close(states[0][name] - states[1][name], cut * projected[name], rtol=1e-4, atol=1e-4)
