"""Bandwidth ledger: bytes per round, per client and per direction, and their dense-fp32 equivalent.

Every entry is measured by the caller (payload ``nbytes`` and the serialized size of what the
transport actually sends); totals and ratios are always derived from the entries, never kept twice.
``wire_bytes`` is the whole message: its content plus its header (``header_bytes``, Flower's message
metadata); ``content_bytes`` (wire − header) is what a codec comparison without the envelope uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal

Direction = Literal["up", "down"]
#: train: a training round's messages; evaluate: federated evaluation's; discover: start-up messages
#: (an engine that does not know which partition a node holds asks every node once, round 0).
Purpose = Literal["train", "evaluate", "discover"]


@dataclass(frozen=True)
class Transfer:
    """One message's bytes in one direction."""

    round: int  # server round (1-based)
    client: int  # partition id of the client
    direction: Direction  # "up" (client → server) or "down" (server → client)
    payload_bytes: int  # Σ nbytes of the arrays carrying model/update content
    wire_bytes: int  # serialized size of the whole message: content objects + header (protocol overhead included)
    dense_bytes: int  # what the same content costs as dense fp32 arrays
    purpose: Purpose = "train"  # a training round's message, federated evaluation's, or start-up discovery's
    header_bytes: int = 0  # of wire_bytes, the message header (Flower's serialized Message metadata)

    @property
    def content_bytes(self) -> int:
        """Serialized size of the content alone (wire bytes without the message header)."""
        return self.wire_bytes - self.header_bytes


@dataclass
class Ledger:
    """All transfers of one strategy's run."""

    transfers: list[Transfer] = field(default_factory=list)

    def record(self, transfer: Transfer) -> None:
        """Add one measured transfer."""
        for name in ("payload_bytes", "wire_bytes", "dense_bytes", "header_bytes"):
            if getattr(transfer, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(transfer, name)}")
        if transfer.header_bytes > transfer.wire_bytes:
            raise ValueError(f"header_bytes ({transfer.header_bytes}) is part of wire_bytes ({transfer.wire_bytes})")
        self.transfers.append(transfer)

    def select(self, direction: Direction | None = None, round: int | None = None,
               purpose: Purpose | None = None) -> Iterable[Transfer]:
        """Transfers filtered by direction, round and/or purpose (None: all)."""
        for t in self.transfers:
            if (direction is None or t.direction == direction) and (round is None or t.round == round) \
                    and (purpose is None or t.purpose == purpose):
                yield t

    def total(self, direction: Direction, kind: str = "wire_bytes", round: int | None = None,
              purpose: Purpose | None = None) -> int:
        """Sum of ``kind`` (wire_bytes, content_bytes, header_bytes, payload_bytes, dense_bytes) over the selection."""
        return sum(getattr(t, kind) for t in self.select(direction, round, purpose))

    def ratio_vs_dense(self, direction: Direction, round: int | None = None) -> float:
        """Dense-fp32 bytes divided by the wire bytes actually sent (≥ 1 means a saving)."""
        sent = self.total(direction, "wire_bytes", round)
        return self.total(direction, "dense_bytes", round) / sent if sent else float("nan")

    def rounds(self) -> list[int]:
        """Rounds that have at least one transfer, in order."""
        return sorted({t.round for t in self.transfers})

    def to_rows(self) -> list[dict]:
        """Plain dict rows (for CSV/JSON)."""
        return [asdict(t) for t in self.transfers]

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> "Ledger":
        """Rebuild a ledger from ``to_rows`` output."""
        return cls([Transfer(**row) for row in rows])
