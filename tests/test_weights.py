"""Starting from saved weights (``model.weights``): exact loading, clear errors, never unpickling."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from fedpower.config import ConfigError, parse_config
from fedpower.experiment import experiment_data, experiment_model
from fedpower.models import ModelError

BASE = {"experiment": "ft", "seed": 0, "data": {"dataset": "digits", "num_clients": 4, "partition": {"kind": "iid"}},
        "train": {"rounds": 1, "clients_per_round": 2, "device": "cpu"}, "strategies": [{"name": "fedavg"}]}


def _experiment(weights: str | None, hidden: list[int] | None = None, tmp: Path | None = None):
    model = {"name": "mlp", "options": {"hidden": hidden or [16]}}
    if weights is not None:
        model["weights"] = weights
    return parse_config({**BASE, "model": model}, base_dir=tmp)


def _saved(tmp_path: Path, hidden: list[int] | None = None, name: str = "pretrained.pt") -> Path:
    """A state dict of the experiment's model with recognisable values (all parameters + 0.5)."""
    experiment = _experiment(None, hidden)
    model = experiment_model(experiment.resolve("fedavg"), experiment_data(experiment)[0])
    path = tmp_path / name
    torch.save({k: v + 0.5 for k, v in model.state_dict().items()}, path)
    return path


def test_the_server_model_starts_from_the_file_and_clients_do_not_read_it(tmp_path: Path) -> None:
    """pretrained=True loads the file exactly (relative to the YAML folder); pretrained=False keeps the init."""
    path = _saved(tmp_path)
    experiment = _experiment("pretrained.pt", tmp=tmp_path)
    assert experiment.model.weights == str(path.resolve())
    settings, dataset = experiment.resolve("fedavg"), experiment_data(experiment)[0]
    saved = torch.load(path, weights_only=True)
    loaded = experiment_model(settings, dataset).state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    fresh = experiment_model(settings, dataset, pretrained=False).state_dict()
    assert all(torch.equal(fresh[k] + 0.5, saved[k]) for k in saved)


def test_names_and_shapes_that_do_not_fit_are_listed(tmp_path: Path) -> None:
    """A file saved from a wider model: every resized tensor is named with both shapes."""
    path = _saved(tmp_path, hidden=[32])
    experiment = _experiment(str(path))
    with pytest.raises(ModelError, match=r"shapes differ: .*\(32, 64\) in the file, \(16, 64\) in the model"):
        experiment_model(experiment.resolve("fedavg"), experiment_data(experiment)[0])
    renamed = tmp_path / "renamed.pt"
    torch.save({"encoder." + k: v for k, v in torch.load(_saved(tmp_path), weights_only=True).items()}, renamed)
    experiment = _experiment(str(renamed))
    with pytest.raises(ModelError, match="missing from the file: .*not in the model: encoder"):
        experiment_model(experiment.resolve("fedavg"), experiment_data(experiment)[0])


def test_files_that_are_not_plain_state_dicts_are_refused_without_unpickling(tmp_path: Path) -> None:
    """A pickle of an arbitrary object never runs: torch.load(weights_only=True) refuses it."""

    class Boom:
        def __reduce__(self):  # what a malicious pickle does on load
            return (exec, ("raise SystemExit('unpickled!')",))

    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(pickle.dumps({"w": Boom()}))
    experiment = _experiment(str(hostile))
    with pytest.raises(ModelError, match="weights_only"):
        experiment_model(experiment.resolve("fedavg"), experiment_data(experiment)[0])
    with pytest.raises(ModelError, match="file not found"):
        experiment_model(_experiment(str(tmp_path / "nope.pt")).resolve("fedavg"), experiment_data(experiment)[0])


def test_weights_are_run_wide_and_bad_ones_are_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Only the top-level model block may set weights; run.py exits 2 naming the problem."""
    from fedpower.cli import main

    with pytest.raises(ConfigError, match="model.weights applies to the whole run"):
        parse_config({**BASE, "strategies": [{"name": "s", "model": {"weights": "x.pt"}}]})
    _saved(tmp_path, hidden=[32], name="wide.pt")
    config = tmp_path / "ft.yaml"
    config.write_text("experiment: ft\ndata: {dataset: digits, num_clients: 4}\n"
                      "model: {name: mlp, options: {hidden: [16]}, weights: wide.pt}\n"
                      "train: {rounds: 1, clients_per_round: 2}\nstrategies: [{name: fedavg}]\n")
    assert main([str(config), "--dry-run"]) == 2
    assert "does not fit the model" in " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def test_a_run_starts_from_the_pretrained_accuracy(tmp_path: Path) -> None:
    """Round 0 of an in-process run evaluates the loaded model, not a random one."""
    from fedpower.training import evaluate
    from strategies.simulation import simulate

    path = _saved(tmp_path)
    experiment = _experiment(str(path))
    settings = experiment.resolve("fedavg")
    _, _, _, _, x_test, y_test = experiment_data(experiment)
    expected = evaluate(experiment_model(settings, experiment_data(experiment)[0]), x_test, y_test)[1]
    results = simulate(experiment)
    assert results.strategies["fedavg"].initial_accuracy == pytest.approx(expected)
