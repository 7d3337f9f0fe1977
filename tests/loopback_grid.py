"""The in-process engine's grid, keeping every message it carried, for tests that measure what crossed it.

The real ServerApp code talks to the real ClientApp through :class:`strategies.inprocess.InProcessGrid`;
``delivered`` holds each (instruction, reply) pair, so tests can measure the wire independently of
the code that filled the ledger.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import Message, MessageType

from clients.app import make_client_app
from strategies.inprocess import InProcessGrid


class RecordingGrid(InProcessGrid):
    """An in-process grid that also keeps every train/evaluate exchange (and every query one in ``queries``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delivered: list[tuple[Message, Message]] = []
        self.queries: list[tuple[Message, Message]] = []
        self.partition_of: dict[int, int] = dict(self._partition_of)  # node id → partition, for the tests' keys

    def _deliver(self, message: Message) -> Message:
        reply = super()._deliver(message)
        kept = self.queries if message.metadata.message_type == MessageType.QUERY else self.delivered
        kept.append((message, reply))
        return reply


class AskingGrid(RecordingGrid):
    """A recording grid that does not tell the server the partitions: it must ask every node, as on Ray."""

    node_partitions = None  # type: ignore[assignment]  # strategies.server.discover_partitions then queries


def run_in_process(experiment: Mapping[str, Any],
                   grid_class: type[RecordingGrid] = RecordingGrid) -> tuple[Any, RecordingGrid]:
    """(RunResults, grid) of running every strategy of a resolved experiment through a recording grid."""
    from fedpower.results import RunResults
    from strategies.server import run_strategies

    grid = grid_class(make_client_app(experiment), int(experiment["data"]["num_clients"]))
    results = RunResults(experiment=str(experiment["experiment"]), config=dict(experiment))
    run_strategies(grid, experiment, results)
    return results, grid
