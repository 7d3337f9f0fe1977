"""Measured message sizes: what Flower actually serializes for a message's content."""

from __future__ import annotations

from flwr.app import ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def wire_bytes(content: RecordDict) -> int:
    """Serialized size of a message content: Σ len(deflate()) over its nested objects (no estimate)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def array_bytes(record: ArrayRecord) -> int:
    """Raw bytes of the arrays in a record (the payload, without protocol overhead)."""
    return sum(len(arr.data) for arr in record.values())
