"""The ClientApp that ``flwr run .`` starts on every SuperNode (pyproject ``clientapp``).

The same handlers as in simulation (:mod:`clients.app`); the experiment comes from the run config's
YAML (shipped inside the app) and this node's ``--node-config``: ``partition-id`` (required),
``num-partitions`` (checked against the experiment), ``data-path`` (this node's data file),
``device`` (cpu / cuda / mps / auto), ``state-dir`` (keeps the error-feedback residual and
warm-start factors on disk, so they survive a SuperNode restart), ``threads`` (torch threads;
default: all cores but one) and ``timings`` (1: per-message timing metrics in the train replies).

A SuperNode starts a fresh process for every message, so everything imported here is paid per
message: this module imports only the client path (no simulation, report, plotting or CLI code;
``tests/test_edge.py`` checks it). With ``timings=1`` in the node config, each train reply carries where
its time went (``t-*`` metrics, seconds): message created on the server → handler entered (delivery,
process start, imports), the imports of this module, config, data, and the training + encoding itself.
"""

from __future__ import annotations

import time

_IMPORT_START = time.time()  # before torch and fedpower: their import time is part of every message

import os  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from clients.app import handle_evaluate, handle_query, handle_train  # noqa: E402
from fedpower.app_config import check_partition, experiment_from_run_config  # noqa: E402
from fedpower.config import ExperimentConfig  # noqa: E402
from fedpower.experiment import experiment_data  # noqa: E402

IMPORT_SECONDS = time.time() - _IMPORT_START


def board_threads(node_config: dict[str, Any] | Any) -> int | None:
    """Torch threads for this node: node-config ``threads``, else $FEDPOWER_THREADS, else cores − 1 (None: keep).

    One core is left to the SuperNode and the OS (on a 4-core Pi: 3). An explicit $OMP_NUM_THREADS is
    respected as torch already applied it (None).
    """
    chosen = str(node_config.get("threads") or "") or os.environ.get("FEDPOWER_THREADS", "")
    if chosen:
        return max(1, int(chosen))
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, usable_cores() - 1)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or systemd's limit)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def apply_threads(context: Context) -> None:
    """Size torch's intra-op thread pool for this board before any work (see ``board_threads``)."""
    threads = board_threads(context.node_config)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def node_experiment(context: Context) -> ExperimentConfig:
    """The run's experiment as this node sees it (its own data file), after checking its partition id."""
    experiment = experiment_from_run_config(context.run_config, context.node_config)
    check_partition(context.node_config, experiment)
    return experiment


def wants_timings(node_config: dict[str, Any] | Any) -> bool:
    """Whether train replies carry the ``t-*`` metrics: node-config ``timings=1`` or $FEDPOWER_TIMINGS=1.

    Off by default: they add ~140 B to every reply, and the uplink ledger counts every wire byte.
    """
    chosen = str(node_config.get("timings") or "") or os.environ.get("FEDPOWER_TIMINGS", "")
    return chosen.strip().lower() in ("1", "true", "yes", "on")


def _train(msg: Message, context: Context) -> Message:
    """Run the train handler with board-sized threads; with timings on, add the ``t-*`` metrics (not under local DP)."""
    entered = time.time()
    apply_threads(context)
    experiment = node_experiment(context)
    if not wants_timings(context.node_config):
        return handle_train(msg, context, experiment)
    configured = time.time()
    experiment_data(experiment)  # cached per process: the handler below reuses it, so it is timed here
    loaded = time.time()
    reply = handle_train(msg, context, experiment)
    done = time.time()
    if reply.has_error() or "metrics" not in reply.content:
        return reply
    privacy = experiment.resolve(str(msg.content["config"]["strategy"])).privacy
    if privacy is not None and privacy.mode == "local":
        return reply  # the server is not trusted under local DP: the reply says nothing it need not say
    metrics = reply.content["metrics"]
    created = float(msg.metadata.created_at or 0.0)
    if created > 0:
        metrics["t-startup-s"] = max(0.0, entered - created)
    metrics["t-import-s"] = IMPORT_SECONDS
    metrics["t-config-s"] = configured - entered
    metrics["t-data-s"] = loaded - configured
    metrics["t-handler-s"] = done - loaded
    metrics["t-threads"] = torch.get_num_threads()
    return reply


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this node's partition and reply with the compressed update."""
    return _train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this node's partition."""
    apply_threads(context)
    return handle_evaluate(msg, context, node_experiment(context))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition id (checked first, so a misconfigured node fails at the start)."""
    node_experiment(context)
    return handle_query(msg, context)
