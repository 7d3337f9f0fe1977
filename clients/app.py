"""The fedpower ClientApp: local training, then :func:`fedpower.round.client_step`; evaluation on request.

Message contract (server → client, train): ``arrays`` = global model (ArrayRecord), ``config`` = the
round's :class:`~fedpower.plan.RoundPlan` record, and for shared PowerSGD ``basis`` = one flat
float32 array. Reply: ``payload`` = one flat array per dtype, ``metrics`` = MetricRecord
{num-examples, train_loss, partition-id, state norms, the plan's echo, reply-delay-s}. Layouts are
derived on both ends, never sent. A client that drops out (``clients/failures.py``) replies with an error.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpower.codecs import layout_of, unpack
from fedpower.config import ExperimentConfig, StrategyConfig, TrainConfig
from fedpower.experiment import as_experiment, client_indices, client_seed, experiment_data, experiment_model
from fedpower.plan import RoundPlan
from fedpower.records import model_from_arrays
from fedpower.round import NUM_EXAMPLES, PARTITION, TRAIN_LOSS, client_codec, client_step
from fedpower.server_state import received_basis_layout, sends_basis
from fedpower.training import evaluate, local_update, pick_device, set_params

from clients.failures import DELAY_METRIC, dropout_reply, reply_delay
from clients.state_store import make_store

log = logging.getLogger("fedpower.client")


def partition_id(context: Context) -> int:
    """This node's partition id (simulation sets it; deployments pass --node-config)."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError as err:
        raise RuntimeError("node config lacks 'partition-id' (pass --node-config 'partition-id=N')") from err


def node_device(context: Context, train: TrainConfig) -> torch.device:
    """Where this node trains: node-config ``device``, else $FEDPOWER_DEVICE, else the experiment's train.device."""
    chosen = str(context.node_config.get("device") or "") or os.environ.get("FEDPOWER_DEVICE") or train.device
    return pick_device(chosen)


def _basis(msg: Message, settings: StrategyConfig, plan: RoundPlan, update: Mapping[str, torch.Tensor],
           device: torch.device) -> dict[str, torch.Tensor] | None:
    """The shared basis the round's message carries (None when the round has none)."""
    if not sends_basis(settings.compression, plan):
        return None
    layout = received_basis_layout(settings.compression, plan, layout_of(update))
    return unpack({"float32": msg.content["basis"]["float32"].numpy()}, layout, device)


def _reply_metrics(settings: StrategyConfig, plan: RoundPlan, pid: int, examples: int, loss: float,
                   step_metrics: Mapping[str, float]) -> dict[str, Any]:
    """The reply's metrics: the plan's echo always; training statistics only to a server trusted with them."""
    if settings.privacy is not None and settings.privacy.mode == "local":
        # The server is not trusted under local DP: send nothing un-noised about the data.
        metrics: dict[str, Any] = {NUM_EXAMPLES: 1, PARTITION: pid}
    else:
        metrics = {NUM_EXAMPLES: int(examples), TRAIN_LOSS: float(loss), PARTITION: pid, **step_metrics}
    # Echoed so the server can refuse a reply computed for another round or basis; the delay is simulated.
    return {**metrics, **plan.echo(),
            DELAY_METRIC: reply_delay(settings.train.failures, settings.seed, plan.round, pid)}


def handle_train(msg: Message, context: Context, experiment: ExperimentConfig | Mapping[str, Any]) -> Message:
    """Train locally and reply with the compressed update."""
    experiment = as_experiment(experiment)
    plan = RoundPlan.from_record(msg.content["config"])
    settings = experiment.resolve(plan.strategy)
    pid = partition_id(context)
    if (dropped := dropout_reply(msg, settings.train.failures, settings.seed, plan.round, pid)) is not None:
        return dropped  # simulated dropout, before any training or state I/O: the residual stays as it was
    device = node_device(context, settings.train)
    dataset, _, x_train, y_train, _, _ = experiment_data(experiment)
    global_params = model_from_arrays(msg.content["arrays"], device)
    seed = client_seed(settings.seed, plan.round, pid)
    train_idx = client_indices(experiment, pid)[0]  # without the federated-evaluation holdout
    model = experiment_model(settings, dataset, pretrained=False).to(device)  # the message carries the weights
    update, examples, loss = local_update(model, global_params, x_train, y_train, train_idx, settings.train, seed)
    codec = client_codec(settings, plan, _basis(msg, settings, plan, update, device), pid)
    store = make_store(experiment.client_state, experiment.experiment, context)
    saved = None if plan.dense else store.load(settings.name, pid, before_round=plan.round)
    payload, state, step_metrics = client_step(update, saved, plan, settings, codec, partition=pid, seed=seed)
    if state:  # dense warm-up rounds and stateless codecs keep nothing new
        store.save(settings.name, pid, plan.round, {n: t.detach().cpu().numpy() for n, t in state.items()})
    reply = RecordDict({
        "payload": ArrayRecord({dtype: Array(buf) for dtype, buf in payload.items()}),
        "metrics": MetricRecord(_reply_metrics(settings, plan, pid, examples, loss, step_metrics)),
    })
    return Message(reply, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, experiment: ExperimentConfig | Mapping[str, Any]) -> Message:
    """Evaluate the global model on the part of this client's partition held out from training."""
    experiment = as_experiment(experiment)
    plan = RoundPlan.from_record(msg.content["config"])
    settings = experiment.resolve(plan.strategy)
    device = node_device(context, settings.train)
    dataset, _, x_train, y_train, _, _ = experiment_data(experiment)
    model = experiment_model(settings, dataset, pretrained=False).to(device)
    set_params(model, model_from_arrays(msg.content["arrays"], device))
    idx = torch.as_tensor(client_indices(experiment, partition_id(context))[1], dtype=torch.long)
    loss, accuracy = evaluate(model, x_train[idx], y_train[idx])
    metrics = MetricRecord({NUM_EXAMPLES: len(idx), "eval_loss": loss, "eval_accuracy": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random; sampling keys on partitions)."""
    return Message(RecordDict({"metrics": MetricRecord({PARTITION: partition_id(context)})}), reply_to=msg)


def make_client_app(experiment: ExperimentConfig | Mapping[str, Any]) -> ClientApp:
    """A ClientApp bound to one experiment, which travels as JSON and is re-validated where the app runs."""
    app = ClientApp()
    text = as_experiment(experiment).model_dump_json()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, as_experiment(text))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, as_experiment(text))

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    return app
