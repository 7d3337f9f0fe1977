"""The power-iteration benchmark's error measurement: it converges to, and never beats, the SVD optimum."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import power_iterations as bench  # noqa: E402

from fedpower.codecs import PowerSGD, layout_of  # noqa: E402


@pytest.mark.parametrize("deflation", [False, True])
def test_error_decreases_to_the_truncated_svd_optimum(deflation: bool) -> None:
    """Rank-4 signal plus noise: k=8 lands within 1 % of Eckart–Young, never below, monotone in k."""
    gen = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(64, 4, generator=gen))
    right, _ = torch.linalg.qr(torch.randn(48, 4, generator=gen))
    signal = left @ torch.diag(torch.tensor([10.0, 8.0, 6.0, 4.0])) @ right.T
    # Noise large enough that one power step from a random start is far from optimal (so convergence is tested).
    update = {"w": signal + 0.1 * torch.randn(64, 48, generator=gen), "b": torch.randn(64, generator=gen)}
    inputs = layout_of(update)
    _, optimum = bench.svd_optimum(update, PowerSGD(rank=4).dims(inputs))
    state = PowerSGD(rank=4).init_state(inputs, seed=1)
    errors = [bench.update_errors(PowerSGD(rank=4, power_iterations=k, deflation=deflation), update, state)[1]
              for k in (1, 2, 4, 8)]
    tolerance = 1e-6 * optimum  # float32 encode vs float64 SVD
    assert errors[0] > 1.5 * optimum
    assert all(later <= earlier + tolerance for earlier, later in zip(errors, errors[1:])), errors
    assert all(error >= optimum - tolerance for error in errors), (errors, optimum)
    assert errors[-1] <= 1.01 * optimum, (errors, optimum)
