"""Simulated network links: per-round communication time from the ledger, time to target, config, report."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpower.config import ConfigError, load_config
from fedpower.ledger import Ledger, Transfer
from fedpower.network import PROFILES, Link, assign_links, round_seconds, time_to_target
from fedpower.report import comparison_table, metric_rows, write_plots
from fedpower.results import RunResults


def test_link_time_is_bits_over_rate_plus_latency_both_ways() -> None:
    """1 MB up at 2 Mbit/s = 4 s; 1 MB down at 8 Mbit/s = 1 s; 2 × 50 ms; plus compute."""
    link = Link(uplink_mbps=2.0, downlink_mbps=8.0, latency_ms=50.0)
    assert link.seconds(1_000_000, 1_000_000, compute_s=0.5) == pytest.approx(4 + 1 + 0.1 + 0.5)
    assert PROFILES["4g"].uplink_mbps < PROFILES["4g"].downlink_mbps  # cellular uplinks are the bottleneck


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), a=st.floats(0.01, 0.98), seed=st.integers(0, 2**31))
def test_mix_gives_exact_counts_and_is_seeded(n: int, a: float, seed: int) -> None:
    """A mix gets round(fraction × N) clients per profile (largest remainder), the same for the same seed."""
    network = {"mix": {"4g": a, "nb-iot": 1 - a}}
    links = assign_links(n, network, seed)
    slow = sum(link == PROFILES["nb-iot"] for link in links)
    assert len(links) == n and abs(slow - (1 - a) * n) <= 1
    assert links == assign_links(n, network, seed)


def test_mix_positions_depend_on_the_seed() -> None:
    """Which clients get the slow link is a seeded draw, not 'the last ones'."""
    network = {"mix": {"4g": 0.5, "3g": 0.5}}
    assert assign_links(40, network, 0) != assign_links(40, network, 1)


def _ledger() -> Ledger:
    """Round 1: clients 0 and 1; round 2: client 1 dropped (downlink only)."""
    ledger = Ledger()
    for rnd, client, direction, wire in [(1, 0, "down", 1_000_000), (1, 0, "up", 10_000), (1, 1, "down", 1_000_000),
                                         (1, 1, "up", 500_000), (2, 1, "down", 1_000_000)]:
        ledger.record(Transfer(rnd, client, direction, wire, wire, wire))
    return ledger


def test_round_time_is_the_slowest_client() -> None:
    """A synchronous round lasts as long as its slowest client's down + compute + up."""
    links = [Link(1.0, 10.0, 100.0), Link(4.0, 10.0, 0.0)]
    times = round_seconds(_ledger(), links, compute_s=2.0)
    client0 = 0.8 + 0.08 + 0.2 + 2.0  # down 8 Mbit / 10, up 0.08 Mbit / 1, 2 × 100 ms, compute
    client1 = 0.8 + 1.0 + 2.0  # down 8 Mbit / 10, up 4 Mbit / 4
    assert times == {1: pytest.approx(max(client0, client1)), 2: pytest.approx(0.8 + 2.0)}


def test_unknown_senders_are_timed_one_transfer_at_a_time() -> None:
    """Transfers of unknown partitions (-1) are not summed onto one client; unknown names raise ValueError."""
    from fedpower.network import resolve_link

    ledger = Ledger()
    for _ in range(3):
        ledger.record(Transfer(1, -1, "up", 1_000_000, 1_000_000, 1_000_000))
    assert round_seconds(ledger, [Link(1.0, 1.0)]) == {1: pytest.approx(8.0)}  # 3 in parallel, not 24 s
    with pytest.raises(ValueError, match="unknown network profile '5G'"):
        resolve_link("5G")


def test_time_to_target_counts_rounds_until_first_reached() -> None:
    """Cumulative seconds and uplink bytes up to the first round at or above the target; None if never."""
    rows = [{"round": 1, "accuracy": 0.3, "uplink_bytes": 10}, {"round": 2, "accuracy": float("nan"), "uplink_bytes": 10},
            {"round": 3, "accuracy": 0.6, "uplink_bytes": 10}]
    times = {1: 1.0, 2: 2.0, 3: 4.0}
    assert time_to_target(rows, times, 0.5) == {"round": 3, "seconds": 7.0, "uplink_bytes": 30}
    assert time_to_target(rows, times, 0.9)["seconds"] is None


def _write(tmp_path: Path, network: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(f"strategies: [{{name: fedavg}}]\nnetwork: {network}\n")
    return path


@pytest.mark.parametrize("network, needle", [
    ("{profile: 4gg}", "unknown network profile '4gg'; did you mean '4g'"),
    ("{mix: {4g: 0.5, 3g: 0.3}}", "fractions sum to 0.8, not 1"),
    ("{profile: 4g, mix: {4g: 1.0}}", "either network.profile or network.mix"),
    ("{compute_s: 1}", "give network.profile"),
    ("{profile: sat, profiles: {sat: {uplink_mbps: 0, downlink_mbps: 1}}}", "uplink_mbps"),
])
def test_network_config_errors_name_the_field(tmp_path: Path, network: str, needle: str) -> None:
    """Bad network blocks give one-line errors naming the key (no traceback)."""
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, network))
    assert needle in str(err.value) and "network." in str(err.value)


def test_own_profile_names_are_accepted(tmp_path: Path) -> None:
    """A link defined under network.profiles can be used by name, also in a mix."""
    config = load_config(_write(tmp_path, "{mix: {sat: 0.5, 4g: 0.5}, profiles: {sat: {uplink_mbps: 0.1, "
                                          "downlink_mbps: 1, latency_ms: 600}}}"))
    links = assign_links(4, config.model_dump()["network"], 0)
    assert Link(0.1, 1.0, 600.0) in links


def _results(network: dict | None) -> RunResults:
    """Two strategies over two clients: 'dense' sends 100× the bytes of 'small', both reach 0.5 in round 2."""
    config = {"seed": 0, "data": {"num_clients": 2}, "network": network}
    results = RunResults(experiment="t", config=config)
    for name, up in (("dense", 1_000_000), ("small", 10_000)):
        strategy = results.strategy(name)
        for rnd, acc in ((1, 0.3), (2, 0.5), (3, 0.55 if name == "dense" else 0.5)):
            for client in (0, 1):
                strategy.ledger.record(Transfer(rnd, client, "up", up, up, 1_000_000))
                strategy.ledger.record(Transfer(rnd, client, "down", 1_000_000, 1_000_000, 1_000_000))
            strategy.rounds.append({"round": rnd, "accuracy": acc, "loss": 1.0, "uplink_bytes": 2 * up,
                                    "downlink_bytes": 2_000_000})
    return results


def test_results_report_time_to_target_and_plot(tmp_path: Path) -> None:
    """results.json gains a network block; the default target is the best accuracy every strategy reached."""
    results = _results({"profile": "3g"})
    document = results.to_dict()
    network = document["network"]
    assert network["target_accuracy"] == 0.5
    dense, small = (network["strategies"][n] for n in ("dense", "small"))
    assert dense["to_target"]["round"] == small["to_target"]["round"] == 2
    link = PROFILES["3g"]
    per_round = link.seconds(1_000_000, 1_000_000)
    assert dense["to_target"]["seconds"] == pytest.approx(2 * per_round)
    assert small["to_target"]["seconds"] == pytest.approx(2 * link.seconds(10_000, 1_000_000))
    rows = [r for r in metric_rows(results) if r["strategy"] == "dense"]
    assert rows[-1]["cumulative_sim_seconds"] == pytest.approx(3 * per_round)
    table = comparison_table(results)
    assert [c.header for c in table.columns][-2:] == ["link time", "time to 50.00 %"]
    assert (tmp_path / "accuracy_vs_time.png") in write_plots(results, tmp_path)


def test_no_network_block_no_network_output(tmp_path: Path) -> None:
    """Without network the report is as before: no block, no columns, no extra plot."""
    results = _results(None)
    assert "network" not in results.to_dict()
    assert "link time" not in [c.header for c in comparison_table(results).columns]
    assert not any(p.name == "accuracy_vs_time.png" for p in write_plots(results, tmp_path))
