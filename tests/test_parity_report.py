"""benchmarks/parity.py's summary: final accuracy, gaps and the two bytes-to-target figures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.parity import markdown, summarize  # noqa: E402


def entry(seed: int, accuracies: list[float], uplink: int, method: str) -> dict:
    """One seed's run as collect() returns it: per-round accuracy and uplink bytes."""
    rounds = [{"round": i + 1, "accuracy": a, "uplink_bytes": uplink} for i, a in enumerate(accuracies)]
    total = uplink * len(accuracies)
    return {"seed": seed, "rounds": rounds, "compression": {"method": method}, "server_optimizer": "momentum 0.9",
            "final": {"uplink_bytes_total": total, "uplink_ratio_vs_dense": 1.0 if method == "none" else 100.0}}


def test_bytes_to_best_dense_minus_one_point() -> None:
    """The near target is the best dense final − 1 pp; the ratio compares bytes to reach it."""
    dense = [0.5] * 10 + [0.80] * 10  # final (last 10) 0.80: near target 0.79, reached in round 11
    compressed = [0.5] * 14 + [0.795] * 6  # final 0.6385 ... reaches 0.79 in round 15
    found = {"task": {"fedavgm": [entry(0, dense, 1000, "none")],
                      "powersgd": [entry(0, compressed, 10, "powersgd")]}}
    summary = summarize(found)["task"]
    assert summary["best_dense"] == "fedavgm"
    assert summary["target_near"] == pytest.approx(0.79)
    rows = summary["strategies"]
    assert rows["fedavgm"]["uplink_to_target_near"] == 11 * 1000
    assert rows["powersgd"]["uplink_to_target_near"] == 15 * 10
    assert rows["powersgd"]["bytes_to_target_near_ratio"] == pytest.approx(11000 / 150)
    assert rows["powersgd"]["reduction"] == pytest.approx(100.0)
    assert "73×" in markdown(summarize(found))


def test_a_seed_that_never_reaches_the_target_leaves_it_unreached() -> None:
    """Bytes-to-target needs every seed to reach it; otherwise it is reported as not reached."""
    dense = [0.80] * 12
    found = {"task": {"fedavgm": [entry(0, dense, 1000, "none")],
                      "powersgd": [entry(0, [0.80] * 12, 10, "powersgd"), entry(1, [0.5] * 12, 10, "powersgd")]}}
    row = summarize(found)["task"]["strategies"]["powersgd"]
    assert row["uplink_to_target_near"] is None and row["reached_near"] == "1/2"
    assert row["bytes_to_target_near_ratio"] is None


def test_run_copies_keep_yaml_relative_paths_working(tmp_path: Path) -> None:
    """A config copied into a run folder still points at the files its own folder's paths meant."""
    from benchmarks.parity import _absolute_paths

    document = {"data": {"dataset": "npz", "path": "data/x.npz"}, "model": {"name": "mlp", "weights": "/abs/w.pt"},
                "client_state": {"dir": None}}
    out = _absolute_paths(document, tmp_path / "configs")
    assert out["data"]["path"] == str((tmp_path / "configs" / "data" / "x.npz").resolve())
    assert out["model"]["weights"] == "/abs/w.pt" and out["client_state"]["dir"] is None
    assert document["data"]["path"] == "data/x.npz"  # the caller's document is not changed
