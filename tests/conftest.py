"""Shared test set-up: Flower writes nowhere outside a temp dir and never phones home."""

from __future__ import annotations

import os
import tempfile
from typing import Iterator

import pytest

os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedpower-test-flwr-"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FEDPOWER_CACHE", os.path.join(tempfile.gettempdir(), "fedpower-test-cache"))


def strategy_settings(compression: dict | None = None, *, name: str = "s", privacy: dict | None = None,
                      train: dict | None = None, num_clients: int = 10, seed: int = 0):
    """A strategy's resolved settings through the real schema, for tests that drive one strategy by hand.

    Nodes are never offline in these tests (no grid to ask), so the rejoin wait is off unless set.
    """
    from fedpower.config import parse_config

    train = {"clients_per_round": min(10, num_clients), **(train or {})}
    train["failures"] = {"rejoin_wait_s": 0.0, **train.get("failures", {})}
    entry = {"name": name, "compression": compression or {"method": "none"}}
    if privacy is not None:
        entry["privacy"] = privacy
    config = parse_config({"experiment": "test", "seed": seed, "data": {"num_clients": num_clients},
                           "train": train, "strategies": [entry]})
    return config.resolve(name)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower needs a task identity to build instruction messages outside a running app (restored after)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # type: ignore[attr-defined]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved  # type: ignore[attr-defined]
