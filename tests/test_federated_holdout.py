"""Federated evaluation runs on examples the client never trains on (issue #18, item 8)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpower.config import ConfigError, parse_config
from fedpower.data import split_holdout

pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside a running app


def test_split_is_disjoint_complete_seeded_and_sized() -> None:
    """Train ∪ holdout = the partition, no overlap; the same arguments give the same split; round(f·n) held out."""
    indices = np.arange(100, 150)
    train, held = split_holdout(indices, 0.2, seed=0, partition_id=3)
    assert len(held) == 10 and len(train) == 40
    assert not set(train) & set(held) and sorted([*train, *held]) == list(indices)
    again = split_holdout(indices, 0.2, seed=0, partition_id=3)
    assert np.array_equal(train, again[0]) and np.array_equal(held, again[1])
    assert not np.array_equal(held, split_holdout(indices, 0.2, seed=0, partition_id=4)[1])  # per client


def test_split_edge_cases() -> None:
    """Fraction 0 keeps everything for training; tiny partitions keep ≥ 1 example on each side when they can."""
    indices = np.arange(7)
    train, held = split_holdout(indices, 0.0, seed=0, partition_id=0)
    assert np.array_equal(train, indices) and len(held) == 0
    assert [len(part) for part in split_holdout(np.arange(2), 0.01, seed=0, partition_id=0)] == [1, 1]
    assert [len(part) for part in split_holdout(np.arange(2), 0.9, seed=0, partition_id=0)] == [1, 1]
    assert [len(part) for part in split_holdout(np.arange(1), 0.5, seed=0, partition_id=0)] == [1, 0]
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(indices, 1.0, seed=0, partition_id=0)


def _experiment(federated_evaluation: bool) -> Any:
    """A small resolved experiment (digits, logistic regression); one strategy evaluates federatedly or none."""
    strategies = [{"name": "plain"}, {"name": "evaluated", "train": {"federated_evaluation": federated_evaluation}}]
    return parse_config({"data": {"dataset": "digits", "num_clients": 5, "partition": {"kind": "iid"}},
                         "model": {"name": "logreg"}, "train": {"device": "cpu", "clients_per_round": 2},
                         "strategies": strategies})


class _Trained(Exception):
    """Raised by the stand-in for train_local once it has seen which examples it was given."""


def _client_examples(monkeypatch: pytest.MonkeyPatch, experiment: Any, strategy: str,
                     partition: int) -> tuple[set[int], set[int]]:
    """(rows the client's train handler trains on, rows its evaluate handler evaluates on), seen in the handlers."""
    import clients.app as client_app
    from fedpower.experiment import experiment_data, experiment_model
    from fedpower.records import tensors_to_arrays
    from fedpower.training import get_params

    dataset, parts, x_train, y_train, x_test, y_test = experiment_data(experiment)
    # Each training row replaced by its own index: the evaluate handler's input then names the rows it used.
    labelled = (dataset, parts, torch.arange(len(x_train)).unsqueeze(1), y_train, x_test, y_test)
    seen: dict[str, set[int]] = {}

    def fake_train(model: Any, global_params: Any, x: Any, y: Any, indices: Any, *args: Any) -> Any:
        seen["train"] = {int(i) for i in indices}
        raise _Trained

    def fake_evaluate(model: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        seen["evaluate"] = {int(row[0]) for row in x}
        return 0.0, 0.0

    monkeypatch.setattr(client_app, "experiment_data", lambda _: labelled)
    monkeypatch.setattr(client_app, "local_update", fake_train)
    monkeypatch.setattr(client_app, "evaluate", fake_evaluate)
    arrays = tensors_to_arrays(get_params(experiment_model(experiment.resolve(strategy), dataset)))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(), run_config={})
    config = ConfigRecord({"strategy": strategy, "server-round": 1})
    with pytest.raises(_Trained):
        client_app.handle_train(Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1,
                                        message_type="train"), context, experiment)
    reply = client_app.handle_evaluate(Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1,
                                               message_type="evaluate"), context, experiment)
    assert int(reply.content["metrics"]["num-examples"]) == len(seen["evaluate"])
    return seen["train"], seen["evaluate"]


def test_clients_evaluate_only_on_examples_they_do_not_train_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """With federated evaluation in the run, every strategy trains on the rest and evaluates on the held-out 20 %."""
    from fedpower.experiment import experiment_data

    experiment = _experiment(federated_evaluation=True)
    partition = experiment_data(experiment)[1][2]
    for strategy in ("plain", "evaluated"):  # the same split for all strategies: they train on identical data
        trained, evaluated = _client_examples(monkeypatch, experiment, strategy, 2)
        assert trained and evaluated and not trained & evaluated
        assert trained | evaluated == {int(i) for i in partition}
        assert len(evaluated) == round(0.2 * len(partition))


def test_runs_without_federated_evaluation_train_on_the_whole_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """No strategy evaluates federatedly: no holdout, training is unchanged."""
    from fedpower.experiment import experiment_data

    experiment = _experiment(federated_evaluation=False)
    trained, _ = _client_examples(monkeypatch, experiment, "plain", 2)
    assert trained == {int(i) for i in experiment_data(experiment)[1][2]}


def test_holdout_is_run_wide_and_bounded() -> None:
    """federated_holdout: in (0, 1), only in the top-level train block."""
    base = {"strategies": [{"name": "fedavg"}]}
    assert parse_config(base).train.federated_holdout == 0.2
    with pytest.raises(ConfigError, match="federated_holdout"):
        parse_config({**base, "train": {"federated_holdout": 1.0}})
    with pytest.raises(ConfigError, match="federated_holdout"):
        parse_config({"strategies": [{"name": "s", "train": {"federated_holdout": 0.3}}]})
