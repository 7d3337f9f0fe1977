"""Every byte and every number of a run checked against something the run did not compute itself (#18).

One small run (digits, logistic regression, 20 clients, 6 rounds) through the real ServerApp and
ClientApp code over an in-process grid that keeps every message it carried.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedpower.config import parse_config
from fedpower.privacy.sampling import poisson_cohort
from loopback_grid import run_in_process

NUM_CLIENTS, COHORT, ROUNDS, SIGMA, DELTA = 20, 5, 6, 1.0, 1e-5
DP = {"mode": "central", "clip_norm": 1.0, "noise_multiplier": SIGMA, "delta": DELTA, "sampling": "poisson",
      "noise_seed": 0}


@pytest.fixture(scope="module")
def run() -> Iterator[tuple[Any, Any]]:
    """(results, grid) of one run of five strategies; two DP strategies identical but for their names."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # type: ignore[attr-defined]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a SuperLink would set
    experiment = parse_config({
        "experiment": "honesty", "seed": 0,
        "data": {"dataset": "digits", "num_clients": NUM_CLIENTS, "partition": {"kind": "iid"}},
        "model": {"name": "logreg"},
        "train": {"device": "cpu", "rounds": ROUNDS, "clients_per_round": COHORT, "failures": {"rejoin_wait_s": 0}},
        "strategies": [
            {"name": "fedavg"},
            {"name": "fedavg-poisson", "train": {"sampling": "poisson"}},
            {"name": "psgd-shared", "compression": {"method": "powersgd", "mode": "shared", "rank": 2}},
            {"name": "dp-a", "privacy": DP},
            {"name": "dp-b", "privacy": DP},
        ]}).to_dict()
    yield run_in_process(experiment)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved  # type: ignore[attr-defined]


def _serialized_size(obj: Any, seen: set[str]) -> int:
    """Bytes Flower ships for an inflatable object tree: each distinct object's deflate(), once."""
    if obj.object_id in seen:
        return 0
    seen.add(obj.object_id)
    return len(obj.deflate()) + sum(_serialized_size(child, seen) for child in (obj.children or {}).values())


#: The ledger's id model, stated here on its own: in a deployment run, node and task ids are random
#: 8-byte numbers (at most 10 varint bytes: 2^64 − 1 is the widest), message ids SHA-256 hex, and the
#: SuperLink's node id is Flower's constant 1.
WIDEST_ID, SHA256_HEX, SUPERLINK = (1 << 64) - 1, "0" * 64, 1


def _as_deployed(message: Message) -> Message:
    """The delivered message (same content, type, TTL, time) with the widest ids a deployment can give it."""
    old = message.metadata
    reply = bool(old.reply_to_message_id)
    metadata = Metadata(run_id=WIDEST_ID, message_id="", src_node_id=WIDEST_ID if reply else SUPERLINK,
                        dst_node_id=SUPERLINK if reply else WIDEST_ID, reply_to_message_id=SHA256_HEX if reply else "",
                        group_id=old.group_id, created_at=old.created_at, ttl=old.ttl, message_type=old.message_type,
                        src_task_id=WIDEST_ID, dst_task_id=WIDEST_ID)
    return Message(metadata=metadata, content=message.content)


def _ledger(results: Any) -> dict[tuple[str, int, int, str], Any]:
    """(strategy, round, partition, direction) → the ledger's training transfer."""
    return {(name, t.round, t.client, t.direction): t
            for name, result in results.strategies.items() for t in result.ledger.transfers if t.purpose == "train"}


def _cohorts(results: Any, name: str) -> dict[int, list[int]]:
    """round → partitions whose uplink the ledger counted (every client replies in this run)."""
    cohorts: dict[int, list[int]] = {}
    for t in results.strategies[name].ledger.transfers:
        if t.direction == "up":
            cohorts.setdefault(t.round, []).append(t.client)
    return {r: sorted(c) for r, c in cohorts.items()}


def test_ledger_counts_exactly_what_crossed_the_grid(run: tuple[Any, Any]) -> None:
    """Each train message's ledger entry = the whole message measured here on the delivered message, both ways.

    Independent measures: the deflate() of every object from the Message root down (what Flower's
    transport ships: the Message object is the header, the records and arrays the content), with the
    ids set here to a deployment's widest; Flower's protobuf serde of the same message, which frames
    it without per-object headers (so it is smaller by a bounded amount); and the header as really
    deflated with the ids the grid used, which the ledger's id model must never undercount.
    """
    results, grid = run
    counted = _ledger(results)
    checked = 0
    for instruction, reply in grid.delivered:
        if instruction.metadata.message_type != MessageType.TRAIN:
            continue
        config = instruction.content["config"]
        key = (str(config["strategy"]), int(config["server-round"]),
               grid.partition_of[instruction.metadata.dst_node_id])
        for direction, message in (("down", instruction), ("up", reply)):
            transfer = counted[(*key, direction)]
            deployed = _as_deployed(message)
            assert transfer.wire_bytes == _serialized_size(deployed, set()), (key, direction)
            assert transfer.header_bytes == len(deployed.deflate()), (key, direction)
            assert transfer.content_bytes == _serialized_size(message.content, set()), (key, direction)
            # Never below the header as it was: the grid's own ids, and its 36-character message ids.
            real = len(message.deflate())
            assert real <= transfer.header_bytes <= real + 80, (key, direction, real, transfer.header_bytes)
            protobuf = message_to_proto(deployed).ByteSize()
            assert protobuf <= transfer.wire_bytes <= protobuf + 2048, (key, direction, protobuf, transfer.wire_bytes)
            checked += 1
    assert checked == 2 * sum(len(c) for name in results.strategies for c in _cohorts(results, name).values())


def test_header_model_never_undercounts_random_ids() -> None:
    """Flower's real header with random 64-bit ids and SHA-256 message ids is never longer than the ledger's."""
    from strategies.wire import header_bytes

    rng = random.Random(0)
    content = RecordDict({"config": ConfigRecord({"server-round": 3})})
    widest = 0
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # type: ignore[attr-defined]
    for _ in range(200):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (rng.getrandbits(64), SUPERLINK,
                                                                           rng.getrandbits(64))
        instruction = Message(content, dst_node_id=rng.getrandbits(64), message_type=MessageType.TRAIN,
                              dst_task_id=rng.getrandbits(64))
        instruction.metadata.__dict__["_message_id"] = instruction.object_id  # a SuperLink's id: SHA-256 hex
        reply = Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=instruction)
        for message in (instruction, reply):
            assert len(message.deflate()) <= header_bytes(message)
            widest = max(widest, header_bytes(message) - len(message.deflate()))
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved  # type: ignore[attr-defined]
    assert widest <= 40  # an upper bound, but a close one: a few bytes per id


def test_shared_basis_is_counted_on_the_downlink(run: tuple[Any, Any]) -> None:
    """A shared-mode round's downlink = the model's (FedAvg's, same model) + the broadcast basis r·dim fp32."""
    results, _ = run
    counted = _ledger(results)
    rank, rows, cols = 2, 10, 64  # logreg on digits: weight 10 × 64 (the bias is sent dense)
    extra = {}
    for server_round in (1, 2):
        shared = [t.wire_bytes for (n, r, _, d), t in counted.items() if (n, r, d) == ("psgd-shared", server_round, "down")]
        dense = [t.wire_bytes for (n, r, _, d), t in counted.items() if (n, r, d) == ("fedavg", server_round, "down")]
        assert len(set(shared)) == len(set(dense)) == 1  # one message size per round, per strategy
        extra[server_round] = shared[0] - dense[0]
    # The basis alternates sides: m × r in one round, n × r in the next (4 bytes per float32), plus its
    # .npy header (128 bytes) and the framing of one more record (bounded: a few hundred bytes).
    low, high = sorted(extra.values())
    assert 4 * rank * rows + 128 <= low <= 4 * rank * rows + 1024
    assert 4 * rank * cols + 128 <= high <= 4 * rank * cols + 1024


def test_dp_strategies_draw_poisson_cohorts(run: tuple[Any, Any]) -> None:
    """DP (Poisson) cohorts are each partition with probability q, seeded per round; fixed stays k."""
    from strategies.server import make_sampler

    results, _ = run
    rate = COHORT / NUM_CLIENTS
    expected = {r: poisson_cohort(0, r, list(range(NUM_CLIENTS)), rate) for r in range(1, ROUNDS + 1)}
    for name in ("dp-a", "dp-b", "fedavg-poisson"):  # the non-DP reference opted into the same cohorts
        assert _cohorts(results, name) == expected, name
        assert [row["clients"] for row in results.strategies[name].rounds] == [len(c) for c in expected.values()]
    assert len({len(c) for c in expected.values()}) > 1  # sizes vary from round to round
    assert all(len(c) == COHORT for c in _cohorts(results, "fedavg").values())
    # The server's own sampler over many rounds: mean q·N and binomial variance N·q·(1−q).
    sampler = make_sampler(0, {p: 1000 + p for p in range(NUM_CLIENTS)}, COHORT, "poisson")
    sizes = np.array([len(sampler(r)) for r in range(1, 4001)])
    assert sizes.mean() == pytest.approx(rate * NUM_CLIENTS, abs=0.15)
    assert sizes.var() == pytest.approx(NUM_CLIENTS * rate * (1 - rate), rel=0.1)


def test_dp_strategies_never_share_noise(run: tuple[Any, Any]) -> None:
    """dp-a and dp-b differ only in name (noise_seed 0 both): same clients, different noise, different models."""
    results, _ = run
    losses = {name: [row["loss"] for row in results.strategies[name].rounds] for name in ("dp-a", "dp-b")}
    assert losses["dp-a"][0] != losses["dp-b"][0]


def test_run_privacy_composes_all_dp_strategies(run: tuple[Any, Any]) -> None:
    """results.json 'privacy': ε of both DP strategies together = one Poisson round with both Gaussians."""
    results, _ = run
    block = results.to_dict()["privacy"]
    own = {name: results.strategies[name].final()["epsilon"] for name in ("dp-a", "dp-b")}
    assert block["strategies"] == own
    # Two Gaussian sums of noise σ on the same cohort = one Gaussian of σ / √2 (1/σ² adds up).
    both = rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(COHORT / NUM_CLIENTS, dp_accounting.GaussianDpEvent(SIGMA / np.sqrt(2))),
        ROUNDS)).get_epsilon(DELTA)
    assert block["epsilon"] == pytest.approx(both, rel=1e-6)
    assert block["epsilon"] > max(own.values()) * 1.3
    assert block["delta"] == DELTA and block["neighbouring_relation"] == "add-or-remove one client"


def test_comparison_table_states_the_run_epsilon(run: tuple[Any, Any]) -> None:
    """The console table says that the DP strategies' ε add up, next to each strategy's own."""
    from rich.console import Console

    from fedpower.report import comparison_table

    results, _ = run
    console = Console(width=200, record=True)
    console.print(comparison_table(results))
    epsilon = results.to_dict()["privacy"]["epsilon"]
    assert f"ε of all 2 DP strategies together (they train on the same clients): {epsilon:.2f}" in console.export_text()


def test_start_up_discovery_is_on_every_ledger() -> None:
    """A grid that does not know the partitions costs one query and one reply per node: on the ledger, round 0.

    Measured here on the delivered messages (whole message, deployment ids); counted in the totals,
    separable as ``discover``, and outside every round's row (rows stay the training rounds).
    """
    from loopback_grid import AskingGrid

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # type: ignore[attr-defined]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        experiment = parse_config({
            "experiment": "discovery", "seed": 0,
            "data": {"dataset": "digits", "num_clients": 6, "partition": {"kind": "iid"}},
            "model": {"name": "logreg"},
            "train": {"device": "cpu", "rounds": 2, "clients_per_round": 2, "failures": {"rejoin_wait_s": 0}},
            "strategies": [{"name": "fedavg"}, {"name": "psgd", "compression": {"method": "powersgd", "rank": 2}}],
        }).to_dict()
        results, grid = run_in_process(experiment, AskingGrid)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved  # type: ignore[attr-defined]
    assert len(grid.queries) == 6  # asked once per node for the whole run, not once per strategy
    expected = sorted((grid.partition_of[query.metadata.dst_node_id], direction, _serialized_size(_as_deployed(m), set()))
                      for query, reply in grid.queries for direction, m in (("down", query), ("up", reply)))
    for name, result in results.strategies.items():
        discover = [t for t in result.ledger.transfers if t.purpose == "discover"]
        assert sorted((t.client, t.direction, t.wire_bytes) for t in discover) == expected, name
        assert {t.round for t in discover} == {0} and all(t.header_bytes > 0 for t in discover)
        final = result.final()
        for direction, word in (("up", "uplink"), ("down", "downlink")):
            alone = sum(w for _, d, w in expected if d == direction)
            assert final[f"{word}_discover_bytes_total"] == alone
            assert final[f"{word}_bytes_total"] == sum(r[f"{word}_bytes"] for r in result.rounds) + alone
            assert final[f"{word}_header_bytes_total"] == sum(t.header_bytes for t in result.ledger.select(direction))
