"""The privacy/utility benchmark's own logic: config expansion per ε and the noised-space sizes it reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import privacy_utility as bench  # noqa: E402

from fedpower.config import ConfigError, load_config  # noqa: E402


def test_eps_tag_is_a_valid_strategy_name_suffix() -> None:
    assert bench.eps_tag(8.0) == "eps8"
    assert bench.eps_tag(0.5) == "eps0p5"


def test_expand_config_repeats_dp_strategies_per_epsilon_and_keeps_references_once(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "configs" / "dp_compare.yaml").read_text())
    raw["strategies"].append({"name": "fedavg-no-dp"})
    expanded, index = bench.expand_config(raw, [2.0, 8.0])
    names = [s["name"] for s in expanded["strategies"]]
    dp_methods = [s["name"] for s in raw["strategies"] if s.get("privacy")]
    references = [s["name"] for s in raw["strategies"] if not s.get("privacy")]
    assert "fedavg-no-dp" in references and len(dp_methods) >= 3
    assert len(names) == 2 * len(dp_methods) + len(references)
    assert index["fedavg-no-dp"] == {"method": "fedavg-no-dp", "epsilon": None}
    for s in expanded["strategies"]:
        if s.get("privacy"):
            assert s["privacy"]["target_epsilon"] == index[s["name"]]["epsilon"]
            assert s["privacy"]["noise_multiplier"] is None
    # The original is untouched (YAML anchors share one dict between strategies).
    assert all(s.get("privacy", {}).get("target_epsilon", 8.0) == 8.0 for s in raw["strategies"])
    # What the benchmark writes is a valid experiment.
    path = tmp_path / "expanded.yaml"
    path.write_text(yaml.safe_dump(expanded, sort_keys=False))
    try:
        config = load_config(path)
    except ConfigError as err:  # pragma: no cover - the failure message is the point
        pytest.fail(str(err))
    assert len(config.strategies) == len(names)


def test_shared_powersgd_noises_far_fewer_numbers_than_dense() -> None:
    experiment = load_config(ROOT / "configs" / "dp_compare.yaml").to_dict()
    dense = bench.noised_numbers(experiment, "dp-fedavg")
    assert dense == 78858  # every parameter of the MLP 40-256-256-10
    r1 = bench.noised_numbers(experiment, "dp-powersgd-shared-r1")
    r4 = bench.noised_numbers(experiment, "dp-powersgd-shared-r4")
    assert r1 < r4 < dense / 4
