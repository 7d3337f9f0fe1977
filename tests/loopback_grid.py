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
    """An in-process grid that also keeps every train/evaluate exchange."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delivered: list[tuple[Message, Message]] = []

    def _deliver(self, message: Message) -> Message:
        reply = super()._deliver(message)
        if message.metadata.message_type != MessageType.QUERY:
            self.delivered.append((message, reply))
        return reply


def run_in_process(experiment: Mapping[str, Any]) -> tuple[Any, RecordingGrid]:
    """(RunResults, grid) of running every strategy of a resolved experiment through a recording grid."""
    from fedpower.results import RunResults
    from strategies.server import run_strategies

    grid = RecordingGrid(make_client_app(experiment), int(experiment["data"]["num_clients"]))
    results = RunResults(experiment=str(experiment["experiment"]), config=dict(experiment))
    run_strategies(grid, experiment, results)
    return results, grid
