"""The ``final`` block of results.json: summaries over rounds that were not all evaluated."""

from __future__ import annotations

import math

from fedpower.results import StrategyResult


def _row(server_round: int, accuracy: float | None) -> dict:
    """A minimal results.json round entry."""
    return {"round": server_round, "accuracy": accuracy, "loss": 0.0, "uplink_bytes": 0, "downlink_bytes": 0,
            "epsilon": None, "seconds": 0.0}


def test_best_accuracy_skips_rounds_without_evaluation() -> None:
    """evaluate_every > 1 leaves NaN rows (None after a checkpoint round trip); best is over the evaluated ones."""
    result = StrategyResult("s", rounds=[_row(1, math.nan), _row(2, 0.41), _row(3, None), _row(4, 0.37),
                                         _row(5, math.nan), _row(6, 0.39)])
    final = result.final()
    assert final["best_accuracy"] == 0.41
    assert final["accuracy"] == 0.39


def test_best_accuracy_is_nan_when_nothing_was_evaluated() -> None:
    """No evaluated round: no best accuracy (NaN, written as null), never a made-up number."""
    assert math.isnan(StrategyResult("s", rounds=[_row(1, math.nan)]).final()["best_accuracy"])
    assert math.isnan(StrategyResult("s").final()["best_accuracy"])
