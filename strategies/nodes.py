"""Waiting for sampled nodes that are offline (a SuperNode rebooting between its rounds)."""

from __future__ import annotations

import logging
import time

from flwr.serverapp import Grid

log = logging.getLogger("fedpower.strategy")


def wait_until_online(grid: Grid, nodes: list[int], wait_s: float, what: str) -> None:
    """Give sampled ``nodes`` that are offline up to ``wait_s`` seconds to return.

    Why: a message to an offline node comes back as an error, so a device that reboots between its
    rounds would lose its next round although it is back seconds later.
    """
    if wait_s <= 0 or not nodes:
        return
    deadline = time.monotonic() + wait_s
    missing = set(nodes) - set(grid.get_node_ids())
    if missing:
        log.info("%s: waiting up to %.0f s for %d offline node(s) to rejoin", what, wait_s, len(missing))
    while missing and time.monotonic() < deadline:
        time.sleep(0.5)
        missing -= set(grid.get_node_ids())
    if missing:
        log.warning("%s: %d sampled node(s) still offline after %.0f s; their replies will fail", what,
                    len(missing), wait_s)
