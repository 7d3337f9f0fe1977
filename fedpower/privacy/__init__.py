"""Differential privacy: clipping, Gaussian noise, sampling and accounting (``dp-accounting``); no Flower here.

Clipping, noise and sampling need only torch, so an edge client imports them without the ``[sim]``
extra; the accountant and the run plan (which need ``dp-accounting``) are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from fedpower.privacy.aggregate import central_aggregate, clipped_sum, mean_aggregate
from fedpower.privacy.client import ClientPrivacy, client_privacy, local_noise_multiplier
from fedpower.privacy.mechanism import (
    clip_contribution, contribution_norm, gaussian_noise_like, noise_generator, strategy_noise_seed,
)
from fedpower.privacy.sampling import cohort_sampler, fixed_cohort, participation_counts, poisson_cohort

# The accountant needs dp-accounting; the stages import the codec package (which imports them back).
_LAZY = {"Accountant": "accountant", "BudgetExceeded": "accountant", "calibrate_noise": "accountant",
         "PrivacyPlan": "plan", "make_plan": "plan", "Clip": "stages", "GaussianNoise": "stages",
         "NormBound": "stages"}

__all__ = [
    "Accountant", "BudgetExceeded", "Clip", "ClientPrivacy", "GaussianNoise", "NormBound", "PrivacyPlan",
    "calibrate_noise", "central_aggregate", "client_privacy", "clip_contribution", "clipped_sum", "cohort_sampler",
    "contribution_norm", "fixed_cohort", "gaussian_noise_like", "local_noise_multiplier", "make_plan",
    "mean_aggregate", "noise_generator", "participation_counts", "poisson_cohort", "strategy_noise_seed",
]


def __getattr__(name: str) -> Any:
    """Import the dp-accounting based parts on first use."""
    if name in _LAZY:
        return getattr(import_module(f"fedpower.privacy.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fedpower.privacy' has no attribute {name!r}")
