"""Client sampling that matches the accounting, seeded per round so every strategy sees the same cohorts.

``fixed``: exactly k of the N partitions, uniformly without replacement. ``poisson``: every
partition joins independently with probability q = k / N (the cohort size varies, and may be 0).
Cohorts are keyed on partition ids (node ids are random per run) and derived from the experiment
seed: comparisons are reproducible, but whoever knows the seed knows the cohorts — amplification by
sampling assumes they are secret (see docs/privacy.md).
"""

from __future__ import annotations

import random
from typing import Callable, Iterable, Literal, Sequence

Sampling = Literal["fixed", "poisson"]


def _rng(seed: int, server_round: int) -> random.Random:
    """The round's sampling RNG (the same formula the fixed sampler always used)."""
    return random.Random(seed * 1_000_003 + server_round)


def fixed_cohort(seed: int, server_round: int, partitions: Sequence[int], size: int) -> list[int]:
    """``size`` partitions without replacement, sorted."""
    ordered = sorted(partitions)
    return sorted(_rng(seed, server_round).sample(ordered, min(size, len(ordered))))


def poisson_cohort(seed: int, server_round: int, partitions: Sequence[int], rate: float) -> list[int]:
    """Each partition independently with probability ``rate``, sorted."""
    if not 0 <= rate <= 1:
        raise ValueError(f"sampling rate must be in [0, 1], got {rate}")
    rng = _rng(seed, server_round)
    return [p for p in sorted(partitions) if rng.random() < rate]


def cohort_sampler(seed: int, partitions: Sequence[int], size: int,
                   sampling: Sampling = "fixed") -> Callable[[int], list[int]]:
    """Round → sorted partition ids, fixed-size or Poisson with rate size / len(partitions)."""
    ordered = sorted(partitions)
    if sampling == "poisson":
        rate = min(1.0, size / max(1, len(ordered)))
        return lambda server_round: poisson_cohort(seed, server_round, ordered, rate)
    if sampling == "fixed":
        return lambda server_round: fixed_cohort(seed, server_round, ordered, size)
    raise ValueError(f"sampling must be 'fixed' or 'poisson', got {sampling!r}")


def participation_counts(cohorts: Iterable[Sequence[int]]) -> dict[int, int]:
    """How many of the given cohorts each partition belongs to."""
    counts: dict[int, int] = {}
    for cohort in cohorts:
        for partition in cohort:
            counts[partition] = counts.get(partition, 0) + 1
    return counts
