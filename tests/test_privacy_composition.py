"""Run-level ε: composing the DP strategies of one run (fedpower.privacy.composition)."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import rdp

from fedpower.privacy import Accountant, strategy_noise_seed
from fedpower.privacy.composition import StrategyReleases, run_epsilon

DELTA = 1e-5


def _releases(name: str, **kwargs: object) -> StrategyReleases:
    """A strategy's releases with test defaults (central, Poisson q = 0.1 of 100, σ = 1, 10 rounds)."""
    settings: dict = {"mode": "central", "sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.1,
                      "cohort": 10, "population": 100, "rounds": 10, "delta": DELTA}
    settings.update(kwargs)
    return StrategyReleases(name=name, **settings)


@pytest.mark.parametrize("release,accountant", [
    (_releases("p"), Accountant(1.0, "poisson", sample_rate=0.1)),
    (_releases("f", sampling="fixed"), Accountant(1.0, "fixed", population=100, cohort=10)),
    (_releases("l", mode="local", participations={0: 3, 1: 5, 2: 1}), Accountant(1.0, "local")),
])
def test_one_strategy_composes_to_its_own_epsilon(release: StrategyReleases, accountant: Accountant) -> None:
    """A run with one DP strategy: the run's ε is that strategy's (same event, same accountant)."""
    steps = max(release.participations.values()) if release.mode == "local" else release.rounds
    epsilon, _, _ = run_epsilon([release], DELTA)
    assert epsilon == pytest.approx(accountant.epsilon(DELTA, steps), rel=1e-9)


def test_strategies_that_stop_early_leave_later_rounds_to_the_others() -> None:
    """Rounds 1–4 hold both Gaussians, rounds 5–10 only the one still running."""
    epsilon, _, _ = run_epsilon([_releases("a"), _releases("b", noise_multiplier=2.0, rounds=4)], DELTA)
    both = (1.0 ** -2 + 2.0 ** -2) ** -0.5
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(both)), 4),
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 6)])
    assert epsilon == pytest.approx(rdp.RdpAccountant().compose(event).get_epsilon(DELTA), rel=1e-6)


def test_mixed_modes_compose_without_amplification() -> None:
    """Central + local: no sampling amplification; the most exposed client's Gaussians under replace-one."""
    central, local = _releases("c", rounds=3), _releases("l", mode="local", rounds=3, participations={0: 1, 4: 2})
    epsilon, relation, _ = run_epsilon([central, local], DELTA)
    # Client 4: 3 central rounds + 2 local participations, each a Gaussian of multiplier σ/2 (sensitivity 2C).
    expected = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE).compose(
        dp_accounting.GaussianDpEvent(0.5 / 5 ** 0.5)).get_epsilon(DELTA)
    assert epsilon == pytest.approx(expected, rel=1e-6) and relation == "replace one client"
    assert run_epsilon([_releases("z", noise_multiplier=0.0)], DELTA)[0] == float("inf")


def test_noise_seed_is_per_strategy_and_stable() -> None:
    """Different names → different seeds; the same name → the same seed in every process; None stays None."""
    assert strategy_noise_seed(0, "a") != strategy_noise_seed(0, "b")
    assert strategy_noise_seed(0, "a") == strategy_noise_seed(0, "a") != strategy_noise_seed(1, "a")
    assert strategy_noise_seed(None, "a") is None
