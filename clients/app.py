"""The fedpower ClientApp: local training, update compression with error feedback, evaluation.

Message contract (server → client, train): ``arrays`` = global model (ArrayRecord), ``config`` =
ConfigRecord {strategy, server-round, dense, side, basis-id}, and for shared PowerSGD ``basis`` = one flat
float32 array. Reply: ``payload`` = one flat array per dtype, ``metrics`` = MetricRecord
{num-examples, train_loss, partition-id, server-round, basis-id, reply-delay-s}. Layouts are derived
on both ends, never sent. A client that drops out (``clients/failures.py``) replies with an error.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpower.codecs import build_codec, is_shared, layout_of, pack, unpack
from fedpower.codecs.packing import entropy_encode
from fedpower.codecs.powersgd import basis_layout
from fedpower.experiment import experiment_data, experiment_model, planned_noise_multiplier, strategy_settings
from fedpower.records import model_from_arrays
from fedpower.privacy import client_privacy, contribution_norm, noise_generator
from fedpower.training import evaluate, get_params, pick_device, set_params, train_local

from clients.failures import DELAY_METRIC, dropout_reply, reply_delay
from clients.state_store import StateStore, make_store

log = logging.getLogger("fedpower.client")


def partition_id(context: Context) -> int:
    """This node's partition id (simulation sets it; deployments pass --node-config)."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError as err:
        raise RuntimeError("node config lacks 'partition-id' (pass --node-config 'partition-id=N')") from err


def node_device(context: Context, train_cfg: Mapping[str, Any]) -> torch.device:
    """Where this node trains: node-config ``device``, else $FEDPOWER_DEVICE, else the experiment's train.device."""
    chosen = str(context.node_config.get("device") or "") or os.environ.get("FEDPOWER_DEVICE") or train_cfg.get(
        "device", "auto")
    return pick_device(chosen)


def load_client_state(store: StateStore, strategy: str, pid: int, server_round: int,
                      fresh: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor] | None:
    """The codec state saved before ``server_round`` if it fits the codec's fresh state, else None.

    A state whose names or shapes differ from ``fresh`` (the model or codec settings changed between
    runs sharing a state folder) is not usable: the client starts fresh and logs why.
    """
    arrays = store.load(strategy, pid, before_round=server_round)
    if arrays is None:
        return None
    # A warm-start Q may have another column count when ranks were re-allocated; the codec refits it.
    expected = {name: _row_shape(name, tuple(t.shape)) for name, t in fresh.items()}
    found = {name: _row_shape(name, tuple(a.shape)) for name, a in arrays.items()}
    if found != expected:
        log.warning("client state of %s (partition %d) does not fit the codec (%d saved arrays, %d expected, or "
                    "shapes differ); starting from a fresh state", strategy, pid, len(found), len(expected))
        return None
    return {name: torch.from_numpy(arr).to(device=device, dtype=fresh[name].dtype) for name, arr in arrays.items()}


def _row_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape used to match saved state to the codec: a PowerSGD warm start ``*.Q`` only by its rows."""
    return shape[:1] if name.endswith(".Q") and len(shape) == 2 else shape


def save_client_state(store: StateStore, strategy: str, pid: int, server_round: int,
                      state: Mapping[str, torch.Tensor]) -> None:
    """Persist the codec state of ``server_round`` (kept across rounds, also when rounds are skipped)."""
    if not state:  # a codec without error feedback or warm start has nothing to keep
        return
    store.save(strategy, pid, server_round, {name: t.detach().cpu().numpy() for name, t in state.items()})


def handle_train(msg: Message, context: Context, experiment: Mapping[str, Any]) -> Message:
    """Train locally and reply with the compressed update."""
    config = msg.content["config"]
    strategy = str(config["strategy"])
    server_round = int(config["server-round"])
    settings = strategy_settings(experiment, strategy)
    train_cfg, compression = settings["train"], settings["compression"]
    device = node_device(context, train_cfg)
    pid = partition_id(context)
    if (dropped := dropout_reply(msg, train_cfg, int(experiment["seed"]), server_round, pid)) is not None:
        return dropped  # simulated dropout, before any training or state I/O: the residual stays as it was
    dataset, parts, x_train, y_train, _, _ = experiment_data(experiment)

    model = experiment_model(experiment, strategy, dataset).to(device)
    global_params = model_from_arrays(msg.content["arrays"], device)
    set_params(model, global_params)
    seed = int(experiment["seed"]) * 1_000_003 + server_round * 10_007 + pid
    num_examples, loss = train_local(
        model, x_train, y_train, parts[pid], epochs=train_cfg["local_epochs"], batch_size=train_cfg["batch_size"],
        optimizer=train_cfg["optimizer"], lr=train_cfg["lr"], momentum=train_cfg.get("momentum", 0.0),
        weight_decay=train_cfg.get("weight_decay", 0.0), seed=seed)
    local = get_params(model)
    update = {name: local[name] - global_params[name] for name in global_params}
    inputs = layout_of(update)

    dense = bool(config.get("dense", False))
    basis = None
    side = str(config.get("side", "left"))
    if is_shared(compression) and not dense:
        blayout = basis_layout(inputs, compression.get("rank", 4), compression.get("min_compression_rate", 2.0),
                               "left" if side == "left" else "right")
        basis = unpack({"float32": msg.content["basis"]["float32"].numpy()}, blayout, device)
    ranks = json.loads(str(config["ranks"])) if "ranks" in config else None  # a byte-budget allocation
    privacy = settings.get("privacy")
    dp = client_privacy(privacy, calibrated=lambda: planned_noise_multiplier(experiment, strategy),
                        server_sigma=config.get("dp-noise-multiplier"),
                        noise_generator=noise_generator(privacy.get("noise_seed"), int(experiment["seed"]),
                                                        server_round, pid)) if privacy else None
    codec = build_codec(compression, dense=dense, basis=basis, side=side, ranks=ranks,  # type: ignore[arg-type]
                        privacy=dp)
    fresh = codec.init_state(inputs, device, seed=int(experiment["seed"]) + pid)
    store = make_store(experiment, context)
    # Dense rounds (warm-up before compression starts) neither use nor change the codec state.
    state = fresh if dense else (load_client_state(store, strategy, pid, server_round, fresh, device) or fresh)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    state_norm_in = codec.residual_norm(state)
    if dense:
        encoded, _ = codec.encode(update, None, generator)
    else:
        encoded, state = codec.encode(update, state, generator)
        save_client_state(store, strategy, pid, server_round, state)
    packed = pack(encoded, codec.layout(inputs))
    if compression.get("entropy_coding", "none") == "zlib":
        packed = entropy_encode(packed)
    metrics: dict[str, Any] = {"num-examples": int(num_examples), "train_loss": float(loss), "partition-id": pid,
                               "state_norm_in": state_norm_in, "state_norm_out": codec.residual_norm(state)}
    if privacy and privacy["mode"] == "local":
        # The server is not trusted under local DP: send nothing un-noised about the data.
        metrics = {"num-examples": 1, "partition-id": pid}
    elif privacy:
        metrics["update_norm"] = contribution_norm(update)  # to a trusted server only: helps choosing C
    # Echoed so the server can refuse a reply computed for another round or basis; the delay is simulated.
    metrics.update({"server-round": server_round, "basis-id": int(config.get("basis-id", -1)),
                    DELAY_METRIC: reply_delay(train_cfg, int(experiment["seed"]), server_round, pid)})
    reply = RecordDict({
        "payload": ArrayRecord({dtype: Array(buf) for dtype, buf in packed.items()}),
        "metrics": MetricRecord(metrics),
    })
    return Message(reply, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, experiment: Mapping[str, Any]) -> Message:
    """Evaluate the global model on this client's own partition (federated evaluation)."""
    config = msg.content["config"]
    strategy = str(config["strategy"])
    settings = strategy_settings(experiment, strategy)
    device = node_device(context, settings["train"])
    dataset, parts, x_train, y_train, _, _ = experiment_data(experiment)
    model = experiment_model(experiment, strategy, dataset).to(device)
    set_params(model, model_from_arrays(msg.content["arrays"], device))
    idx = torch.as_tensor(parts[partition_id(context)], dtype=torch.long)
    loss, accuracy = evaluate(model, x_train[idx], y_train[idx])
    metrics = MetricRecord({"num-examples": len(idx), "eval_loss": loss, "eval_accuracy": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random; sampling keys on partitions)."""
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id(context)})}), reply_to=msg)


def make_client_app(experiment: Mapping[str, Any]) -> ClientApp:
    """A ClientApp bound to one resolved experiment dict."""
    app = ClientApp()
    experiment = dict(experiment)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, experiment)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, experiment)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    return app
