"""The in-process engine: Flower's ``Grid`` implemented in one process, without Ray.

The ServerApp, its strategies and the ClientApp are Flower's own objects, called as Flower calls
them: every message is a real ``Message`` (the receiver gets its own copy of the records; array
payloads are immutable bytes and are shared), the ledger measures each message with Flower's own
serialization, and every node keeps one ``Context`` whose ``state`` persists across its messages. What Ray adds — actor
processes, a message queue polled every 0.1 s, one discovery query per node — is not needed when the
clients run one after another in the driver, which is what a 2-core machine does anyway.

The grid knows each node's partition (:meth:`InProcessGrid.node_partitions`), so the server asks no
partition-discovery question at start-up.
"""

from __future__ import annotations

import copy
import logging
import traceback
from typing import Any, Callable, Iterable, Mapping
from uuid import uuid4

from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

log = logging.getLogger("fedpower.inprocess")

#: Node ids are Flower-sized (64-bit) but deterministic, so runs and logs are reproducible.
NODE_ID_BASE = 1 << 40


def _copy_record(record: Any) -> Any:
    """A fresh record holding the same values; array payloads are immutable ``bytes`` and are shared."""
    if isinstance(record, ArrayRecord):
        return ArrayRecord({name: Array(dtype=arr.dtype, shape=tuple(arr.shape), stype=arr.stype, data=bytes(arr.data))
                            for name, arr in record.items()})
    return type(record)(dict(record))


def transport(message: Message) -> Message:
    """``message`` as the receiver gets it: a new Message whose records share nothing mutable with the sender's.

    Why: a client that changed the records it received (or the server, the reply) must not change
    what the other side holds, as over a real network. Array payloads are immutable bytes, so only
    the containers are copied; the cost does not grow with the model. Flower's serialization of
    every train and evaluate message is measured by the strategy for the ledger.
    """
    metadata = copy.copy(message.metadata)
    if not message.has_content():
        return Message(metadata=metadata, error=message.error)
    return Message(metadata=metadata, content=RecordDict({key: _copy_record(r) for key, r in message.content.items()}))


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, each with a persistent ``Context``."""

    def __init__(self, client_app: Callable[[Message, Context], Message], num_nodes: int, *, run_id: int = 1,
                 run_config: Mapping[str, Any] | None = None) -> None:
        """``num_nodes`` nodes holding partitions 0..num_nodes-1, all answering through ``client_app``."""
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self._partition_of = {NODE_ID_BASE + p: p for p in range(num_nodes)}
        self._contexts = {
            node: Context(run_id=run_id, node_id=node, node_config={"partition-id": p, "num-partitions": num_nodes},
                          state=RecordDict(), run_config=dict(run_config or {}))
            for node, p in self._partition_of.items()}
        self._replies: dict[str, Message] = {}

    # -- Grid interface -----------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Use ``run`` (its id and run config)."""
        self._run = run

    @property
    def run(self) -> Run:
        """Run information."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A new instruction message (deprecated in Flower; the ``Message`` constructor is the way)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every node (all are always online in one process)."""
        return list(self._partition_of)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver every message now and keep its reply for :meth:`pull_messages`."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            if message.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"message for unknown node {message.metadata.dst_node_id}")
            reply = self._deliver(message)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` (each handed out once)."""
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and return their replies (delivery is synchronous: nothing to wait for)."""
        return self.pull_messages(self.push_messages(messages))

    # -- fedpower extension -------------------------------------------------------------------
    def node_partitions(self) -> dict[int, int]:
        """node id → partition id: what a real grid learns only by asking every node."""
        return dict(self._partition_of)

    def _deliver(self, message: Message) -> Message:
        """Run the ClientApp on a transported copy of ``message``; a raised exception becomes an error reply."""
        received = transport(message)
        context = self._contexts[message.metadata.dst_node_id]
        try:
            reply = self.client_app(received, context)
        except Exception as err:  # noqa: BLE001 — Flower too turns a ClientApp exception into an error reply
            log.error("ClientApp raised on node %d (partition %d): %s\n%s", message.metadata.dst_node_id,
                      self._partition_of[message.metadata.dst_node_id], err, traceback.format_exc())
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(err)}:<'{err}'>"), reply_to=received)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return transport(reply)
