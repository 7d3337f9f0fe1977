"""Issue #17's mechanisms end to end: PowerSGD's defaults, budget_reduction, nearest rounding, and
fine-tuning from weights that benchmarks/pretrain.py wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, strategies: list[dict], model: dict | None = None, rounds: int = 3) -> Path:
    """A small mnist1d experiment file (10 clients, 5 per round)."""
    document = {"experiment": "defaults", "seed": 0,
                "data": {"dataset": "mnist1d", "num_clients": 10, "partition": {"kind": "iid"}},
                "model": model or {"name": "mlp", "options": {"hidden": [256, 256]}},
                "train": {"rounds": rounds, "clients_per_round": 5, "local_epochs": 1, "lr": 0.1, "device": "cpu",
                          "server_optimizer": {"name": "momentum", "momentum": 0.9}},
                "strategies": strategies}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_powersgd_defaults_budget_reduction_and_nearest_run_end_to_end(tmp_path: Path) -> None:
    """int4 + zlib by default, a budget from the model's size, and nearest rounding, through the engine."""
    from fedpower.config import load_config
    from strategies.simulation import simulate

    path = _write(tmp_path, [{"name": "fedavg"},
                             {"name": "budget", "compression": {"method": "powersgd", "budget_reduction": 40}},
                             {"name": "nearest", "compression": {"method": "powersgd", "rank": 4,
                                                                 "quantize_scheme": "nearest"}}])
    experiment = load_config(path)
    budget = experiment.resolve("budget").compression
    assert (budget.quantize_bits, budget.entropy_coding, budget.power_iterations) == (4, "zlib", 4)
    results = simulate(experiment)
    dense = results.strategies["fedavg"]
    per_reply_dense = dense.ledger.total("up") / (3 * 5)
    for name in ("budget", "nearest"):
        strategy = results.strategies[name]
        assert strategy.completed and strategy.final()["accuracy"] > 0.15, name  # chance: 0.10
        assert all(row["rejected"] == 0 and row["accepted"] == 5 for row in strategy.rounds), name
    # The budget is 1/40 of the dense payload before zlib; headers and Flower's framing come on top.
    per_reply = results.strategies["budget"].ledger.total("up") / (3 * 5)
    assert per_reply <= per_reply_dense / 40 + 2_000
    assert per_reply >= 0.6 * per_reply_dense / 40  # the budget is spent (rank 4 everywhere would be ≈ 1/3 of it)
    assert per_reply_dense / per_reply > 25


def test_pretrain_writes_the_weights_a_fine_tuning_run_starts_from(tmp_path: Path) -> None:
    """pretrain.py saves a state dict the config's model.weights loads, with the accuracy it reports."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.pretrain import main
    from fedpower.config import load_config
    from fedpower.experiment import experiment_data, experiment_model
    from fedpower.training import evaluate

    model = {"name": "mlp", "options": {"hidden": [32, 32]}, "weights": "start.pt"}
    path = _write(tmp_path, [{"name": "fedavg"}, {"name": "powersgd", "compression": {"method": "powersgd",
                                                                                     "rank": 2}}], model)
    assert main([str(path), "--samples", "600", "--epochs", "3", "--lr", "0.1"]) == 0
    report = json.loads((tmp_path / "start.pt.json").read_text())
    experiment = load_config(path)
    dataset, _, _, _, x_test, y_test = experiment_data(experiment)
    loaded = experiment_model(experiment.resolve("powersgd"), dataset)  # the server's starting model
    fresh = experiment_model(experiment.resolve("powersgd"), dataset, pretrained=False)
    assert evaluate(loaded, x_test, y_test)[1] == pytest.approx(report["test_accuracy"])
    assert report["test_accuracy"] > evaluate(fresh, x_test, y_test)[1] + 0.05
    assert report["generator_seed"] != 42 and report["public_examples"] == 600


def test_pretrain_refuses_the_clients_own_data(tmp_path: Path) -> None:
    """The public draw must not be the clients' data: the same generator seed is a usage error."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.pretrain import main

    path = _write(tmp_path, [{"name": "fedavg"}], {"name": "mlp", "weights": "w.pt"})
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--generator-seed", "42"])
    assert exit_info.value.code == 2
