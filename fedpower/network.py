"""Simulated network links: how long a round's transfers would take on slow links (pure accounting).

Each client gets a link (uplink and downlink bandwidth, one-way latency) from a named profile, a
user-defined one, or a seeded mix of profiles. A client's time in a round is

    latency + downlink wire bytes / downlink rate + compute_s + latency + uplink wire bytes / uplink rate

from the ledger's real serialized bytes, and a synchronous round lasts as long as its slowest client.
Nothing sleeps: the times are computed after (or during) a run from what was actually sent. The
built-in profiles are typical sustained rates, not peak rates; put measured numbers of your own
links under ``network.profiles`` in the YAML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from fedpower.config import NetworkConfig

from fedpower.ledger import Ledger


@dataclass(frozen=True)
class Link:
    """One client's link: rates in megabits per second (10⁶ bit/s), one-way latency in milliseconds."""

    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float = 0.0

    def seconds(self, up_bytes: int, down_bytes: int, compute_s: float = 0.0) -> float:
        """Time for one round trip: model down, local compute, update up (latency paid each way)."""
        transfer = 8 * up_bytes / (self.uplink_mbps * 1e6) + 8 * down_bytes / (self.downlink_mbps * 1e6)
        return transfer + 2 * self.latency_ms / 1000 + compute_s


# Typical sustained rates (not advertised peaks). Cellular uplinks are several times slower than their
# downlinks, which is why compressing the uplink matters most at the edge.
PROFILES: dict[str, Link] = {
    "ethernet": Link(uplink_mbps=100.0, downlink_mbps=100.0, latency_ms=1.0),
    "wifi": Link(uplink_mbps=20.0, downlink_mbps=50.0, latency_ms=10.0),
    "5g": Link(uplink_mbps=30.0, downlink_mbps=150.0, latency_ms=20.0),
    "4g": Link(uplink_mbps=5.0, downlink_mbps=20.0, latency_ms=50.0),
    "3g": Link(uplink_mbps=0.4, downlink_mbps=1.5, latency_ms=150.0),
    "lte-m": Link(uplink_mbps=0.3, downlink_mbps=0.3, latency_ms=100.0),
    "nb-iot": Link(uplink_mbps=0.02, downlink_mbps=0.02, latency_ms=1000.0),
}


def resolve_link(name: str, custom: Mapping[str, Mapping[str, Any]] | None = None) -> Link:
    """The link called ``name``: one of ``custom`` (Link fields) first, else a built-in profile."""
    if custom and name in custom:
        return Link(**{k: float(v) for k, v in custom[name].items()})
    if name in PROFILES:
        return PROFILES[name]
    known = sorted({*PROFILES, *(custom or {})})
    raise ValueError(f"unknown network profile {name!r}; known: {', '.join(known)}")


def _typed(network: "NetworkConfig | Mapping[str, Any]") -> "NetworkConfig":
    """The ``network`` block through the schema (results.json holds it as plain data)."""
    from fedpower.config import NetworkConfig, as_section

    return as_section(NetworkConfig, network)


def assign_links(num_clients: int, network: "NetworkConfig | Mapping[str, Any]", seed: int) -> list[Link]:
    """Partition id → Link: one profile for all, or a ``mix`` (name → fraction) spread over clients by seed.

    A mix gets exact counts (largest remainder) and a seeded shuffle, so "30 % on nb-iot" means 30 %
    of the clients, whichever the seed, and the same clients for every strategy of a run.
    """
    network = _typed(network)
    custom = {name: link.model_dump() for name, link in network.profiles.items()}
    mix = network.mix
    if not mix:
        assert network.profile is not None  # the schema requires profile or mix
        return [resolve_link(network.profile, custom)] * num_clients
    names = list(mix)
    shares = np.array([float(mix[n]) for n in names]) * num_clients
    counts = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[i] += 1
    links = [resolve_link(name, custom) for name, count in zip(names, counts) for _ in range(count)]
    order = np.random.default_rng([seed, 0x6E6574]).permutation(num_clients)
    return [links[i] for i in order]


def round_seconds(ledger: Ledger, links: Sequence[Link], compute_s: float = 0.0) -> dict[int, float]:
    """Round → simulated seconds: the slowest client's down + compute + up time on its link."""
    per_client: dict[tuple[int, int], list[int]] = {}
    for index, t in enumerate(ledger.transfers):
        # Unknown senders (-1) are not one client: time each such transfer on its own.
        key = (t.round, t.client) if t.client >= 0 else (t.round, -1 - index)
        both = per_client.setdefault(key, [0, 0])
        both[0 if t.direction == "up" else 1] += t.wire_bytes
    times: dict[int, float] = {}
    for (rnd, client), (up, down) in per_client.items():
        # A reply from an unknown partition (-1) is charged to the slowest link: never understate the time.
        link = links[client] if 0 <= client < len(links) else min(links, key=lambda k: k.uplink_mbps)
        times[rnd] = max(times.get(rnd, 0.0), link.seconds(up, down, compute_s))
    return dict(sorted(times.items()))


def time_to_target(rounds: Iterable[Mapping[str, Any]], seconds: Mapping[int, float],
                   target: float) -> dict[str, Any]:
    """First round whose accuracy reaches ``target``: its round, cumulative simulated seconds and uplink bytes."""
    elapsed, uplink = 0.0, 0
    for row in rounds:
        elapsed += seconds.get(int(row["round"]), 0.0)
        uplink += int(row.get("uplink_bytes", 0))
        accuracy = row.get("accuracy")
        if accuracy is not None and math.isfinite(accuracy) and accuracy >= target:
            return {"round": int(row["round"]), "seconds": elapsed, "uplink_bytes": uplink}
    return {"round": None, "seconds": None, "uplink_bytes": None}


def common_target(best_accuracies: Iterable[float]) -> float:
    """The default target: the highest accuracy that every strategy reached (min of their bests)."""
    finite = [a for a in best_accuracies if a is not None and math.isfinite(a)]
    return min(finite) if finite else float("nan")


def network_summary(strategies: Mapping[str, tuple[Ledger, list[dict[str, Any]]]],
                    network: "NetworkConfig | Mapping[str, Any]", num_clients: int, seed: int) -> dict[str, Any]:
    """Per strategy: simulated seconds per round, in total, and to the target accuracy (results.json ``network``)."""
    network = _typed(network)
    links = assign_links(num_clients, network, seed)
    compute_s = network.compute_s
    target = network.target_accuracy
    if target is None:
        target = common_target(max((r["accuracy"] for r in rows if r.get("accuracy") is not None
                                    and math.isfinite(r["accuracy"])), default=float("nan"))
                               for _, rows in strategies.values())
    out: dict[str, Any] = {"target_accuracy": target if math.isfinite(target) else None, "strategies": {}}
    for name, (ledger, rows) in strategies.items():
        per_round = round_seconds(ledger, links, compute_s)
        reached = (time_to_target(rows, per_round, target) if math.isfinite(target)
                   else {"round": None, "seconds": None, "uplink_bytes": None})
        out["strategies"][name] = {"round_seconds": {str(r): s for r, s in per_round.items()},
                                   "total_seconds": sum(per_round.values()), "to_target": reached}
    return out
