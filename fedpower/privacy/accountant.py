"""Privacy accounting with the ``dp-accounting`` package: ε(δ) after each round, budgets, calibration.

One *step* is one release of the mechanism; which event a step is, and which neighbouring relation
the ε refers to, depends on how clients are sampled and who adds the noise:

- ``poisson`` (central DP): each client joins a round independently with probability q; the server
  releases Σ clip(x_i) + N(0, σ²C²). Event ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``,
  neighbouring relation **add-or-remove one client** (L2 sensitivity C). RDP or PLD.
- ``fixed`` (central DP): exactly k of N clients per round, without replacement. dp-accounting
  analyses this only with RDP under **replace-one** (N is public); replacing one client moves the sum
  by up to 2C, so the Gaussian's multiplier relative to that sensitivity is σ/2:
  ``SampledWithoutReplacementDpEvent(N, k, GaussianDpEvent(σ/2))``.
- ``local`` (local DP): each message is clip(x) + N(0, σ²C²), seen by the server, so no amplification
  by sampling; neighbouring = **replace one client's data by any other** (sensitivity 2C):
  ``GaussianDpEvent(σ/2)`` per round the client takes part in.

ε values always come from the accountant; nothing here is a hand-rolled formula.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator, Literal

import dp_accounting
from dp_accounting import pld, rdp

Sampling = Literal["poisson", "fixed", "local"]
Method = Literal["rdp", "pld"]

RELATIONS: dict[str, str] = {
    "poisson": "add-or-remove one client",
    "fixed": "replace one client (N public)",
    "local": "replace one client's data (local randomizer)",
}


#: Calibration never goes below this σ (budgets that would allow less noise are not meaningful).
MIN_CALIBRATED_SIGMA = 0.25


class BudgetExceeded(RuntimeError):
    """Raised when the configured ε budget does not allow (more) training."""


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting's RDP code logs a warning per order it skips; keep those out of the run log.

    absl also calls ``logging.basicConfig()`` when the root logger has no handler, which would send
    every later INFO record to the console: a NullHandler on the root logger meanwhile prevents that.
    """
    logger, root = logging.getLogger("absl"), logging.getLogger()
    level = logger.level
    placeholder = logging.NullHandler()
    logger.setLevel(logging.ERROR)
    root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeHandler(placeholder)
        logger.setLevel(level)


@dataclass
class Accountant:
    """Counts mechanism steps and turns them into ε(δ) with dp-accounting (RDP or PLD)."""

    noise_multiplier: float  # σ: noise std / clip norm C
    sampling: Sampling = "poisson"  # which event one step is (see the module docstring)
    sample_rate: float = 1.0  # poisson: q = expected cohort / population
    population: int = 1  # fixed: N clients
    cohort: int = 1  # fixed: k clients per round
    method: Method = "rdp"  # accountant: rdp | pld
    steps: int = 0  # releases so far
    _cache: dict[tuple[int, float], float] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Reject parameters the accountant cannot analyse."""
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.sampling not in RELATIONS:
            raise ValueError(f"sampling must be one of {', '.join(RELATIONS)}, got {self.sampling!r}")
        if self.method not in ("rdp", "pld"):
            raise ValueError(f"accountant must be 'rdp' or 'pld', got {self.method!r}")
        if self.sampling == "fixed" and self.method != "rdp":
            raise ValueError("fixed-size sampling without replacement is analysed only by the RDP accountant "
                             "(replace-one); use accountant 'rdp' or Poisson sampling")
        if self.sampling == "poisson" and not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.sampling == "fixed" and not 1 <= self.cohort <= self.population:
            raise ValueError(f"cohort must be in [1, population], got {self.cohort} of {self.population}")

    @property
    def neighbouring_relation(self) -> str:
        """Plain-words neighbouring relation the reported ε refers to."""
        return RELATIONS[self.sampling]

    def _relation(self) -> dp_accounting.NeighboringRelation:
        """dp-accounting's relation for this sampling (a plain Gaussian with explicit sensitivity ignores it)."""
        if self.sampling == "fixed":
            return dp_accounting.NeighboringRelation.REPLACE_ONE
        return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

    def step_event(self) -> dp_accounting.DpEvent:
        """The DpEvent of one step."""
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.sample_rate, dp_accounting.GaussianDpEvent(
                self.noise_multiplier))
        half = dp_accounting.GaussianDpEvent(self.noise_multiplier / 2)  # sensitivity 2C (replace-one)
        if self.sampling == "fixed":
            return dp_accounting.SampledWithoutReplacementDpEvent(self.population, self.cohort, half)
        return half

    def event(self, steps: int | None = None) -> dp_accounting.DpEvent:
        """The DpEvent of ``steps`` steps (default: the steps taken so far)."""
        count = self.steps if steps is None else int(steps)
        return dp_accounting.SelfComposedDpEvent(self.step_event(), count)

    def fresh(self) -> dp_accounting.PrivacyAccountant:
        """An empty dp-accounting accountant of the configured kind and relation."""
        if self.method == "pld":
            return pld.PLDAccountant(neighboring_relation=self._relation())
        return rdp.RdpAccountant(neighboring_relation=self._relation())

    def step(self, rounds: int = 1) -> None:
        """Record ``rounds`` more releases."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self.steps += int(rounds)

    def epsilon(self, delta: float, steps: int | None = None) -> float:
        """ε at ``delta`` after ``steps`` steps (default: so far); inf when σ = 0; 0 before any step."""
        count = self.steps if steps is None else int(steps)
        if count <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        key = (count, float(delta))
        if key not in self._cache:
            with _quiet_absl():
                value = float(self.fresh().compose(self.event(count)).get_epsilon(delta))
            self._cache[key] = value if math.isfinite(value) else math.inf
        return self._cache[key]

    def steps_within(self, target_epsilon: float, delta: float, max_steps: int) -> int:
        """The most steps (≤ ``max_steps``) whose ε stays within ``target_epsilon`` (bisection on steps)."""
        low, high = 0, int(max_steps)
        if self.epsilon(delta, high) <= target_epsilon:
            return high
        while high - low > 1:
            middle = (low + high) // 2
            if self.epsilon(delta, middle) <= target_epsilon:
                low = middle
            else:
                high = middle
        return low

    @property
    def state(self) -> dict[str, Any]:
        """Everything needed to resume accounting (JSON-serializable)."""
        return {"noise_multiplier": self.noise_multiplier, "sampling": self.sampling, "sample_rate": self.sample_rate,
                "population": self.population, "cohort": self.cohort, "method": self.method, "steps": self.steps}

    @classmethod
    def restore(cls, state: dict[str, Any]) -> "Accountant":
        """An accountant continuing from ``state``."""
        return cls(**state)

    @classmethod
    def calibrate(cls, target_epsilon: float, delta: float, steps: int, **settings: Any) -> float:
        """Smallest σ (within 1e-4) whose ε after ``steps`` steps is at most ``target_epsilon``."""
        return calibrate_noise(target_epsilon, delta, steps, **settings)


@lru_cache(maxsize=64)
def calibrate_noise(
    target_epsilon: float, delta: float, steps: int, *, sampling: Sampling = "poisson", sample_rate: float = 1.0,
    population: int = 1, cohort: int = 1, method: Method = "rdp", tol: float = 1e-4,
) -> float:
    """σ for ``target_epsilon`` at ``delta`` after ``steps`` steps, via ``dp_accounting.calibrate_dp_mechanism``."""
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")

    def make(sigma: float) -> Accountant:
        return Accountant(max(sigma, 0.0), sampling, sample_rate, population, cohort, method)

    def epsilon_of(sigma: float) -> float:
        return make(sigma).epsilon(delta, steps)

    # Bracket [lower, upper] with ε(lower) > target ≥ ε(upper), from σ = 1 outwards; σ below
    # MIN_CALIBRATED_SIGMA is never returned (PLD's cost explodes there and such budgets are meaningless).
    upper = 1.0
    while epsilon_of(upper) > target_epsilon:
        upper *= 2
        if upper > 2.0**30:
            raise ValueError(f"no noise level reaches ε={target_epsilon} at δ={delta} after {steps} steps")
    lower = upper / 2
    while epsilon_of(lower) <= target_epsilon:
        if lower <= MIN_CALIBRATED_SIGMA:
            return MIN_CALIBRATED_SIGMA
        upper, lower = lower, max(lower / 2, MIN_CALIBRATED_SIGMA)
    template = make(1.0)
    with _quiet_absl():
        sigma = dp_accounting.calibrate_dp_mechanism(
            template.fresh, lambda sigma: make(sigma).event(steps), target_epsilon, delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lower, upper), tol=tol)
    # calibrate_dp_mechanism guarantees ε(σ) ≤ target; check once more with our own code path.
    while make(sigma).epsilon(delta, steps) > target_epsilon:
        sigma += tol
    return float(sigma)
