"""Reliability: norm bound, round/basis ids, minimum clients, dropouts and stragglers, checkpoint/resume.

Fast tests drive ``CompressedFedAvg`` with hand-built Flower messages; the slow test runs ``run.py``,
kills it with SIGKILL mid-run and checks that ``--resume`` ends with the same metrics as a run that was
never interrupted (and that a 30 % dropout strategy completes and learns).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from clients.failures import DELAY_METRIC, SIMULATED_FAILURE_CODE, draw_failure, dropout_reply, is_simulated_dropout
from fedpower.checkpoint import (
    CheckpointError, capture_rng, load_run_checkpoint, read_checkpoint, restore_rng, save_run_checkpoint,
    write_checkpoint,
)
from fedpower.codecs import layout_of, pack
from fedpower.ledger import Transfer
from fedpower.results import RunResults
from conftest import strategy_settings
from fedpower.round import RoundStats
from strategies.compressed import CompressedFedAvg

ROOT = Path(__file__).resolve().parents[1]
NODES = {100 + p: p for p in range(5)}  # node id → partition

pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside a running app


def _params() -> dict[str, torch.Tensor]:
    """A small two-layer model's parameters."""
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(24, 16, generator=g), "fc.bias": torch.randn(24, generator=g)}


def _strategy(compression: dict[str, Any] | None = None, *, privacy: Any = None, max_norm_ratio: float | None = None,
              min_valid_clients: int = 1, round_deadline_s: float | None = None,
              rejoin_wait_s: float = 0.0) -> CompressedFedAvg:
    """A strategy over five nodes that samples all of them every round (FedAvgM on the server)."""
    stats: list[RoundStats] = []
    train = {"server_optimizer": {"name": "momentum"},
             "robustness": {"max_norm_ratio": max_norm_ratio, "min_valid_clients": min_valid_clients},
             "failures": {"round_deadline_s": round_deadline_s, "rejoin_wait_s": rejoin_wait_s}}
    strategy = CompressedFedAvg(strategy_settings(compression, train=train), _params(),
                                lambda server_round: sorted(NODES), node_partitions=NODES, privacy=privacy,
                                on_round=stats.append)
    strategy.finished = stats  # type: ignore[attr-defined]
    return strategy


def _update(partition: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A client's model delta."""
    g = torch.Generator().manual_seed(1000 + partition)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in _params().items()}


def _reply(strategy: CompressedFedAvg, instruction: Message, update: dict[str, torch.Tensor],
           **metric_overrides: Any) -> Message:
    """What an honest client sends for ``update``, with some metrics overridden."""
    config = instruction.content["config"]
    codec = strategy.round_codec(int(config["server-round"]))
    inputs = layout_of(update)
    encoded, _ = codec.encode(update, codec.init_state(inputs), torch.Generator().manual_seed(0))
    packed = pack(encoded, codec.layout(inputs))
    metrics = {"num-examples": 10, "train_loss": 1.0, "partition-id": NODES[instruction.metadata.dst_node_id],
               "server-round": int(config["server-round"]), "basis-id": int(config["basis-id"]), DELAY_METRIC: 0.0}
    metrics.update(metric_overrides)
    return Message(RecordDict({"payload": ArrayRecord({k: Array(v) for k, v in packed.items()}),
                               "metrics": MetricRecord(metrics)}), reply_to=instruction)


def _round(strategy: CompressedFedAvg, server_round: int = 1) -> list[Message]:
    """configure_train for one round (Flower's round counter; the strategy adds its offset)."""
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in strategy.params.items()})
    return list(strategy.configure_train(server_round, arrays, ConfigRecord(), None))  # type: ignore[arg-type]


# -- norm bound, ids, minimum clients, failures -------------------------------------------------------
def test_absurd_norm_is_rejected_and_the_rest_aggregated() -> None:
    """A reply 1000× the median norm is refused and counted; the others are averaged as usual."""
    strategy, reference = _strategy(max_norm_ratio=10.0), _strategy(max_norm_ratio=None)
    before = {k: v.clone() for k, v in strategy.params.items()}
    updates = [_update(p, scale=10.0 if p == 3 else 0.01) for p in range(5)]
    replies = [_reply(strategy, m, updates[NODES[m.metadata.dst_node_id]]) for m in _round(strategy)]
    arrays, _ = strategy.aggregate_train(1, replies)
    stats = strategy.finished[-1]  # type: ignore[attr-defined]
    assert arrays is not None and stats.rejected == 1 and stats.accepted == 4
    assert "partition 3" in stats.reasons[0] and "median" in stats.reasons[0]
    assert stats.largest_norm_ratio > 100
    expected = {k: before[k] + sum(updates[p][k] for p in (0, 1, 2, 4)) / 4 for k in before}
    for k in expected:
        torch.testing.assert_close(strategy.params[k], expected[k])
    honest = [_reply(reference, m, updates[NODES[m.metadata.dst_node_id]]) for m in _round(reference)]
    reference.aggregate_train(1, honest)  # without the bound the huge update gets in
    assert reference.finished[-1].rejected == 0  # type: ignore[attr-defined]
    assert float((reference.params["fc.weight"] - before["fc.weight"]).norm()) > 100 * float(
        (strategy.params["fc.weight"] - before["fc.weight"]).norm())


def test_lower_median_bounds_even_two_replies() -> None:
    """With two replies the bound compares to the smaller norm; a zero median disables it."""
    strategy = _strategy(max_norm_ratio=10.0)
    strategy.sampler = lambda server_round: [100, 101]
    messages = _round(strategy)
    strategy.aggregate_train(1, [_reply(strategy, messages[0], _update(0)),
                                 _reply(strategy, messages[1], _update(1, scale=1.0))])
    assert strategy.finished[-1].rejected == 1  # type: ignore[attr-defined]
    zero = {k: torch.zeros_like(v) for k, v in _params().items()}
    messages = _round(strategy, 2)
    strategy.aggregate_train(2, [_reply(strategy, messages[0], zero), _reply(strategy, messages[1], _update(1))])
    assert strategy.finished[-1].rejected == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("override,needle", [
    ({"server-round": 7}, "server-round"),
    ({"basis-id": 3}, "basis-id"),
    ({"server-round": [1, 2]}, "server-round"),
    ({"num-examples": [5.0]}, "num-examples"),
    ({DELAY_METRIC: float("nan")}, DELAY_METRIC),
])
def test_mismatched_ids_and_odd_metrics_are_rejected(override: dict[str, Any], needle: str) -> None:
    """Replies for another round or basis, or with unreadable metrics, are refused (never a crash)."""
    strategy = _strategy(round_deadline_s=1.0)
    messages = _round(strategy)
    replies = [_reply(strategy, m, _update(i), **(override if i == 0 else {})) for i, m in enumerate(messages)]
    arrays, _ = strategy.aggregate_train(1, replies)
    stats = strategy.finished[-1]  # type: ignore[attr-defined]
    assert arrays is not None and stats.rejected == 1 and stats.accepted == 4
    assert needle in stats.reasons[0]


def test_shared_basis_id_advances_and_stale_basis_replies_are_refused() -> None:
    """Shared PowerSGD: the basis id moves with the basis; a reply made with the previous one is rejected."""
    strategy = _strategy({"method": "powersgd", "mode": "shared", "rank": 2, "entropy_coding": "none"})
    first = _round(strategy)
    assert int(first[0].content["config"]["basis-id"]) == 0
    strategy.aggregate_train(1, [_reply(strategy, m, _update(i)) for i, m in enumerate(first)])
    second = _round(strategy, 2)
    assert int(second[0].content["config"]["basis-id"]) == 1 and second[0].content["config"]["side"] == "right"
    replies = [_reply(strategy, m, _update(i), **({"basis-id": 0} if i < 2 else {})) for i, m in enumerate(second)]
    strategy.aggregate_train(2, replies)
    assert strategy.finished[-1].rejected == 2 and strategy.finished[-1].accepted == 3  # type: ignore[attr-defined]


def test_too_few_valid_clients_keep_the_old_model() -> None:
    """Dropouts, a late reply and a client error leave 2 valid replies < min_valid_clients 3: model unchanged."""
    strategy = _strategy(min_valid_clients=3, round_deadline_s=1.0)
    before = {k: v.clone() for k, v in strategy.params.items()}
    messages = _round(strategy)
    replies = [
        Message(Error(code=SIMULATED_FAILURE_CODE, reason="fedpower: simulated dropout"), reply_to=messages[0]),
        Message(Error(code=SIMULATED_FAILURE_CODE, reason="fedpower: simulated dropout"), reply_to=messages[1]),
        Message(Error(code=2, reason="ValueError: boom"), reply_to=messages[2]),
        _reply(strategy, messages[3], _update(3)),
        _reply(strategy, messages[4], _update(4), **{DELAY_METRIC: 1.5}),
    ]
    assert strategy.aggregate_train(1, replies) == (None, None)
    stats = strategy.finished[-1]  # type: ignore[attr-defined]
    assert (stats.failures, stats.dropouts, stats.late, stats.accepted) == (4, 2, 1, 1)
    assert stats.kept_reason and "min_valid_clients 3" in stats.kept_reason
    for k in before:
        assert torch.equal(strategy.params[k], before[k])
    ups = [t for t in strategy.ledger.transfers if t.direction == "up"]
    assert len(ups) == 2  # bytes of the on-time and the late reply were spent; dropouts sent nothing


class _RebootingGrid:
    """A grid on which one node is offline for the first ``offline_calls`` get_node_ids() calls."""

    def __init__(self, offline_node: int, offline_calls: int) -> None:
        self.offline_node, self.offline_calls, self.calls = offline_node, offline_calls, 0

    def get_node_ids(self) -> list[int]:
        """Online nodes, as the SuperLink reports them."""
        self.calls += 1
        online = sorted(NODES)
        return [n for n in online if n != self.offline_node] if self.calls <= self.offline_calls else online


def test_round_waits_for_a_rebooting_node_but_not_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sampled node that is offline is waited for (bounded by rejoin_wait_s), then the round goes out."""
    clock = [0.0]
    monkeypatch.setattr("strategies.compressed.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("strategies.compressed.time.sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in _params().items()})
    node = sorted(NODES)[2]
    back = _RebootingGrid(node, offline_calls=4)  # online again after 1.5 s of waiting
    messages = list(_strategy(rejoin_wait_s=30.0).configure_train(1, arrays, ConfigRecord(), back))  # type: ignore[arg-type]
    assert back.calls == 5 and clock[0] == pytest.approx(2.0)
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(NODES)
    clock[0] = 0.0
    gone = _RebootingGrid(node, offline_calls=10**6)
    messages = list(_strategy(rejoin_wait_s=3.0).configure_train(1, arrays, ConfigRecord(), gone))  # type: ignore[arg-type]
    assert clock[0] == pytest.approx(3.0) and len(messages) == len(NODES)  # sent anyway: its reply fails
    quiet = _RebootingGrid(node, offline_calls=10**6)
    list(_strategy(rejoin_wait_s=0.0).configure_train(1, arrays, ConfigRecord(), quiet))  # type: ignore[arg-type]
    assert quiet.calls == 0  # off: no waiting, not even a query


def test_failure_draws_are_seeded_coupled_and_at_the_configured_rate() -> None:
    """Same (seed, round, partition) → same fate; a client dropped at 0.3 is dropped at 0.5; rates match."""
    settings = {"dropout": 0.3, "straggler_fraction": 0.2, "straggler_delay_s": 2.0, "round_deadline_s": 1.0}
    draws = [draw_failure(settings, 0, r, p) for r in range(1, 51) for p in range(40)]
    assert draws == [draw_failure(settings, 0, r, p) for r in range(1, 51) for p in range(40)]
    assert draws != [draw_failure(settings, 1, r, p) for r in range(1, 51) for p in range(40)]
    assert 0.26 < np.mean([d.dropped for d in draws]) < 0.34
    slow = [d.delay_s for d in draws if d.delay_s > 0]
    assert 0.17 < len(slow) / len(draws) < 0.23 and 1.7 < np.mean(slow) < 2.3
    higher = [draw_failure({**settings, "dropout": 0.5}, 0, r, p) for r in range(1, 51) for p in range(40)]
    assert all(h.dropped for d, h in zip(draws, higher) if d.dropped)
    assert not any(draw_failure(None, 0, r, 0).dropped for r in range(100))


def test_dropped_client_returns_before_training_or_state_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """handle_train of a dropped client replies with the simulated-failure error and touches nothing."""
    import clients.app as client_app
    from flwr.app import Context

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a dropped client must not load data or touch its state")

    monkeypatch.setattr(client_app, "experiment_data", forbidden)
    monkeypatch.setattr(client_app, "make_store", forbidden)
    train = {"failures": {"dropout": 0.5}}
    server_round, partition = next((r, p) for r in range(1, 20) for p in range(10)
                                   if draw_failure(train["failures"], 0, r, p).dropped)
    from fedpower.config import parse_config

    experiment = parse_config({"seed": 0, "train": {**train, "device": "cpu"},
                               "strategies": [{"name": "s", "compression": {"method": "powersgd", "quantize_bits": None,
                                                                        "entropy_coding": "none"}}]})
    instruction = Message(RecordDict({"config": ConfigRecord({"strategy": "s", "server-round": server_round})}),
                          dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(), run_config={})
    reply = client_app.handle_train(instruction, context, experiment)
    assert reply.has_error() and is_simulated_dropout(reply)
    assert len(context.state) == 0
    kept = next((r, p) for r in range(1, 20) for p in range(10) if not draw_failure(train["failures"], 0, r, p).dropped)
    assert dropout_reply(instruction, experiment.train.failures, 0, *kept) is None


def test_no_unpickling_anywhere() -> None:
    """Nothing we ship unpickles: no pickle loads, no allow_pickle=True, torch.load only with weights_only=True."""
    offenders = []
    for folder in ("fedpower", "clients", "strategies", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for pattern in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"\bdill\b", r"\bcloudpickle\.loads?\("):
                offenders += [f"{path.name}: {pattern}" for _ in re.finditer(pattern, text)]
            for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in call.group(1):
                    offenders.append(f"{path.name}: {call.group(0)}")
    assert offenders == []


# -- checkpoints --------------------------------------------------------------------------------------
def test_strategy_state_round_trip_continues_identically() -> None:
    """A strategy restored from state_dict() makes exactly the same next round as the original."""
    compression = {"method": "powersgd", "mode": "shared", "rank": 2, "quantize_bits": 8, "entropy_coding": "none"}
    original = _strategy(compression)
    for server_round in (1, 2, 3):
        messages = _round(original, server_round)
        original.aggregate_train(server_round, [_reply(original, m, _update(i + server_round))
                                                for i, m in enumerate(messages)])
    arrays, meta = original.state_dict()
    meta = json.loads(json.dumps(meta))
    restored = _strategy(compression)
    restored.load_state({k: v.copy() for k, v in arrays.items()}, meta)
    restored.round_offset = 3
    assert restored.codec_state.side == original.codec_state.side
    assert restored.codec_state.basis_version == original.codec_state.basis_version == 3
    for strategy, flower_round in ((original, 4), (restored, 1)):
        messages = _round(strategy, flower_round)
        assert int(messages[0].content["config"]["server-round"]) == 4
        strategy.aggregate_train(flower_round, [_reply(strategy, m, _update(i + 4)) for i, m in enumerate(messages)])
    for k in original.params:
        assert torch.equal(original.params[k], restored.params[k])
    for k in original.codec_state.basis or {}:
        assert torch.equal(original.codec_state.basis[k], restored.codec_state.basis[k])  # type: ignore[index]
    with pytest.raises(ValueError, match="strategy"):
        _strategy(compression).load_state(arrays, {**meta, "name": "other"})


def test_privacy_accountant_state_round_trips() -> None:
    """A resumed DP strategy continues from the same ε, σ and per-client participation counts."""
    from fedpower.privacy import make_plan

    def plan() -> Any:
        return make_plan({"mode": "local", "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}, num_clients=5,
                         cohort_size=5, rounds=10)

    original = _strategy(privacy=plan())
    for cohort in ([0, 1, 2], [0, 3], [0, 4]):
        original.privacy.record(cohort)  # type: ignore[union-attr]
    arrays, meta = original.state_dict()
    restored = _strategy(privacy=plan())
    restored.load_state(arrays, json.loads(json.dumps(meta)))
    privacy = restored.privacy
    assert privacy is not None and privacy.accountant.steps == 3 and privacy.participations[0] == 3
    assert restored.epsilon == original.epsilon > 0


def _results() -> RunResults:
    """Results with one finished strategy, NaN metrics and a ledger."""
    results = RunResults(experiment="e", config={})
    first = results.strategy("a")
    first.rounds = [{"round": 1, "accuracy": float("nan"), "loss": 1.5, "kept_reason": None, "uplink_bytes": 5}]
    first.client_metrics = {1: [{"partition-id": 3.0, "train_loss": 0.25}]}
    first.ledger.record(Transfer(0, 3, "down", 0, 150, 0, "discover", 149))
    first.ledger.record(Transfer(1, 3, "up", 10, 20, 40))
    first.ledger.record(Transfer(1, 3, "down", 11, 21, 40, "train", 7))
    first.ledger.record(Transfer(1, 3, "up", 0, 30, 0, "evaluate", 9))
    first.completed, first.wall_seconds, first.initial_accuracy = True, 1.25, 0.1
    return results


def test_checkpoint_ledgers_without_header_column_still_load() -> None:
    """Checkpoints from before headers (7 columns) or evaluation (6) were counted load with those columns at 0."""
    from fedpower.checkpoint import _ledger_from_array

    seven = np.array([[1, 3, 0, 10, 20, 40, 1]], dtype=np.int64)
    assert _ledger_from_array(seven).transfers == [Transfer(1, 3, "up", 10, 20, 40, "evaluate", 0)]
    assert _ledger_from_array(seven[:, :6]).transfers == [Transfer(1, 3, "up", 10, 20, 40, "train", 0)]
    with pytest.raises(CheckpointError):
        _ledger_from_array(seven[:, :5])


def test_run_checkpoint_round_trip(tmp_path: Path) -> None:
    """Results (NaN included), ledger, strategy state and RNG states come back exactly."""
    experiment = {"experiment": "e", "strategies": [{"name": "a"}, {"name": "b"}]}
    state = ({"params/w": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"name": "b", "side": "right"})
    torch.manual_seed(5)
    save_run_checkpoint(tmp_path, experiment=experiment, results=_results(), strategy_index=1, completed_round=4,
                        strategy_state=state)
    expected_draw = torch.rand(3)
    point = load_run_checkpoint(tmp_path)
    assert point is not None and not point.finished
    assert (point.strategy_index, point.completed_round, point.experiment) == (1, 4, experiment)
    np.testing.assert_array_equal(point.strategy_arrays["params/w"], state[0]["params/w"])
    assert point.strategy_meta == state[1]
    restored = point.results["a"]
    assert np.isnan(restored.rounds[0]["accuracy"]) and restored.rounds[0]["loss"] == 1.5
    assert restored.client_metrics == {1: [{"partition-id": 3.0, "train_loss": 0.25}]}
    assert restored.ledger.transfers == _results().strategies["a"].ledger.transfers
    assert restored.completed and restored.wall_seconds == 1.25 and restored.initial_accuracy == 0.1
    torch.manual_seed(99)
    restore_rng(point.rng["arrays"], point.rng["meta"])
    assert torch.equal(torch.rand(3), expected_draw)
    assert load_run_checkpoint(tmp_path / "nothing-here") is None


def test_checkpoint_write_is_atomic_and_damage_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies midway leaves the previous checkpoint intact; damaged or pickled files are refused."""
    path = tmp_path / "checkpoint.npz"
    write_checkpoint(path, {"x": np.ones(3)}, {"format": "fedpower-checkpoint", "version": 1, "n": 1})

    def dying_savez(fh: Any, **arrays: Any) -> None:
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(path, {"x": np.zeros(3)}, {"format": "fedpower-checkpoint", "version": 1, "n": 2})
    monkeypatch.undo()
    arrays, meta = read_checkpoint(path)
    assert meta["n"] == 1 and arrays["x"].tolist() == [1, 1, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temp file left behind

    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(path)
    np.savez(path, **{"meta.json": np.frombuffer(b"{}", dtype=np.uint8), "evil": np.array([object()], dtype=object)})
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_rng_capture_restores_python_numpy_and_torch() -> None:
    """The three global generators continue from the captured point."""
    import random

    arrays, meta = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    restore_rng(arrays, meta)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# -- run.py --resume ----------------------------------------------------------------------------------
TINY = """\
experiment: reliability
seed: 1
data: {dataset: mnist1d, num_clients: 10, partition: {kind: dirichlet, alpha: 1.0}}
model: {name: mlp, options: {hidden: [32]}}
train: {rounds: 4, clients_per_round: 5, local_epochs: 2, batch_size: 16, lr: 0.05,
        server_optimizer: {name: momentum, momentum: 0.9}}
client_state: {store: disk}
strategies:
  - name: fedavg
  - name: fedavg-dropout30
    train: {failures: {dropout: 0.3, straggler_fraction: 0.3, straggler_delay_s: 2.0, round_deadline_s: 1.0}}
  - name: psgd-shared
    compression: {method: powersgd, mode: shared, rank: 2, quantize_bits: 8, error_feedback: true}
    train: {rounds: 12, failures: {dropout: 0.3}}
"""


def _run_py(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """run.py in a subprocess from the repository root."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_resume_refuses_another_config_and_unknown_folders(tmp_path: Path) -> None:
    """--resume with a differing CONFIG or --set, or a folder that is no run, exits 2 naming the problem."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "out"
    out.mkdir()
    from fedpower.config import load_config

    experiment = load_config(config).to_dict()
    experiment["client_state"]["dir"] = str((out / "client_state").resolve())
    (out / "config.resolved.json").write_text(json.dumps(experiment))
    proc = _run_py(str(config), "--resume", str(out), "--set", "train.lr=0.1", "--dry-run")
    message = " ".join(proc.stderr.split())  # the console wraps long lines
    assert proc.returncode == 2 and "train.lr: 0.05 then, 0.1 now" in message, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    proc = _run_py(str(config), "--resume", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # A run started by an older version, before some keys existed: their defaults are no change.
    for strategy in experiment["strategies"]:
        del strategy["compression"]["entropy_coding"]
        strategy["compression"]["downlink"].update(rank=4, error_feedback=True)  # keys this version dropped
    del experiment["network"]
    (out / "config.resolved.json").write_text(json.dumps(experiment))
    proc = _run_py(str(config), "--resume", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run_py("--resume", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run_py("--resume", str(tmp_path), "--dry-run")
    assert proc.returncode == 2 and "no config.resolved.json" in " ".join(proc.stderr.split())
    proc = _run_py("--resume", str(out), "--set", "seed=3")
    assert proc.returncode == 2 and "--set cannot change" in " ".join(proc.stderr.split())


def _final_metrics(out: Path) -> list[Any]:
    """Every round's metrics and every final block without timings."""
    results = json.loads((out / "results.json").read_text())
    drop = {"seconds", "wall_seconds"}
    return [([{k: v for k, v in r.items() if k not in drop} for r in s["rounds"]],
             {k: v for k, v in s["final"].items() if k not in drop}) for s in results["strategies"]]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """kill -9 mid-run, --resume: the same final metrics as a run never interrupted; 30 % dropout still learns."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    whole = tmp_path / "whole"
    proc = _run_py(str(config), "--out", str(whole), "--no-plots", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((whole / "results.json").read_text())
    by_name = {s["name"]: s for s in results["strategies"]}
    dropped = by_name["fedavg-dropout30"]
    assert dropped["completed"] and len(dropped["rounds"]) == 4
    final = dropped["final"]
    assert final["dropouts"] > 0 and final["late_replies"] > 0  # seed 1: 6 dropouts and 2 late replies
    assert final["client_failures"] == final["dropouts"] + final["late_replies"]
    assert all(r["accepted"] + r["rejected"] + r["failures"] == r["clients"] for r in dropped["rounds"])
    assert by_name["fedavg"]["final"]["client_failures"] == 0
    first_accuracy = json.loads(json.dumps(dropped["rounds"][0]["accuracy"]))
    assert dropped["final"]["accuracy"] > first_accuracy and dropped["final"]["accuracy"] > 0.2

    killed = tmp_path / "killed"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    run = subprocess.Popen([sys.executable, str(ROOT / "run.py"), str(config), "--out", str(killed), "--no-plots"],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            point = load_run_checkpoint(killed) if (killed / "checkpoint.npz").exists() else None
            if point is not None and point.strategy_index == 2 and point.completed_round >= 2:
                break
            assert run.poll() is None, "run.py ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("the run never reached round 2 of its last strategy")
        os.killpg(run.pid, signal.SIGKILL)  # the whole process group: Ray's workers die with the driver
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    point = load_run_checkpoint(killed)
    assert point is not None and point.strategy_index == 2 and 2 <= point.completed_round < 12
    assert not (killed / "results.json").exists()

    proc = _run_py(str(config), "--resume", str(killed), "--no-plots", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Resuming psgd-shared after round {point.completed_round}" in proc.stdout
    assert _final_metrics(killed) == _final_metrics(whole)


def test_replies_discarded_after_commit_are_counted() -> None:
    """Rejected and late replies, and a kept round's accepted ones, lost the clients' committed residual mass."""
    from fedpower.round import RoundStats

    assert RoundStats(round=1, accepted=3, rejected=1, late=2).discarded_after_commit == 3
    assert RoundStats(round=1, accepted=2, rejected=1, kept_reason="too few").discarded_after_commit == 3
    strategy = _strategy(max_norm_ratio=10.0)
    updates = [_update(p, scale=10.0 if p == 3 else 0.01) for p in range(5)]
    strategy.aggregate_train(1, [_reply(strategy, m, updates[NODES[m.metadata.dst_node_id]]) for m in _round(strategy)])
    assert strategy.finished[-1].discarded_after_commit == 1  # type: ignore[attr-defined]


def test_local_dp_round_redone_after_a_crash_is_accounted_twice(tmp_path: Path) -> None:
    """Killed between the clients' replies and the round's checkpoint: the resumed run counts both releases.

    Under local DP each reply is a release to the (untrusted) server. The crash is injected where the
    checkpoint of round 2 would be written; the resume redoes round 2, whose clients release again.
    """
    import strategies.server as server
    from clients.app import make_client_app
    from fedpower.config import parse_config
    from fedpower.experiment import privacy_plan
    from fedpower.privacy import cohort_sampler
    from strategies.inprocess import InProcessGrid

    experiment = parse_config({
        "experiment": "ldp-crash", "seed": 0, "data": {"dataset": "digits", "num_clients": 6, "partition": {"kind": "iid"}},
        "model": {"name": "logreg"}, "train": {"rounds": 3, "clients_per_round": 3, "device": "cpu"},
        "client_state": {"store": "disk", "dir": str(tmp_path / "state")},
        "strategies": [{"name": "ldp", "compression": {"method": "none"},
                        "privacy": {"mode": "local", "clip_norm": 1.0, "noise_multiplier": 2.0, "noise_seed": 0}}]})

    class Crash(Exception):
        pass

    real_save = server.save_run_checkpoint

    def dying_save(*args: Any, **kwargs: Any) -> None:
        if kwargs["completed_round"] == 2:
            raise Crash  # the process dies after round 2's replies, before its checkpoint
        real_save(*args, **kwargs)

    def run(resume: Any) -> RunResults:
        results = RunResults(experiment="ldp-crash", config=experiment.to_dict())
        results.checkpoint_dir, results.resume_from = str(tmp_path), resume
        server.run_strategies(InProcessGrid(make_client_app(experiment), 6), experiment, results)
        return results

    server.save_run_checkpoint = dying_save
    try:
        with pytest.raises(Crash):
            run(None)
    finally:
        server.save_run_checkpoint = real_save
    point = load_run_checkpoint(tmp_path)
    assert point is not None and point.completed_round == 1
    resumed = run(point).strategies["ldp"]
    settings = experiment.resolve("ldp")
    sample = cohort_sampler(0, range(6), 3, "poisson")
    expected, once = privacy_plan(settings), privacy_plan(settings)
    for server_round in (1, 2, 2, 3):  # round 2 released twice
        expected.record(sample(server_round))  # type: ignore[union-attr]
    for server_round in (1, 2, 3):
        once.record(sample(server_round))  # type: ignore[union-attr]
    assert resumed.final()["epsilon"] == pytest.approx(expected.epsilon)  # type: ignore[union-attr]
    assert resumed.final()["epsilon"] > once.epsilon  # type: ignore[union-attr]
