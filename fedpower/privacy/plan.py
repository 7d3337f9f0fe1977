"""A strategy's privacy settings resolved for one run: σ (given or calibrated), accountant, budget.

Built from the strategy's ``privacy`` block (see ``fedpower.config.PrivacyConfig``) by
:func:`make_plan`, on the server and in the CLI's pre-flight check alike.

Budget rules: with ``target_epsilon`` and no ``noise_multiplier``, σ is calibrated so that the
planned rounds end within the target. With both, the target is a budget: ``on_budget_exceeded:
error`` refuses to start a run whose planned rounds would exceed it; ``stop`` trains until the next
round would exceed it, then stops. An empty Poisson cohort still releases pure noise and counts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from fedpower.privacy.accountant import Accountant, BudgetExceeded, calibrate_noise
from fedpower.privacy.sampling import participation_counts

if TYPE_CHECKING:
    from fedpower.config import PrivacyConfig

log = logging.getLogger("fedpower.strategy")


@dataclass
class PrivacyPlan:
    """Everything the server needs to run and account one DP strategy."""

    mode: str  # central | local
    clip_norm: float  # C
    noise_multiplier: float  # σ (noise std = σ·C on the sum, or on each local message)
    delta: float  # δ of the reported ε
    sampling: str  # poisson | fixed (how cohorts are drawn)
    expected_cohort: float  # fixed aggregation weight 1 / this (central DP)
    population: int  # N clients
    accountant: Accountant
    rounds: int  # planned rounds
    planned_steps: int = 0  # accountant steps the planned rounds take (local DP: most participations)
    target_epsilon: float | None = None  # budget (None: none)
    on_budget_exceeded: str = "stop"  # stop | error
    calibrated: bool = False  # σ came from target_epsilon
    noise_seed: int | None = None  # reproducible noise (experiments only); None: OS entropy
    participations: dict[int, int] = field(default_factory=dict)  # local DP: rounds per partition so far

    @property
    def epsilon(self) -> float:
        """ε(δ) of what has been released so far."""
        return self.accountant.epsilon(self.delta)

    @property
    def planned_epsilon(self) -> float:
        """ε(δ) once all planned rounds have run."""
        return self.accountant.epsilon(self.delta, self.planned_steps)

    def planned_summary(self) -> str:
        """The plan plus the ε the planned rounds reach (and where a budget would stop them)."""
        planned = self.planned_epsilon
        line = f"{self.describe()}; ε after {self.rounds} rounds: {_fmt(planned)}"
        if self.target_epsilon is not None and not self.calibrated and planned > self.target_epsilon:
            fits = self.accountant.steps_within(self.target_epsilon, self.delta, self.planned_steps)
            unit = "participation(s) per client" if self.mode == "local" else "round(s)"
            line += f" > budget, which allows {fits} {unit}: training stops there"
        return line

    def steps_after(self, cohort: Sequence[int]) -> int:
        """Accountant steps once a round with this cohort has run."""
        if self.mode == "local":
            return max([self.participations.get(p, 0) + 1 for p in cohort] + [self.accountant.steps])
        return self.accountant.steps + 1

    def epsilon_after(self, cohort: Sequence[int]) -> float:
        """ε(δ) if a round with this cohort ran next."""
        return self.accountant.epsilon(self.delta, self.steps_after(cohort))

    def would_exceed(self, cohort: Sequence[int]) -> bool:
        """Whether running this round would take ε past the budget."""
        return self.target_epsilon is not None and self.epsilon_after(cohort) > self.target_epsilon

    def record(self, cohort: Sequence[int]) -> None:
        """Account for a round that ran (released an aggregate) with this cohort."""
        steps = self.steps_after(cohort)
        for p in cohort:
            self.participations[p] = self.participations.get(p, 0) + 1
        self.accountant.step(steps - self.accountant.steps)

    def describe(self) -> str:
        """One line for logs and the console."""
        sigma = f"σ={self.noise_multiplier:.4g}" + (
            f" (calibrated for ε={self.target_epsilon:g})" if self.calibrated else "")
        budget = "" if self.target_epsilon is None or self.calibrated else (
            f", budget ε={self.target_epsilon:g} ({self.on_budget_exceeded} when exceeded)")
        sampling = (f"Poisson q={self.expected_cohort / self.population:.4g}" if self.sampling == "poisson"
                    else f"fixed {int(self.expected_cohort)} of {self.population} per round")
        return (f"{self.mode} DP, clip C={self.clip_norm:g}, {sigma}, {sampling}, δ={self.delta:g}, "
                f"{self.accountant.method.upper()} accountant, neighbouring: {self.accountant.neighbouring_relation}"
                f"{budget}")

    def state(self) -> dict[str, Any]:
        """Resumable state: the accountant's plus the participation counts."""
        return {"accountant": self.accountant.state, "participations": dict(self.participations)}

    def refuse(self, cohort: Sequence[int], server_round: int, strategy: str) -> str | None:
        """Why round ``server_round`` must not run (it would take ε past the budget), or None when it may.

        Raises BudgetExceeded instead under ``on_budget_exceeded: error``.
        """
        if not self.would_exceed(cohort):
            return None
        message = (f"strategy {strategy}: round {server_round} would take ε from {self.epsilon:.4g} to "
                   f"{self.epsilon_after(cohort):.4g} > target_epsilon {self.target_epsilon:g} (δ={self.delta:g})")
        if self.on_budget_exceeded == "error":
            raise BudgetExceeded(message)
        log.warning("%s; stopping after round %d", message, server_round - 1)
        return f"privacy budget: stopped before round {server_round} (ε={self.epsilon:.4g})"

    def checkpoint(self) -> dict[str, Any]:
        """JSON-able state for a resumed run: accountant, σ and participation counts."""
        return {"accountant": self.accountant.state, "noise_multiplier": self.noise_multiplier,
                "participations": {str(p): n for p, n in self.participations.items()}}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Continue from :meth:`checkpoint` output."""
        self.accountant = Accountant.restore(dict(saved["accountant"]))
        self.noise_multiplier = float(saved["noise_multiplier"])
        self.participations = {int(p): int(n) for p, n in saved["participations"].items()}


def make_plan(
    privacy: "PrivacyConfig | Mapping[str, Any]", *, num_clients: int, cohort_size: int, rounds: int,
    cohorts: Callable[[int], Sequence[int]] | None = None,
) -> PrivacyPlan:
    """Resolve a ``privacy`` block for a run; calibrates σ when only ``target_epsilon`` is given.

    ``cohorts`` (round → partitions) lets local DP account the most-sampled client exactly; without it
    every round is assumed to include every client. Raises BudgetExceeded for ``on_budget_exceeded:
    error`` when the planned rounds would exceed the budget, ValueError on settings it cannot analyse.
    """
    from fedpower.config import PrivacyConfig, as_section

    privacy = as_section(PrivacyConfig, privacy)
    mode, sampling, method, delta = privacy.mode, privacy.sampling, privacy.accountant, privacy.delta
    target = privacy.target_epsilon
    settings: dict[str, Any] = {"method": method}
    if mode == "local":
        settings["sampling"] = "local"
        planned = [cohorts(r) for r in range(1, rounds + 1)] if cohorts is not None else [range(num_clients)] * rounds
        planned_steps = max(participation_counts(planned).values(), default=0)
    elif sampling == "poisson":
        settings.update(sampling="poisson", sample_rate=min(1.0, cohort_size / num_clients))
        planned_steps = rounds
    else:
        settings.update(sampling="fixed", population=num_clients, cohort=cohort_size)
        planned_steps = rounds
    sigma = privacy.noise_multiplier
    calibrated = sigma is None
    if calibrated:
        if target is None:
            raise ValueError("privacy needs noise_multiplier or target_epsilon")
        sigma = calibrate_noise(target, delta, max(1, planned_steps), **settings)
    accountant = Accountant(float(sigma), **settings)
    plan = PrivacyPlan(mode=mode, clip_norm=privacy.clip_norm, noise_multiplier=float(sigma), delta=delta,
                       sampling=sampling, expected_cohort=float(cohort_size), population=num_clients,
                       accountant=accountant, rounds=rounds,
                       target_epsilon=target, on_budget_exceeded=privacy.on_budget_exceeded,
                       calibrated=calibrated, noise_seed=privacy.noise_seed, planned_steps=planned_steps)
    if target is not None and not calibrated and plan.on_budget_exceeded == "error":
        planned_epsilon = accountant.epsilon(delta, planned_steps)
        if planned_epsilon > target:
            fits = accountant.steps_within(target, delta, planned_steps)
            unit = "participation(s) per client" if mode == "local" else "round(s)"
            raise BudgetExceeded(
                f"privacy budget exceeded: {rounds} rounds reach ε={_fmt(planned_epsilon)} at δ={delta:g}, over "
                f"target_epsilon={target:g} (the budget allows {fits} {unit}); lower train.rounds, raise "
                "noise_multiplier or target_epsilon, or set on_budget_exceeded: stop")
    return plan


def _fmt(value: float) -> str:
    """ε for messages (∞ for unbounded)."""
    return "∞" if math.isinf(value) else f"{value:.3g}"
