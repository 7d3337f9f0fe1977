"""The tuned privacy/utility driver's own logic: grid expansion, the choice rule, the final expansion, targets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import privacy_tuning as tuning  # noqa: E402

from fedpower.config import ConfigError, load_config  # noqa: E402

RAW = yaml.safe_load((ROOT / "configs" / "dp_compare.yaml").read_text())


def _valid(expanded: dict, tmp_path: Path) -> int:
    """How many strategies the expanded experiment has, after the config loader accepted it."""
    path = tmp_path / "expanded.yaml"
    path.write_text(yaml.safe_dump(expanded, sort_keys=False))
    try:
        return len(load_config(path).strategies)
    except ConfigError as err:  # pragma: no cover - the failure message is the point
        pytest.fail(str(err))


def test_grid_has_one_strategy_per_method_epsilon_clip_and_server_lr(tmp_path: Path) -> None:
    methods = ["dp-fedavg", "dp-powersgd-r4-int8"]
    expanded, index = tuning.expand_grid(RAW, methods, [2.0, 8.0], [0.25, 1.0], [1.0, 2.0])
    assert len(expanded["strategies"]) == 2 * 2 * 2 * 2 == len(index)
    assert _valid(expanded, tmp_path) == 16
    entry = next(s for s in expanded["strategies"] if s["name"] == "dp-powersgd-r4-int8-eps2-c0p25-lr2")
    assert entry["privacy"]["clip_norm"] == 0.25 and entry["privacy"]["target_epsilon"] == 2.0
    assert entry["privacy"]["noise_multiplier"] is None
    assert entry["train"]["server_optimizer"]["name"] == "sgd" and entry["train"]["server_optimizer"]["lr"] == 2.0
    assert entry["compression"]["mode"] == "independent"
    # The config itself (YAML anchors share one privacy dict) is untouched.
    assert all(s.get("privacy", {}).get("clip_norm", 0.5) == 0.5 for s in RAW["strategies"])
    with pytest.raises(SystemExit):
        tuning.expand_grid(RAW, ["fedavg"], [8.0], [0.5], [1.0])  # a non-DP reference cannot be tuned


def _score(method: str, eps: float, clip: float, lr: float, score: float) -> dict:
    return {"method": method, "epsilon": eps, "clip_norm": clip, "server_lr": lr, "score": score}


def test_choose_keeps_one_setting_when_it_wins_everywhere_else_one_per_epsilon() -> None:
    scores = [_score("a", 2.0, 0.5, 1.0, 30.0), _score("a", 2.0, 1.0, 2.0, 29.0),
              _score("a", 8.0, 0.5, 1.0, 40.0), _score("a", 8.0, 1.0, 2.0, 39.0),
              _score("b", 2.0, 0.5, 1.0, 30.0), _score("b", 2.0, 1.0, 2.0, 29.0),
              _score("b", 8.0, 0.5, 1.0, 38.0), _score("b", 8.0, 1.0, 2.0, 41.0)]
    chosen = tuning.choose(scores)
    assert chosen["a"]["rule"].startswith("one setting")
    assert {tuple(p.values()) for p in chosen["a"]["per_epsilon"].values()} == {(0.5, 1.0)}
    assert chosen["b"]["rule"].startswith("per ε")
    assert tuning.choose_for(chosen["b"], 1.0) == {"clip_norm": 0.5, "server_lr": 1.0, "tuned_at": 2.0}
    assert tuning.choose_for(chosen["b"], 4.0)["tuned_at"] == 2.0  # as near to 2 as to 8 (log scale): the smaller
    assert tuning.choose_for(chosen["b"], 8.0) == {"clip_norm": 1.0, "server_lr": 2.0, "tuned_at": 8.0}
    # Tuned at one ε only: that ε's best everywhere; incomplete grids (pruned points) are fine.
    single = tuning.choose([_score("c", 2.0, 0.25, 1.0, 20.0), _score("c", 2.0, 0.5, 2.0, 21.0)])
    assert single["c"]["rule"].startswith("tuned at ε = 2 only")
    assert tuning.choose_for(single["c"], 8.0) == {"clip_norm": 0.5, "server_lr": 2.0, "tuned_at": 2.0}


def test_final_expansion_uses_the_chosen_setting_per_epsilon_and_adds_references(tmp_path: Path) -> None:
    chosen = tuning.choose([_score("dp-fedavg", 2.0, 0.25, 2.0, 30.0), _score("dp-fedavg", 8.0, 1.0, 1.0, 40.0),
                            _score("dp-powersgd-shared-r4", 2.0, 0.5, 1.0, 30.0),
                            _score("dp-powersgd-shared-r4", 8.0, 0.5, 1.0, 30.0)])
    expanded, index = tuning.expand_final(RAW, chosen, [1.0, 2.0, 4.0, 8.0], ["fedavg"])
    assert _valid(expanded, tmp_path) == 2 * 4 + 1
    by = {s["name"]: s for s in expanded["strategies"]}
    assert by["dp-fedavg-eps1"]["privacy"]["clip_norm"] == 0.25
    assert by["dp-fedavg-eps8"]["privacy"]["clip_norm"] == 1.0
    assert by["dp-fedavg-eps8"]["train"]["server_optimizer"]["lr"] == 1.0
    assert index["fedavg"] == {"method": "fedavg", "epsilon": None}
    assert by["fedavg"]["train"] == {"sampling": "poisson"}
    # A method can be limited to some ε values (compute budget).
    limited, _ = tuning.expand_final(RAW, chosen, [1.0, 2.0, 4.0, 8.0], [], {"dp-powersgd-shared-r4": [1.0, 2.0]})
    names = [s["name"] for s in limited["strategies"]]
    assert "dp-powersgd-shared-r4-eps2" in names and "dp-powersgd-shared-r4-eps8" not in names
    assert "dp-fedavg-eps8" in names


def test_targets_read_the_seed_means() -> None:
    def row(method: str, eps: float, acc: float, reduction: float) -> dict:
        return {"method": method, "epsilon": eps, "accuracy": {"mean": acc, "std": 0.5},
                "uplink_reduction_vs_dp_fedavg": reduction}

    rows = [row("dp-fedavg", 1.0, 25.0, 1.0), row("c", 1.0, 28.5, 60.0),
            row("dp-fedavg", 2.0, 30.0, 1.0), row("c", 2.0, 32.0, 60.0),
            row("dp-fedavg", 8.0, 40.0, 1.0), row("c", 8.0, 39.5, 49.0), row("d", 8.0, 38.0, 80.0)]
    verdict = tuning.targets(rows)
    assert [x["met"] for x in verdict["low"]["per_epsilon"]] == [True, False]
    assert verdict["low"]["met"] is False
    assert verdict["high"]["met"] is False  # c is close enough but under 50×; d is 50× but 2 pp below
    rows[5]["uplink_reduction_vs_dp_fedavg"] = 50.0
    assert tuning.targets(rows)["high"]["met"] is True
