"""The in-process engine's grid: isolation of what crosses it, error replies, persistent node contexts."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from strategies.inprocess import InProcessGrid, transport

pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside a running app


def _instruction(node: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}),
                          "config": ConfigRecord({"round": 1})})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def test_receiver_cannot_change_what_the_sender_holds() -> None:
    """Records are the receiver's own; array payloads are immutable bytes (``numpy()`` decodes a fresh array)."""
    sent = _instruction(7)
    received = transport(sent)
    received.content["config"]["round"] = 99
    received.content["arrays"]["w"] = Array(np.zeros(1, dtype=np.float32))
    assert sent.content["config"]["round"] == 1 and sent.content["arrays"]["w"].shape == (2, 3)
    assert received.metadata.dst_node_id == 7 and received.metadata is not sent.metadata
    assert isinstance(sent.content["arrays"]["w"].data, bytes)  # immutable: sharing it is safe
    view = transport(sent).content["arrays"]["w"].numpy()
    view[0, 0] = 5.0  # a client writing into what it decoded
    assert np.array_equal(sent.content["arrays"]["w"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_grid_keeps_each_nodes_context_and_turns_exceptions_into_error_replies() -> None:
    """A node's Context.state persists across messages; a raising ClientApp answers with an error reply."""

    def app(message: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == 1:
            raise RuntimeError("boom")
        seen = int(context.state["count"]["n"]) + 1 if "count" in context.state else 1
        context.state["count"] = MetricRecord({"n": seen})
        return Message(RecordDict({"metrics": MetricRecord({"seen": seen})}), reply_to=message)

    grid = InProcessGrid(app, 2)
    assert sorted(grid.node_partitions().values()) == [0, 1]
    node_of = {p: n for n, p in grid.node_partitions().items()}
    for expected in (1, 2):
        (reply,) = grid.send_and_receive([_instruction(node_of[0])])
        assert not reply.has_error() and reply.content["metrics"]["seen"] == expected
        assert reply.metadata.src_node_id == node_of[0]
    (failed,) = grid.send_and_receive([_instruction(node_of[1])])
    assert failed.has_error() and "boom" in failed.error.reason
    with pytest.raises(ValueError, match="unknown node"):
        grid.push_messages([_instruction(12345)])
