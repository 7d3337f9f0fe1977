"""Measured message sizes: what Flower actually serializes for a message's content and for its header."""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

#: The widest uint64 varint (10 bytes). A deployment's run, node and task ids are random 8-byte
#: numbers (Flower's RUN_ID_NUM_BYTES / NODE_ID_NUM_BYTES / TASK_ID_NUM_BYTES), so no real id costs more.
WIDEST_ID = (1 << 64) - 1
#: A deployment's message ids are SHA-256 object ids (64 hex characters); Ray's engine uses 36-character
#: UUIDs, the in-process grid too. A reply names its instruction's id, so it is counted at the longer width.
WIDEST_MESSAGE_ID = "f" * 64


def wire_bytes(content: RecordDict) -> int:
    """Serialized size of a message content: Σ len(deflate()) over its nested objects (no estimate)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def array_bytes(record: ArrayRecord) -> int:
    """Raw bytes of the arrays in a record (the payload, without protocol overhead)."""
    return sum(len(arr.data) for arr in record.values())


def header_metadata(metadata: Metadata) -> Metadata:
    """``metadata`` with every id at the width a deployment can give it (the fixed-width id model).

    Why: protobuf varints make the header's length depend on the id values, and the engines draw
    different ids (in-process 2^40 + p, Ray random 64-bit, a SuperLink random run and task ids too), so
    measuring the real ids would make the same run cost different bytes per engine and per seed. Every
    random id (run, client node, tasks) is counted at the widest varint and a reply's instruction id at
    SHA-256 width: never below what a deployment sends, at most a few bytes per id above it. The
    SuperLink's own node id is Flower's constant ``SUPERLINK_NODE_ID`` in every engine. Everything else
    (message type, group id, TTL, creation time) is the message's own.
    """
    reply = bool(metadata.reply_to_message_id)
    return Metadata(run_id=WIDEST_ID, message_id="",
                    src_node_id=WIDEST_ID if reply else SUPERLINK_NODE_ID,
                    dst_node_id=SUPERLINK_NODE_ID if reply else WIDEST_ID,
                    reply_to_message_id=WIDEST_MESSAGE_ID if reply else "",
                    group_id=metadata.group_id, created_at=metadata.created_at, ttl=metadata.ttl,
                    message_type=metadata.message_type, src_task_id=WIDEST_ID, dst_task_id=WIDEST_ID)


def header_bytes(message: Message) -> int:
    """Serialized size of a message's header: Flower's ``Message`` object itself (metadata, content id, error).

    Measured with Flower's own ``Message.deflate()`` (the root of the object tree the transport ships,
    next to the content objects that :func:`wire_bytes` counts) on the fixed-width id model of
    :func:`header_metadata`. The content only appears as its 64-character object id, so an empty
    record stands in for it (hashing a large model again per message would cost time, not bytes).
    """
    metadata = header_metadata(message.metadata)
    if message.has_error():
        return len(Message(metadata=metadata, error=message.error).deflate())
    return len(Message(metadata=metadata, content=RecordDict()).deflate())
