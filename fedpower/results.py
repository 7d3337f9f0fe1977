"""Results of a comparison run in the results.json contract (DESIGN.md §5), built as rounds finish."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedpower.ledger import Ledger
from fedpower.network import network_summary


class RunObserver(Protocol):
    """Receives progress from the server as the run goes (the CLI's live display implements this)."""

    def strategy_started(self, name: str, rounds: int) -> None:
        """A strategy begins."""

    def round_finished(self, name: str, row: dict[str, Any]) -> None:
        """One round of a strategy finished (``row`` is a results.json round entry + extras)."""

    def strategy_finished(self, name: str, final: dict[str, Any]) -> None:
        """A strategy ended (normally or stopped)."""


@dataclass
class StrategyResult:
    """One strategy's rounds, ledger and summary."""

    name: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    wall_seconds: float = 0.0
    completed: bool = False
    initial_accuracy: float | None = None
    client_metrics: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # round → per-client metrics
    stop_reason: str | None = None  # why training ended early (e.g. the privacy budget), if it did

    def final(self) -> dict[str, Any]:
        """The ``final`` block of results.json, derived from the rounds and the ledger."""
        last = self.rounds[-1] if self.rounds else {}
        return {
            "accuracy": last.get("accuracy", float("nan")),
            "best_accuracy": best_accuracy(self.rounds),
            "uplink_bytes_total": self.ledger.total("up"),
            "downlink_bytes_total": self.ledger.total("down"),
            "uplink_payload_bytes_total": self.ledger.total("up", "payload_bytes"),
            "downlink_payload_bytes_total": self.ledger.total("down", "payload_bytes"),
            # Of the totals above, the message headers (Flower's Message metadata, fixed-width id model):
            "uplink_header_bytes_total": self.ledger.total("up", "header_bytes"),
            "downlink_header_bytes_total": self.ledger.total("down", "header_bytes"),
            # Of the totals above, federated evaluation's messages (model down, metrics up):
            "downlink_evaluate_bytes_total": self.ledger.total("down", purpose="evaluate"),
            "uplink_evaluate_bytes_total": self.ledger.total("up", purpose="evaluate"),
            # Of the totals above, start-up partition discovery (round 0; engines that must ask, e.g. Ray):
            "downlink_discover_bytes_total": self.ledger.total("down", purpose="discover"),
            "uplink_discover_bytes_total": self.ledger.total("up", purpose="discover"),
            "uplink_ratio_vs_dense": _finite_or_none(self.ledger.ratio_vs_dense("up")),
            "downlink_ratio_vs_dense": _finite_or_none(self.ledger.ratio_vs_dense("down")),
            "epsilon": last.get("epsilon"),
            "wall_seconds": self.wall_seconds,
            "rounds_completed": len(self.rounds),
            "rejected_payloads": sum(r.get("rejected", 0) for r in self.rounds),
            "client_failures": sum(r.get("failures", 0) for r in self.rounds),
            "dropouts": sum(r.get("dropouts", 0) for r in self.rounds),
            "late_replies": sum(r.get("late", 0) for r in self.rounds),
            "rounds_kept_old_model": sum(1 for r in self.rounds if r.get("kept_old_model")),
            "replies_discarded_after_commit": sum(r.get("discarded_after_commit", 0) for r in self.rounds),
            "stop_reason": self.stop_reason,
        }

    def to_dict(self) -> dict[str, Any]:
        """results.json entry for this strategy."""
        return {"name": self.name, "rounds": self.rounds, "final": self.final(), "completed": self.completed}


def best_accuracy(rounds: list[dict[str, Any]]) -> float:
    """Highest accuracy over the evaluated rounds (NaN when none was evaluated).

    Why the filter: with ``evaluate_every > 1`` the rounds in between carry NaN (or None once
    read back from a checkpoint), and ``max`` over a NaN gives NaN or a wrong answer by position.
    """
    evaluated = [float(r["accuracy"]) for r in rounds
                 if isinstance(r.get("accuracy"), (int, float)) and math.isfinite(r["accuracy"])]
    return max(evaluated, default=float("nan"))


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: undefined ratios become null."""
    return value if math.isfinite(value) else None


@dataclass
class RunResults:
    """All strategies of one run; an observer that records everything it is told."""

    experiment: str
    config: dict[str, Any]
    strategies: dict[str, StrategyResult] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: str | None = None  # where the server checkpoints every round (run.py: the output folder)
    resume_from: Any = None  # a fedpower.checkpoint.ResumePoint to continue from (run.py --resume)
    _network_cache: Any = field(default=None, repr=False, compare=False)  # (key, summary) of network()
    _privacy_cache: Any = field(default=None, repr=False, compare=False)  # (key, block) of privacy()

    def strategy(self, name: str) -> StrategyResult:
        """The (possibly new) result entry of a strategy."""
        return self.strategies.setdefault(name, StrategyResult(name))

    def network(self) -> dict[str, Any] | None:
        """Simulated communication times under the config's ``network`` links (None when it has none).

        Cached until a strategy gains rounds or transfers: results.json is rewritten after every round.
        """
        links = self.config.get("network")
        if not links:
            return None
        key = tuple((name, len(s.rounds), len(s.ledger.transfers)) for name, s in self.strategies.items())
        if self._network_cache is None or self._network_cache[0] != key:
            summary = network_summary({name: (s.ledger, s.rounds) for name, s in self.strategies.items()}, links,
                                      int(self.config["data"]["num_clients"]), int(self.config.get("seed", 0)))
            self._network_cache = (key, summary)
        return self._network_cache[1]

    def privacy(self) -> dict[str, Any] | None:
        """ε of all DP strategies of the run together (None without DP); cached until a strategy gains rounds."""
        if not any(entry.get("privacy") for entry in self.config.get("strategies", [])):
            return None
        key = tuple((name, len(s.rounds)) for name, s in self.strategies.items())
        if self._privacy_cache is None or self._privacy_cache[0] != key:
            from fedpower.privacy.composition import run_privacy  # dp-accounting: only runs with DP need it

            block = run_privacy(self.config, {name: len(s.rounds) for name, s in self.strategies.items()},
                                {name: s.final()["epsilon"] for name, s in self.strategies.items()})
            self._privacy_cache = (key, block)
        return self._privacy_cache[1]

    def to_dict(self) -> dict[str, Any]:
        """The results.json document (plus ``network`` when the config simulates links, ``privacy`` with DP)."""
        document = {"experiment": self.experiment, "config": self.config,
                    "strategies": [s.to_dict() for s in self.strategies.values()], "environment": self.environment}
        network = self.network()
        if network is not None:
            document["network"] = network
        privacy = self.privacy()
        if privacy is not None:
            document["privacy"] = privacy
        return document
