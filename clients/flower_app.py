"""The ClientApp that ``flwr run .`` starts on every SuperNode (pyproject ``clientapp``).

The same handlers as in simulation (:mod:`clients.app`); the experiment comes from the run config's
YAML (shipped inside the app) and this node's ``--node-config``: ``partition-id`` (required),
``num-partitions`` (checked against the experiment), ``data-path`` (this node's data file),
``device`` (cpu / cuda / mps / auto) and ``state-dir`` (keeps the error-feedback residual and
warm-start factors on disk, so they survive a SuperNode restart).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.app import handle_evaluate, handle_query, handle_train
from fedpower.app_config import check_partition, experiment_from_run_config
from fedpower.config import ExperimentConfig


def node_experiment(context: Context) -> ExperimentConfig:
    """The run's experiment as this node sees it (its own data file), after checking its partition id."""
    experiment = experiment_from_run_config(context.run_config, context.node_config)
    check_partition(context.node_config, experiment)
    return experiment


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this node's partition and reply with the compressed update."""
    return handle_train(msg, context, node_experiment(context))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this node's partition."""
    return handle_evaluate(msg, context, node_experiment(context))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition id (checked first, so a misconfigured node fails at the start)."""
    node_experiment(context)
    return handle_query(msg, context)
