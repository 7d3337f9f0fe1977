"""Differential privacy: clipping, noise scale, sensitivity, sampling, accounting, budgets, config errors."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpower.codecs import ErrorFeedback, PowerSGD, SharedPowerSGD, build_codec, init_basis, layout_of
from fedpower.codecs.base import ArraySpec, Codec
from fedpower.privacy import (
    Accountant, BudgetExceeded, ClientPrivacy, calibrate_noise, central_aggregate, client_privacy, clip_contribution,
    cohort_sampler, contribution_norm, gaussian_noise_like, make_plan,
)
ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
SHAPES = {"w1": (24, 16), "b1": (24,), "w2": (10, 24), "b2": (10,)}
INPUTS = {name: ArraySpec(shape) for name, shape in SHAPES.items()}
SHARED = {"method": "powersgd", "mode": "shared", "rank": 2, "quantize_bits": 8, "min_compression_rate": 1.0}
CODECS = {
    "dense": {"method": "none"},
    "int8": {"method": "int8"},
    "topk": {"method": "topk", "ratio": 0.1},
    "powersgd": {"method": "powersgd", "rank": 2, "power_iterations": 2, "quantize_bits": 8,
                 "min_compression_rate": 1.0},
    "shared": SHARED,
}


def update(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A random model update with the test shapes."""
    g = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def codec_for(compression: dict, privacy: ClientPrivacy | None = None) -> Codec:
    """The client (with ``privacy``) or server codec of a compression setting (shared mode: a seeded basis)."""
    basis = init_basis(INPUTS, 2, 1.0, seed=0) if compression is SHARED else None
    return build_codec(compression, basis=basis, privacy=privacy)


def shared_projection() -> SharedPowerSGD:
    """The shared-mode projection of ``SHARED`` (the first round's basis)."""
    return SharedPowerSGD(rank=2, min_compression_rate=1.0, side="left", basis=init_basis(INPUTS, 2, 1.0, seed=0))


def linear_space(compression: dict, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where a client clips ``raw`` under central DP: shared factors, independent ``P Qᵀ``, else the update."""
    if compression is SHARED:
        return shared_projection().encode(raw)[0]
    if compression["method"] == "powersgd":
        projection = PowerSGD(rank=2, power_iterations=2, min_compression_rate=1.0)
        return projection.decode(projection.encode(raw)[0], INPUTS)
    return raw


def residual_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The error-feedback residual in a codec state (named by tensor)."""
    return {k[len("residual/"):]: v for k, v in state.items() if k.startswith("residual/")}


def server_contribution(codec: Codec, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the server decodes from one payload, in the linear space (as CompressedFedAvg does)."""
    return codec.reduce([encoded], [1.0], INPUTS)


# -- accounting: ε always equals an independent dp-accounting computation ----------------------------
@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_poisson_epsilon_matches_dp_accounting(method: str) -> None:
    """Add-or-remove-one, PoissonSampledDpEvent(q, Gaussian(σ)) composed once per round."""
    q, sigma, rounds = 0.1, 1.1, 7
    accountant = Accountant(sigma, "poisson", sample_rate=q, method=method)
    for _ in range(rounds):
        accountant.step()
    fresh = pld.PLDAccountant() if method == "pld" else rdp.RdpAccountant()
    fresh.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    assert accountant.epsilon(DELTA) == pytest.approx(fresh.get_epsilon(DELTA), rel=1e-9)
    assert accountant.neighbouring_relation == "add-or-remove one client"


def test_fixed_sampling_is_replace_one_with_sensitivity_2c() -> None:
    """Fixed-size cohorts: RDP, replace-one, SampledWithoutReplacement(N, k, Gaussian(σ/2))."""
    accountant = Accountant(2.0, "fixed", population=50, cohort=5, method="rdp")
    accountant.step(4)
    fresh = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    fresh.compose(dp_accounting.SampledWithoutReplacementDpEvent(50, 5, dp_accounting.GaussianDpEvent(1.0)), 4)
    assert accountant.epsilon(DELTA) == pytest.approx(fresh.get_epsilon(DELTA), rel=1e-9)
    assert "replace one" in accountant.neighbouring_relation
    with pytest.raises(ValueError, match="RDP"):
        Accountant(1.0, "fixed", population=50, cohort=5, method="pld")


def test_local_dp_composes_unamplified_gaussians() -> None:
    """Local DP: one Gaussian(σ/2) per participation, no amplification by sampling."""
    accountant = Accountant(3.0, "local")
    accountant.step(6)
    fresh = rdp.RdpAccountant()
    fresh.compose(dp_accounting.GaussianDpEvent(1.5), 6)
    assert accountant.epsilon(DELTA) == pytest.approx(fresh.get_epsilon(DELTA), rel=1e-9)


def test_accountant_edge_cases_and_state() -> None:
    """No step: ε = 0; σ = 0: ε = ∞; state round-trips; ε grows with steps."""
    assert Accountant(1.0, "poisson", sample_rate=0.2).epsilon(DELTA) == 0.0
    zero = Accountant(0.0, "poisson", sample_rate=0.2)
    zero.step()
    assert math.isinf(zero.epsilon(DELTA))
    accountant = Accountant(1.0, "poisson", sample_rate=0.2)
    accountant.step(3)
    restored = Accountant.restore(accountant.state)
    assert restored.steps == 3 and restored.epsilon(DELTA) == accountant.epsilon(DELTA)
    restored.step()
    assert restored.epsilon(DELTA) > accountant.epsilon(DELTA)
    with pytest.raises(ValueError):
        Accountant(-1.0)


@pytest.mark.parametrize("sampling,extra", [("poisson", {"sample_rate": 0.1}),
                                            ("fixed", {"population": 100, "cohort": 10}), ("local", {})])
def test_calibration_hits_the_target(sampling: str, extra: dict) -> None:
    """Calibrated σ meets the target and is (nearly) the smallest that does."""
    target, steps = 4.0, 20
    sigma = calibrate_noise(target, DELTA, steps, sampling=sampling, **extra)
    assert Accountant(sigma, sampling, **extra).epsilon(DELTA, steps) <= target
    assert Accountant(sigma - 1e-2, sampling, **extra).epsilon(DELTA, steps) > target
    assert Accountant(sigma, sampling, **extra).epsilon(DELTA, steps) == pytest.approx(target, rel=0.01)


def test_plan_calibrates_and_reports_epsilon_per_round() -> None:
    """make_plan: σ from target_epsilon over the planned rounds; ε per round = dp-accounting's."""
    plan = make_plan({"mode": "central", "clip_norm": 1.0, "target_epsilon": 5.0, "delta": DELTA},
                     num_clients=40, cohort_size=4, rounds=12)
    assert plan.calibrated and plan.planned_epsilon <= 5.0 and plan.expected_cohort == 4.0
    for server_round in range(1, 13):
        assert not plan.would_exceed([0, 1])
        plan.record([])  # an empty Poisson cohort still releases noise: it counts
        fresh = rdp.RdpAccountant()
        fresh.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(
            plan.noise_multiplier)), server_round)
        assert plan.epsilon == pytest.approx(fresh.get_epsilon(DELTA), rel=1e-9)


def test_budget_stops_before_the_round_that_would_exceed_it() -> None:
    """on_budget_exceeded: stop → train while the next round fits; error → refuse to start."""
    privacy = {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 4.0, "delta": DELTA}
    plan = make_plan(privacy, num_clients=100, cohort_size=10, rounds=100)
    ran = 0
    while ran < 100 and not plan.would_exceed([1, 2, 3]):
        plan.record([1, 2, 3])
        ran += 1
    assert 1 < ran < 100 and ran == plan.accountant.steps_within(4.0, DELTA, 100)
    assert plan.epsilon <= 4.0 < plan.accountant.epsilon(DELTA, ran + 1)
    assert "allows" in plan.planned_summary()
    with pytest.raises(BudgetExceeded, match="target_epsilon=4"):
        make_plan({**privacy, "on_budget_exceeded": "error"}, num_clients=100, cohort_size=10, rounds=100)


def test_strategy_stops_or_errors_when_the_budget_is_spent() -> None:
    """CompressedFedAvg sends nothing once the next round would exceed the budget, and records why."""
    from flwr.app import ArrayRecord, ConfigRecord

    from conftest import strategy_settings
    from strategies.compressed import CompressedFedAvg

    privacy = {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 0.3, "target_epsilon": 0.5, "delta": DELTA}
    for policy in ("stop", "error"):
        plan = make_plan({**privacy, "on_budget_exceeded": "stop"}, num_clients=4, cohort_size=2, rounds=3)
        plan.on_budget_exceeded = policy
        strategy = CompressedFedAvg(strategy_settings(name="dp"), update(0), lambda r: [11, 12],
                                    node_partitions={11: 0, 12: 1}, privacy=plan)
        if policy == "error":
            with pytest.raises(BudgetExceeded):
                strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None)  # type: ignore[arg-type]
            continue
        assert list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None)) == []  # type: ignore[arg-type]
        assert strategy.stop_reason and "privacy budget" in strategy.stop_reason and strategy.halted()
        assert strategy.aggregate_train(1, []) == (None, None) and strategy.epsilon == 0.0


# -- clipping, noise, sensitivity ------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-3, 1e3), clip=st.floats(1e-2, 10.0), seed=st.integers(0, 10_000))
def test_clip_bounds_the_whole_contribution(scale: float, clip: float, seed: int) -> None:
    """The joint norm ends ≤ C, direction kept; contributions inside the ball are unchanged."""
    tensors = update(seed, scale)
    clipped, norm = clip_contribution(tensors, clip)
    assert norm == pytest.approx(contribution_norm(tensors))
    assert contribution_norm(clipped) <= clip * (1 + 1e-6)
    if norm <= clip:
        assert all(torch.equal(clipped[k], tensors[k]) for k in tensors)
    else:
        factor = clipped["w1"].flatten()[0] / tensors["w1"].flatten()[0]
        for name in tensors:  # one factor for every tensor: the contribution is clipped as a whole
            torch.testing.assert_close(clipped[name], tensors[name] * factor, rtol=1e-5, atol=1e-7)


def _adversarial(codec: Codec, seed: int) -> dict[str, torch.Tensor]:
    """A payload with the right layout and extreme values (huge int8 scales, huge floats)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in codec.layout(INPUTS).items():
        if spec.dtype == torch.int8:
            out[name] = torch.full(spec.shape, 127, dtype=torch.int8)
        elif spec.dtype == torch.float16:
            out[name] = torch.full(spec.shape, 60000.0, dtype=torch.float16)
        elif spec.dtype == torch.int32:  # top-k indices: distinct, in range
            numel = INPUTS[name.rsplit(".", 1)[0]].numel
            out[name] = torch.randperm(numel, generator=g)[: spec.shape[0]].sort().values.to(torch.int32)
        else:
            out[name] = 1e6 * torch.randn(spec.shape, generator=g)
    return out


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(sorted(CODECS)), clip=st.floats(0.1, 5.0), cohort=st.integers(1, 8),
       seed=st.integers(0, 1000), adversarial=st.booleans())
def test_one_client_moves_the_aggregate_by_at_most_c_over_cohort(
    kind: str, clip: float, cohort: int, seed: int, adversarial: bool,
) -> None:
    """Add or remove one client (honest or adversarial): ‖Δ aggregate‖ ≤ C / expected cohort, noise aside."""
    codec = codec_for(CODECS[kind])
    client = codec_for(CODECS[kind], ClientPrivacy(clip_norm=clip))
    others = []
    for i in range(3):
        encoded, _ = client.encode(update(seed + i, 5.0), client.init_state(INPUTS), torch.Generator().manual_seed(i))
        others.append(server_contribution(codec, encoded))
    if adversarial:
        target = server_contribution(codec, _adversarial(codec, seed))
    else:
        encoded, _ = client.encode(update(seed + 99, 50.0), client.init_state(INPUTS))
        target = server_contribution(codec, encoded)
    layout = codec.linear_layout(INPUTS)

    def aggregate(contributions: list) -> dict[str, torch.Tensor]:
        return central_aggregate(contributions, clip_norm=clip, noise_multiplier=0.0, expected_cohort=cohort,
                                 layout=layout, generator=torch.Generator())[0]

    with_target, without = aggregate(others + [target]), aggregate(others)
    moved = contribution_norm({k: with_target[k] - without[k] for k in layout})
    assert moved <= clip / cohort * (1 + 1e-5)
    dense_moved = contribution_norm({k: v for k, v in codec.expand(with_target, INPUTS).items()})
    assert math.isfinite(dense_moved)


def test_client_sends_at_most_c_in_the_linear_space() -> None:
    """Honest clients already respect C (up to quantization error) for every codec; EF keeps what was cut."""
    for kind, compression in CODECS.items():
        codec = codec_for(compression, ClientPrivacy(clip_norm=1.0))
        state = codec.init_state(INPUTS)
        raw = update(7, 10.0)
        encoded, new_state = codec.encode(raw, state, torch.Generator().manual_seed(0))
        clip_norm_in = contribution_norm(linear_space(compression, raw))
        clipped = float(clip_norm_in > 1.0)
        assert clipped == 1.0 and clip_norm_in > 1.0
        sent = server_contribution(codec, encoded)
        assert contribution_norm(sent) <= 1.05, kind  # int8 rounding may add a little; the server re-clips
        residual = residual_of(new_state)
        if kind == "dense":  # method none has no error feedback (nothing is lost but the clipping)
            assert not residual
            continue
        decoded = codec.decode(encoded, INPUTS)
        for name in raw:  # error feedback: residual = corrected − decode(what was sent)
            torch.testing.assert_close(residual[name] + decoded[name], raw[name], rtol=1e-4, atol=1e-4)


def test_central_noise_has_the_right_scale_and_lives_in_factor_space() -> None:
    """Zero updates: the aggregate is pure N(0, (σC/K)²) per linear-space coordinate; shared mode has fewer."""
    sigma, clip, cohort = 2.0, 0.5, 4.0
    big = {"w": ArraySpec((400, 250))}
    reduced, _ = central_aggregate([{"w": torch.zeros(400, 250)}] * 3, clip_norm=clip, noise_multiplier=sigma,
                                   expected_cohort=cohort, layout=big, generator=torch.Generator().manual_seed(1))
    assert float(reduced["w"].std()) == pytest.approx(sigma * clip / cohort, rel=0.02)
    assert abs(float(reduced["w"].mean())) < 0.01
    shared = codec_for(SHARED)
    factor_layout = shared.linear_layout(INPUTS)
    assert sum(s.numel for s in factor_layout.values()) < sum(s.numel for s in INPUTS.values())
    reduced, _ = central_aggregate([], clip_norm=clip, noise_multiplier=sigma, expected_cohort=cohort,
                                   layout=factor_layout, generator=torch.Generator().manual_seed(2))
    dense = shared.expand(reduced, INPUTS)  # orthonormal basis: the noise keeps its norm when expanded
    assert contribution_norm(dense) == pytest.approx(contribution_norm(reduced), rel=1e-4)


def test_local_noise_scale_and_residual_without_noise() -> None:
    """Local DP: the message carries N(0, (σC)²); the error-feedback residual holds only the clipping loss."""
    def local(seed: int) -> Codec:  # dense fp32 with error feedback (method "quantize" at 16 bits is not fp32)
        privacy = ClientPrivacy(1.0, noise_std=0.7, noise_generator=torch.Generator().manual_seed(seed))
        return ErrorFeedback(build_codec({"method": "none"}, privacy=privacy))

    zeros = {"w": torch.zeros(300, 300)}
    inputs = layout_of(zeros)
    codec = local(3)
    encoded, state = codec.encode(zeros, codec.init_state(inputs))
    assert float(encoded["w"].std()) == pytest.approx(0.7, rel=0.02)
    assert float(state["residual/w"].abs().max()) == 0.0
    raw = {"w": torch.full((300, 300), 0.1)}  # norm 30 → clipped to 1
    codec = local(4)
    _, state = codec.encode(raw, codec.init_state(inputs))
    torch.testing.assert_close(state["residual/w"], raw["w"] * (1 - 1 / 30), rtol=1e-4, atol=1e-6)


def test_gaussian_noise_is_seeded_and_shaped() -> None:
    """Same generator seed → same noise; std 0 → zeros."""
    tensors = update(1)
    a = gaussian_noise_like(tensors, 1.0, torch.Generator().manual_seed(5))
    b = gaussian_noise_like(tensors, 1.0, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) and a[k].shape == tensors[k].shape for k in tensors)
    assert all(float(v.abs().max()) == 0.0 for v in gaussian_noise_like(tensors, 0.0, torch.Generator()).values())


# -- sampling ------------------------------------------------------------------------------------
def test_poisson_sampling_rate_and_fixed_sampling_unchanged() -> None:
    """Poisson: mean cohort q·N, sometimes empty, reproducible; fixed: the historical formula."""
    poisson = cohort_sampler(3, range(20), 2, "poisson")
    sizes = [len(poisson(r)) for r in range(1, 2001)]
    assert sum(sizes) / len(sizes) == pytest.approx(2.0, rel=0.05) and 0 in sizes
    assert poisson(17) == cohort_sampler(3, list(reversed(range(20))), 2, "poisson")(17)
    fixed = cohort_sampler(3, range(20), 5, "fixed")
    expected = sorted(random.Random(3 * 1_000_003 + 4).sample(list(range(20)), 5))
    assert fixed(4) == expected


# -- config errors through run.py ------------------------------------------------------------------
DP_CONFIG = """\
experiment: dp
data: {dataset: mnist1d, num_clients: 8, partition: {kind: iid}}
model: {name: mlp, options: {hidden: [16]}}
train: {rounds: 2, clients_per_round: 3}
strategies:
  - name: dp
    compression: {method: powersgd, mode: shared, rank: 2, quantize_bits: 8}
    privacy: {mode: central, clip_norm: 1.0, noise_multiplier: 1.0}
"""
BAD_DP = [
    ("negative sigma", "noise_multiplier: 1.0", "noise_multiplier: -0.5", "privacy.noise_multiplier"),
    ("delta >= 1", "noise_multiplier: 1.0}", "noise_multiplier: 1.0, delta: 1.0}", "privacy.delta"),
    ("missing clip norm", "clip_norm: 1.0, ", "", "clip_norm"),
    ("pld with fixed sampling", "noise_multiplier: 1.0}", "noise_multiplier: 1.0, sampling: fixed, accountant: pld}",
     "privacy.accountant"),
    ("budget exceeded with error", "noise_multiplier: 1.0}",
     "noise_multiplier: 0.5, target_epsilon: 1.0, on_budget_exceeded: error}", "privacy.target_epsilon"),
]


@pytest.mark.parametrize("label,old,new,needle", BAD_DP, ids=[b[0] for b in BAD_DP])
def test_bad_privacy_configs_exit_2_naming_the_field(tmp_path: Path, label: str, old: str, new: str,
                                                     needle: str) -> None:
    """A DP mistake: exit 2, the field named, no traceback."""
    path = tmp_path / "dp.yaml"
    path.write_text(DP_CONFIG.replace(old, new))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), str(path), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert needle in output and "Traceback" not in output, output


def test_clip_feedback_off_keeps_only_the_compression_error() -> None:
    """clip_feedback=False: the residual is what compression lost of the *clipped* contribution, so it stays small."""
    for kind, compression in CODECS.items():
        if kind == "dense":
            continue  # no error feedback at all
        raw = update(11, 10.0)  # far above C = 1
        keep_codec = codec_for(compression, ClientPrivacy(clip_norm=1.0))
        kept, keep_state = keep_codec.encode(raw, keep_codec.init_state(INPUTS), torch.Generator().manual_seed(0))
        drop_codec = codec_for(compression, ClientPrivacy(clip_norm=1.0, clip_feedback=False))
        dropped, drop_state = drop_codec.encode(raw, drop_codec.init_state(INPUTS), torch.Generator().manual_seed(0))
        for name in kept:  # the message itself does not change
            torch.testing.assert_close(kept[name], dropped[name])
        residual_kept = {k: v for k, v in keep_state.items() if k.startswith("residual/")}
        residual_dropped = {k: v for k, v in drop_state.items() if k.startswith("residual/")}
        norm_kept = contribution_norm(residual_kept)
        norm_dropped = contribution_norm(residual_dropped)
        assert norm_kept > 5.0, kind  # most of the norm-10 update was cut off and kept
        assert norm_dropped < norm_kept, kind
        # Dense linear space: only the compression error of a norm-C message remains. PowerSGD clips
        # after projecting (both modes), so the projection error of the whole update stays too.
        if kind not in ("shared", "powersgd"):
            assert norm_dropped <= 1.0 + 1e-3, kind
        # kept − dropped residual is exactly the clipping loss, (1 − C/‖linear‖)·linear, in the dense space
        linear = linear_space(compression, raw)
        scale = 1.0 - 1.0 / contribution_norm(linear)
        cut = {k: scale * v for k, v in linear.items()}
        cut_dense = shared_projection().decode(cut, INPUTS) if compression is SHARED else cut
        for name in raw:
            torch.testing.assert_close(residual_kept[f"residual/{name}"] - residual_dropped[f"residual/{name}"],
                                       cut_dense[name], rtol=1e-4, atol=1e-4)


# -- local DP: σ never comes from the (untrusted) server ---------------------------------------------
LOCAL = {"mode": "local", "clip_norm": 1.0, "noise_multiplier": None, "target_epsilon": 8.0, "delta": DELTA}


def test_local_sigma_comes_from_the_client_and_the_server_can_only_raise_it() -> None:
    """A server sending σ = 0 (or nothing) leaves the client's own σ; a larger σ from the server is taken."""
    own = lambda: 1.7  # noqa: E731 - the client's own calibration
    assert client_privacy(LOCAL, calibrated=own, server_sigma=0.0).noise_std == pytest.approx(1.7)
    assert client_privacy(LOCAL, calibrated=own, server_sigma=None).noise_std == pytest.approx(1.7)
    assert client_privacy(LOCAL, calibrated=own, server_sigma=float("nan")).noise_std == pytest.approx(1.7)
    assert client_privacy(LOCAL, calibrated=own, server_sigma=2.5).noise_std == pytest.approx(2.5)
    fixed = {**LOCAL, "noise_multiplier": 0.9, "clip_norm": 2.0}
    assert client_privacy(fixed, calibrated=own, server_sigma=0.0).noise_std == pytest.approx(1.8)

    def broken() -> float:
        raise ImportError("No module named 'dp_accounting'")

    with pytest.raises(RuntimeError, match="cannot calibrate"):  # refuse rather than send unknown noise
        client_privacy(LOCAL, calibrated=broken, server_sigma=5.0)


def test_local_calibration_matches_the_server_plan() -> None:
    """The client calibrates with the server's own accountant call: the same σ, cached per process."""
    from fedpower.config import parse_config
    from fedpower.experiment import planned_noise_multiplier, privacy_plan

    experiment = parse_config({
        "experiment": "local-dp", "data": {"dataset": "digits", "num_clients": 20},
        "model": {"name": "mlp"}, "train": {"rounds": 5, "clients_per_round": 4},
        "strategies": [{"name": "ldp", "privacy": LOCAL}]}).resolve("ldp")
    plan = privacy_plan(experiment)
    assert plan is not None and plan.calibrated
    assert planned_noise_multiplier(experiment) == plan.noise_multiplier > 0
    assert planned_noise_multiplier(experiment) == plan.noise_multiplier  # cached path


def test_hostile_server_sigma_zero_does_not_turn_local_noise_off() -> None:
    """A whole ClientApp round under local DP with σ calibrated to ε, the server sending σ = 0: the reply is noisy."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import clients.app as client_app
    from fedpower.codecs import unpack
    from fedpower.config import load_config
    from fedpower.experiment import privacy_plan

    experiment = load_config(ROOT / "configs/quickstart.yaml", overrides=[
        "data.dataset=synthetic", "data.num_clients=4", "train.clients_per_round=2", "train.local_epochs=1",
        "train.device=cpu", "strategies.fedavg.privacy={mode: local, clip_norm: 1, target_epsilon: 8}"])
    dataset, *_ = client_app.experiment_data(experiment)
    model = client_app.experiment_model(experiment.resolve("fedavg"), dataset)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    hostile = ConfigRecord({"strategy": "fedavg", "server-round": 1, "side": "left", "basis-id": -1,
                            "dp-noise-multiplier": 0.0})
    content = RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in params.items()}), "config": hostile})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a SuperNode sets
    message = Message(content, dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = client_app.handle_train(message, context, experiment)
    assert not reply.has_error(), reply.error
    packed = {k: v.numpy() for k, v in reply.content["payload"].items()}
    sent = unpack(packed, layout_of(params))
    # Clipped to C = 1, the un-noised update would have norm ≤ 1; σ·C noise on ~70k numbers is far larger.
    sigma = privacy_plan(experiment.resolve("fedavg")).noise_multiplier  # what the server plans (and should send)
    numbers = sum(t.numel() for t in sent.values())
    assert sigma > 0.1
    assert contribution_norm(sent) == pytest.approx(sigma * math.sqrt(numbers), rel=0.05)
