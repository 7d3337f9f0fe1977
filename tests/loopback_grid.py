"""A Flower ``Grid`` inside the test process: the real ServerApp code talks to the real ClientApp handlers.

Every message that crosses it is kept (``delivered``), so tests can measure what actually went over
the wire independently of the code that filled the ledger. No Ray, no threads: a run of a few rounds
of a tiny model takes seconds.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from flwr.app import Context, Message, MessageType, RecordDict

from clients.app import handle_evaluate, handle_query, handle_train


class LoopbackGrid:
    """Nodes 1000 + p hold partition p; each keeps one persistent Context, as a SuperNode does."""

    def __init__(self, experiment: Mapping[str, Any]) -> None:
        self.experiment = dict(experiment)
        count = int(experiment["data"]["num_clients"])
        self.contexts = {1000 + p: Context(run_id=1, node_id=1000 + p, node_config={"partition-id": p},
                                           state=RecordDict(), run_config={}) for p in range(count)}
        self.delivered: list[tuple[Message, Message]] = []  # (instruction, reply) of every train/evaluate exchange

    def get_node_ids(self) -> list[int]:
        """Every node is online."""
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        """Hand each message to its node's ClientApp handler and return the replies."""
        replies = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            kind = message.metadata.message_type
            if kind == MessageType.QUERY:
                replies.append(handle_query(message, context))
                continue
            handler = handle_train if kind == MessageType.TRAIN else handle_evaluate
            reply = handler(message, context, self.experiment)
            self.delivered.append((message, reply))
            replies.append(reply)
        return replies


def run_in_process(experiment: Mapping[str, Any]) -> tuple[Any, LoopbackGrid]:
    """(RunResults, grid) of running every strategy of a resolved experiment through the loopback grid."""
    from fedpower.results import RunResults
    from strategies.server import run_strategies

    grid = LoopbackGrid(experiment)
    results = RunResults(experiment=str(experiment["experiment"]), config=dict(experiment))
    run_strategies(grid, experiment, results)  # type: ignore[arg-type]
    return results, grid
