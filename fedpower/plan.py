"""The round protocol: what the server tells a client for one round, and what the client echoes back.

:class:`RoundPlan` is the only place where the message keys are spelled. The server turns a plan
into a flat record (``to_record``, which the Flower adapter wraps in a ``ConfigRecord``); the client
reads it back with ``from_record``, which checks every type, so a malformed or hostile record is a
clear error and never a silent default. Layouts (which tensors, which shapes) are derived on both
ends from the model and the settings, never sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

from fedpower.codecs.base import PayloadError

Side = Literal["left", "right"]
Scalar = int | float | str | bool

# Keys of the round record (server → client) and of the echo (client → server).
STRATEGY, ROUND, DENSE, SIDE, BASIS_ID, RANKS, NOISE = (
    "strategy", "server-round", "dense", "side", "basis-id", "ranks", "dp-noise-multiplier")


class PlanError(PayloadError):
    """A round record (or a reply's echo of it) that does not match the protocol."""


def _typed(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """``record[key]`` if it has type ``kind`` (bools are not numbers here); ``default`` when absent."""
    if key not in record:
        if default is None:
            raise PlanError(f"round record lacks {key!r}")
        return default
    value = record[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise PlanError(f"round record {key!r} is {value!r}, not a number")
    if not isinstance(value, kind):
        raise PlanError(f"round record {key!r} is {value!r} ({type(value).__name__})")
    return value


@dataclass(frozen=True)
class RoundPlan:
    """One round's instructions to the clients of one strategy."""

    strategy: str  # which strategy of the experiment this round belongs to
    round: int  # server round, 1-based, counted across resumes
    dense: bool = False  # warm-up round: dense fp32, no codec state used or changed
    side: Side = "left"  # shared PowerSGD: which factor the clients send this round
    basis_id: int = -1  # shared PowerSGD: version of the basis sent with the round (-1: none)
    ranks: Optional[dict[str, int]] = None  # byte budget: rank per matrix this round (None: the configured rank)
    noise_multiplier: Optional[float] = None  # DP: the server's σ (local DP clients never go below their own)

    def to_record(self) -> dict[str, Scalar]:
        """The plan as flat scalars (a Flower ``ConfigRecord`` holds exactly these)."""
        record: dict[str, Scalar] = {STRATEGY: self.strategy, ROUND: self.round, DENSE: self.dense,
                                     SIDE: self.side, BASIS_ID: self.basis_id}
        if self.ranks is not None:
            record[RANKS] = json.dumps(self.ranks, separators=(",", ":"), sort_keys=True)
        if self.noise_multiplier is not None:
            record[NOISE] = float(self.noise_multiplier)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "RoundPlan":
        """Read a plan back; PlanError names the key when the record is malformed."""
        side = _typed(record, SIDE, str, "left")
        if side not in ("left", "right"):
            raise PlanError(f"round record {SIDE!r} is {side!r}, not 'left' or 'right'")
        ranks = None
        if RANKS in record:
            try:
                ranks = json.loads(_typed(record, RANKS, str))
            except json.JSONDecodeError as err:
                raise PlanError(f"round record {RANKS!r} is not JSON: {err}") from None
            if not isinstance(ranks, dict) or not all(isinstance(k, str) and type(v) is int and v >= 1
                                                      for k, v in ranks.items()):
                raise PlanError(f"round record {RANKS!r} must map tensor names to ranks ≥ 1, got {ranks!r}")
        noise = record.get(NOISE)
        if noise is not None:
            noise = float(_typed(record, NOISE, (int, float)))
            if not noise >= 0:
                raise PlanError(f"round record {NOISE!r} must be ≥ 0, got {noise!r}")
        server_round = _typed(record, ROUND, int)
        if server_round < 0:
            raise PlanError(f"round record {ROUND!r} must be ≥ 0, got {server_round}")
        return cls(strategy=_typed(record, STRATEGY, str), round=server_round,
                   dense=_typed(record, DENSE, bool, False), side=side,
                   basis_id=_typed(record, BASIS_ID, int, -1), ranks=ranks, noise_multiplier=noise)

    def echo(self) -> dict[str, int]:
        """What a reply carries back so the server can refuse one computed for another round or basis."""
        return {ROUND: self.round, BASIS_ID: self.basis_id}

    def check_echo(self, metrics: Mapping[str, Any]) -> None:
        """PlanError unless ``metrics`` echo this plan's round and basis id (stale, replayed or misrouted replies)."""
        for key, expected in self.echo().items():
            value = metrics.get(key) if hasattr(metrics, "get") else None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != expected:
                raise PlanError(f"reply {key} is {value!r}, expected {expected}")
