"""ε of a whole run: all DP strategies of one experiment together, composed with ``dp-accounting``.

Each strategy's own ε covers only that strategy's output. The strategies of a run train on the same
clients (the same cohorts, round by round), so whoever sees the results of several DP strategies
learns what all their releases together reveal. This module composes them:

- every DP strategy central with Poisson sampling: round r releases, on one cohort, one Gaussian sum
  per strategy still running: ``PoissonSampledDpEvent(q, ComposedDpEvent([GaussianDpEvent(σ_s), ...]))``
  (add-or-remove one client). Exact when all strategies sample at the same rate (then their cohorts
  are identical); with different rates the cohorts are nested and the largest rate gives an upper bound.
- every DP strategy central with fixed-size sampling of the same k: the same per round with
  ``SampledWithoutReplacementDpEvent(N, k, ...)`` and σ_s / 2 (replace one client).
- anything else (local DP, a mix of modes, samplings or cohort sizes): no amplification by sampling
  (one strategy's messages or cohorts can reveal who took part in another's round). The most exposed
  client's Gaussian releases are composed under replace-one: every round of a central strategy, and
  each round it took part in for a local one. An upper bound.

The composition always uses the RDP accountant (PLD cannot take a Poisson-sampled composition of
Gaussians), at the smallest δ of the strategies. Non-DP strategies of the run train on the same
clients and carry no guarantee: nothing here covers their results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import dp_accounting
from dp_accounting import rdp

from fedpower.privacy.accountant import _quiet_absl

if TYPE_CHECKING:
    from fedpower.config import ExperimentConfig


@dataclass(frozen=True)
class StrategyReleases:
    """What one DP strategy released in a run: its mechanism and how many rounds (or participations)."""

    name: str
    mode: str  # central | local
    sampling: str  # poisson | fixed
    noise_multiplier: float  # σ
    sample_rate: float  # expected cohort / population
    cohort: int  # clients per round (expected, under Poisson)
    population: int  # N clients
    rounds: int  # rounds that released an aggregate
    delta: float  # δ of the strategy's own ε
    participations: Mapping[int, int] = field(default_factory=dict)  # local DP: partition → rounds it took part in


def composed_event(releases: Sequence[StrategyReleases]) -> tuple[dp_accounting.DpEvent, str, str]:
    """(the run's DpEvent, dp-accounting neighbouring relation name, how it was composed in words)."""
    central = all(r.mode == "central" for r in releases)
    if central and all(r.sampling == "poisson" for r in releases):
        per_round = [(max(r.sample_rate for r in active), tuple(r.noise_multiplier for r in active))
                     for active in _active_by_round(releases)]
        events = [dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            rate, dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(s) for s in sigmas])), len(list(rounds)))
            for (rate, sigmas), rounds in groupby(per_round)]
        rates = {r.sample_rate for r in releases}
        how = ("one Poisson-sampled round per round index, holding every strategy's Gaussian release on the same "
               "cohort" + ("" if len(rates) == 1 else " (largest sampling rate: an upper bound)"))
        return dp_accounting.ComposedDpEvent(events), "ADD_OR_REMOVE_ONE", how
    if central and all(r.sampling == "fixed" for r in releases) and len({(r.cohort, r.population)
                                                                         for r in releases}) == 1:
        population, cohort = releases[0].population, releases[0].cohort
        per_round = [tuple(r.noise_multiplier / 2 for r in active) for active in _active_by_round(releases)]
        events = [dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
            population, cohort, dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(s) for s in sigmas])),
            len(list(rounds))) for sigmas, rounds in groupby(per_round)]
        how = "one round per round index sampling the same fixed-size cohort for every strategy"
        return dp_accounting.ComposedDpEvent(events), "REPLACE_ONE", how
    exposure = _most_exposed(releases)
    events = [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(r.noise_multiplier / 2), count)
              for r, count in zip(releases, exposure) if count > 0]
    how = ("no amplification by sampling (mixed modes, samplings or cohort sizes); every Gaussian release that "
           "the most exposed client took part in")
    return dp_accounting.ComposedDpEvent(events), "REPLACE_ONE", how


def _active_by_round(releases: Sequence[StrategyReleases]) -> list[list[StrategyReleases]]:
    """For round 1, 2, … the strategies that released in that round (rounds are aligned across strategies)."""
    last = max((r.rounds for r in releases), default=0)
    return [[r for r in releases if r.rounds >= server_round] for server_round in range(1, last + 1)]


def _most_exposed(releases: Sequence[StrategyReleases]) -> list[int]:
    """Releases per strategy that the most exposed client took part in (central: every round)."""
    partitions = {p for r in releases for p in r.participations} or {0}

    def counts(partition: int) -> list[int]:
        return [r.rounds if r.mode == "central" else int(r.participations.get(partition, 0)) for r in releases]

    def exposure(partition: int) -> float:  # Σ count / (σ/2)²: the client whose composed Gaussian is the strongest
        return sum(c / (r.noise_multiplier / 2) ** 2 for r, c in zip(releases, counts(partition)))

    return counts(max(sorted(partitions), key=exposure))


def run_epsilon(releases: Sequence[StrategyReleases], delta: float) -> tuple[float, str, str]:
    """(ε(δ) of all releases together, neighbouring relation in words, how they were composed)."""
    if any(r.noise_multiplier == 0 and r.rounds > 0 for r in releases):
        return math.inf, "any", "a strategy released without noise"
    event, relation, how = composed_event(releases)
    words = {"ADD_OR_REMOVE_ONE": "add-or-remove one client", "REPLACE_ONE": "replace one client"}[relation]
    accountant = rdp.RdpAccountant(neighboring_relation=getattr(dp_accounting.NeighboringRelation, relation))
    with _quiet_absl():
        epsilon = float(accountant.compose(event).get_epsilon(delta))
    return (epsilon if math.isfinite(epsilon) else math.inf), words, how


def run_privacy(experiment: "ExperimentConfig | Mapping[str, Any]", released: Mapping[str, int],
                epsilons: Mapping[str, float | None]) -> dict[str, Any] | None:
    """The run-level ``privacy`` block of results.json (None when no strategy uses DP).

    ``released``: strategy name → rounds it ran; ``epsilons``: the ε each strategy reported itself.
    """
    from fedpower.experiment import as_experiment, privacy_plan
    from fedpower.privacy.sampling import cohort_sampler, participation_counts

    releases = []
    for settings in as_experiment(experiment).resolved():
        name = settings.name
        plan = privacy_plan(settings)
        if plan is None:
            continue
        rounds = int(released.get(name, 0))
        cohort = settings.clients_per_round
        participations: dict[int, int] = {}
        if plan.mode == "local":  # the server's cohorts, drawn again: who took part how often
            sample = cohort_sampler(settings.seed, range(plan.population), cohort, settings.sampling)
            participations = participation_counts(sample(r) for r in range(1, rounds + 1))
        releases.append(StrategyReleases(
            name=name, mode=plan.mode, sampling=plan.sampling, noise_multiplier=plan.noise_multiplier,
            sample_rate=min(1.0, cohort / plan.population), cohort=cohort, population=plan.population,
            rounds=rounds, delta=plan.delta, participations=participations))
    if not releases:
        return None
    delta = min(r.delta for r in releases)
    epsilon, relation, how = run_epsilon(releases, delta)
    return {
        "epsilon": epsilon, "delta": delta, "accountant": "rdp", "neighbouring_relation": relation,
        "composition": how, "strategies": {r.name: epsilons.get(r.name) for r in releases},
        "note": ("epsilon covers the results of all DP strategies of this run together (they train on the same "
                 "clients); each strategy's own epsilon holds only for that strategy's results alone. Non-DP "
                 "strategies of the run train on the same clients and carry no guarantee."),
    }
