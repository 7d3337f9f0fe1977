"""Rank per matrix under a byte budget: allocation math, real payload sizes, changing ranks, the round trip."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpower.codecs import ArraySpec, build_codec, layout_of, pack
from fedpower.codecs.budget import NPY_HEADER_BYTES, allocate_ranks, message_bytes, minimum_budget, spectra
from fedpower.codecs.powersgd import PowerSGD

MLP = {"fc1.weight": ArraySpec((512, 40)), "fc1.bias": ArraySpec((512,)), "fc2.weight": ArraySpec((512, 512)),
       "fc2.bias": ArraySpec((512,)), "out.weight": ArraySpec((10, 512)), "out.bias": ArraySpec((10,))}


@settings(max_examples=60, deadline=None)
@given(budget=st.floats(2_000, 200_000), bits=st.sampled_from([None, 8, 4, 2]),
       decay=st.lists(st.floats(0.05, 0.99), min_size=3, max_size=3))
def test_allocation_fits_the_budget_and_respects_limits(budget: float, bits: int | None, decay: list[float]) -> None:
    """Whatever the spectra: payload ≤ budget, every matrix rank ≥ 1 and ≤ its useful maximum."""
    floor = minimum_budget(MLP, bits=bits)
    if budget < floor:
        with pytest.raises(ValueError, match="below the smallest message"):
            allocate_ranks(MLP, budget, bits=bits)
        return
    names = ["fc1.weight", "fc2.weight", "out.weight"]
    energy = {n: [d ** k for k in range(40)] for n, d in zip(names, decay)}
    for spectrum in (None, energy):
        ranks = allocate_ranks(MLP, budget, bits=bits, energy=spectrum)
        assert set(ranks) == set(names)
        assert message_bytes(MLP, ranks, bits=bits) <= budget
        assert ranks["out.weight"] <= 4 and ranks["fc1.weight"] <= 18 and min(ranks.values()) >= 1


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 300), m=st.integers(1, 300), rate=st.floats(1.0, 4.0))
def test_useful_maximum_matches_the_codec_rule(n: int, m: int, rate: float) -> None:
    """The allocator's highest useful rank is exactly where the codec stops compressing (no float edge)."""
    from fedpower.codecs.lowrank import compressible, max_rank

    top = max_rank(n, m, rate)
    spec = {"x": ArraySpec((n, m))}
    if top >= 1:
        assert compressible(spec, top, rate) == {"x": (n, m, top)}
    if top < min(n, m):
        assert compressible(spec, top + 1, rate) == {}
    assert max_rank(7, 63, 2.1) == 2  # 2.1 · 3 · 70 is a hair above 441 in floating point


def test_energy_decides_where_rank_goes() -> None:
    """A matrix whose spectrum is flat gets more rank than one whose energy sits in one direction."""
    energy = {"fc1.weight": [1.0] + [1e-6] * 39, "fc2.weight": [1.0] * 100, "out.weight": [1.0] + [1e-6] * 9}
    ranks = allocate_ranks(MLP, 40_000, bits=8, energy=energy)
    assert ranks["fc2.weight"] > 10 and ranks["fc1.weight"] == 1 and ranks["out.weight"] == 1
    uniform = allocate_ranks(MLP, 15_000, bits=8)
    assert abs(uniform["fc1.weight"] - uniform["fc2.weight"]) <= 1  # no spectra: one rank for all (below caps)
    assert uniform["out.weight"] == 4  # ... except where a matrix's useful maximum caps it


def test_greedy_matches_brute_force_on_small_cases() -> None:
    """For decreasing spectra the greedy allocation captures as much energy as the best of all allocations."""
    inputs = {"a": ArraySpec((24, 8)), "b": ArraySpec((16, 16))}
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        energy = {k: sorted(torch.rand(8, generator=gen).tolist(), reverse=True) for k in inputs}
        budget = float(torch.randint(384, 1300, (1,), generator=gen))
        ranks = allocate_ranks(inputs, budget, bits=None, energy=energy)
        captured = sum(sum(energy[k][: ranks[k]]) for k in inputs)
        best = 0.0
        for ra in range(1, 4):  # a: 24·8 / (2·32) → at most rank 3 saves 2×
            for rb in range(1, 5):
                if message_bytes(inputs, {"a": ra, "b": rb}, bits=None) <= budget:
                    best = max(best, sum(energy["a"][:ra]) + sum(energy["b"][:rb]))
        assert captured == pytest.approx(best)


@pytest.mark.parametrize("bits", [None, 8, 4, 2])
def test_measured_payload_is_within_budget(bits: int | None) -> None:
    """The packed payload the ledger counts (codes, scales, .npy headers) matches the byte model and the budget."""
    gen = torch.Generator().manual_seed(1)
    update = {k: torch.randn(s.shape, generator=gen) for k, s in MLP.items()}
    budget = 6_000.0 if bits else 40_000.0
    ranks = allocate_ranks(MLP, budget, bits=bits, energy=spectra(update, ["fc1.weight", "fc2.weight", "out.weight"]))
    codec = build_codec({"method": "powersgd", "rank": 4, "quantize_bits": bits, "error_feedback": True}, ranks=ranks)
    encoded, _ = codec.encode(update, codec.init_state(MLP), gen)
    packed = pack(encoded, codec.layout(MLP))
    payload = sum(buf.nbytes + NPY_HEADER_BYTES for buf in packed.values())
    assert payload == message_bytes(MLP, ranks, bits=bits) <= budget
    assert payload > 0.9 * budget  # and the budget is actually used


def test_warm_start_survives_a_rank_change() -> None:
    """Re-allocated ranks keep the residual and the kept warm-start columns; new columns start seeded."""
    gen = torch.Generator().manual_seed(2)
    update = {k: torch.randn(s.shape, generator=gen) for k, s in MLP.items()}
    first = build_codec({"method": "powersgd", "power_iterations": 2, "quantize_bits": None, "entropy_coding": "none"}, ranks={"fc2.weight": 6, "fc1.weight": 2,
                                                                            "out.weight": 1})
    _, state = first.encode(update, first.init_state(MLP), gen)
    second = build_codec({"method": "powersgd", "power_iterations": 2, "quantize_bits": None, "entropy_coding": "none"}, ranks={"fc2.weight": 3, "fc1.weight": 5,
                                                                             "out.weight": 1})
    encoded, new_state = second.encode(update, state, gen)
    assert encoded["fc2.weight.P"].shape == (512, 3) and encoded["fc1.weight.Q"].shape == (40, 5)
    assert new_state["inner/fc2.weight.Q"].shape == (512, 3)
    assert {k for k in new_state if k.startswith("residual/")} == {k for k in state if k.startswith("residual/")}
    kept = torch.linalg.matrix_rank(torch.cat([state["inner/fc2.weight.Q"][:, :3], new_state["inner/fc2.weight.Q"]], 1))
    assert int(kept) <= 6  # the new Q grew from the first 3 columns of the old one, not from a cold start
    with pytest.raises(ValueError, match="rows"):
        second.encode(update, {**state, "inner/fc2.weight.Q": torch.zeros(7, 3)}, gen)


def test_budget_config_is_checked(tmp_path: Any) -> None:
    """budget_bytes_per_round only with independent PowerSGD."""
    from fedpower.config import ConfigError, load_config

    path = tmp_path / "x.yaml"
    path.write_text("strategies: [{name: s, compression: {method: powersgd, mode: shared, budget_bytes_per_round: 9000}}]\n")
    with pytest.raises(ConfigError, match="budget_bytes_per_round"):
        load_config(path)


def test_server_and_client_agree_on_ranks_each_round() -> None:
    """The strategy sends its ranks; a client building its codec from them produces a payload the server decodes."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from conftest import strategy_settings
    from strategies.compressed import CompressedFedAvg

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    gen = torch.Generator().manual_seed(3)
    params = {k: torch.zeros(s.shape) for k, s in MLP.items()}
    compression = {"method": "powersgd", "mode": "independent", "rank": 4, "power_iterations": 2, "quantize_bits": 8,
                   "error_feedback": True, "budget_bytes_per_round": 12_000.0, "entropy_coding": "none"}
    nodes = {10: 0, 11: 1}
    strategy = CompressedFedAvg(strategy_settings(compression, name="b"), params, lambda r: [10, 11],
                                node_partitions=nodes)
    history = []
    for rnd in (1, 2, 3):
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in strategy.params.items()})
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), None))  # type: ignore[arg-type]
        ranks = json.loads(str(messages[0].content["config"]["ranks"]))
        history.append(ranks)
        codec = build_codec(compression, ranks=ranks)
        replies = []
        for msg in messages:
            # Structured updates: fc2 holds most energy spread over many directions, so it should gain rank.
            update = {k: 0.01 * torch.randn(s.shape, generator=gen) for k, s in MLP.items()}
            update["fc2.weight"] = torch.randn(512, 32, generator=gen) @ torch.randn(32, 512, generator=gen)
            encoded, _ = codec.encode(update, codec.init_state(MLP), gen)
            packed = pack(encoded, codec.layout(layout_of(update)))
            metrics = {"num-examples": 10, "train_loss": 1.0, "partition-id": nodes[msg.metadata.dst_node_id],
                       "server-round": rnd, "basis-id": -1}
            replies.append(Message(RecordDict({"payload": ArrayRecord({k: Array(v) for k, v in packed.items()}),
                                               "metrics": MetricRecord(metrics)}), reply_to=msg))
        arrays_out, _ = strategy.aggregate_train(rnd, replies)
        assert arrays_out is not None
    assert abs(history[0]["fc1.weight"] - history[0]["fc2.weight"]) <= 1  # round 1: uniform
    assert history[1]["fc2.weight"] > history[0]["fc2.weight"] + 2  # then rank follows the energy
    assert history[1]["fc1.weight"] < history[0]["fc1.weight"]
    arrays_state, meta = strategy.state_dict()
    assert meta["ranks"] == strategy.codec_state.ranks and set(meta["energy"]) == set(strategy.codec_state.ranks)


def test_budget_reduction_sizes_the_budget_from_the_model(tmp_path: Any) -> None:
    """budget_reduction R gives the same ranks as budget_bytes_per_round = dense fp32 bytes / R; both at once is refused."""
    from fedpower.codecs.budget import budget_bytes, ranks_for
    from fedpower.config import CompressionConfig, ConfigError, load_config

    dense = 4 * sum(spec.numel for spec in MLP.values())
    by_ratio = CompressionConfig(method="powersgd", quantize_bits=4, budget_reduction=100)
    by_bytes = CompressionConfig(method="powersgd", quantize_bits=4, budget_bytes_per_round=dense / 100)
    assert by_ratio.uses_budget and not CompressionConfig(method="powersgd").uses_budget
    assert budget_bytes(by_ratio, MLP) == pytest.approx(dense / 100)
    assert ranks_for(by_ratio, MLP) == ranks_for(by_bytes, MLP)
    assert message_bytes(MLP, ranks_for(by_ratio, MLP), bits=4) <= dense / 100
    assert sum(ranks_for(CompressionConfig(method="powersgd", quantize_bits=4, budget_reduction=50), MLP).values()) \
        > sum(ranks_for(by_ratio, MLP).values())
    for extra in ("budget_bytes_per_round: 9000, budget_reduction: 100", "mode: shared, budget_reduction: 100"):
        path = tmp_path / "x.yaml"
        path.write_text(f"strategies: [{{name: s, compression: {{method: powersgd, {extra}}}}}]\n")
        with pytest.raises(ConfigError, match="budget_reduction"):
            load_config(path)
