"""The fedpower ClientApp: local training, update compression with error feedback, evaluation.

Message contract (server → client, train): ``arrays`` = global model (ArrayRecord), ``config`` =
ConfigRecord {strategy, server-round, dense, side}, and for shared PowerSGD ``basis`` = one flat
float32 array. Reply: ``payload`` = one flat array per dtype, ``metrics`` = MetricRecord
{num-examples, train_loss, partition-id}. Layouts are derived on both ends, never sent.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpower.codecs import build_codec, is_shared, layout_of, pack, unpack
from fedpower.codecs.powersgd import basis_layout
from fedpower.experiment import experiment_data, experiment_model, strategy_settings
from fedpower.records import arrays_to_tensors, tensors_to_arrays
from fedpower.privacy import ClientPrivacy, noise_generator, private_encode
from fedpower.training import evaluate, get_params, pick_device, set_params, train_local

STATE_PREFIX = "fedpower:"


def partition_id(context: Context) -> int:
    """This node's partition id (simulation sets it; deployments pass --node-config)."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError as err:
        raise RuntimeError("node config lacks 'partition-id' (pass --node-config 'partition-id=N')") from err


def load_client_state(context: Context, strategy: str, device: torch.device) -> dict[str, torch.Tensor] | None:
    """This client's persistent codec state (error-feedback residual, warm-start factors) for a strategy."""
    key = STATE_PREFIX + strategy
    if key not in context.state:
        return None
    return arrays_to_tensors(context.state[key], device)


def save_client_state(context: Context, strategy: str, state: Mapping[str, torch.Tensor]) -> None:
    """Persist the codec state in the node's Context (kept across rounds, also when rounds are skipped)."""
    context.state[STATE_PREFIX + strategy] = tensors_to_arrays(state)


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the error-feedback residual (lets the server check that client state persists)."""
    total = sum(float(t.double().pow(2).sum()) for k, t in state.items() if k.startswith("residual/"))
    return total ** 0.5


def client_privacy(privacy: Mapping[str, Any], config: Mapping[str, Any]) -> ClientPrivacy:
    """What this client applies: clip to C; under local DP also noise σ·C (σ from its config, else the server's)."""
    clip_norm = float(privacy["clip_norm"])
    if privacy["mode"] != "local":
        return ClientPrivacy(clip_norm=clip_norm)
    sigma = privacy.get("noise_multiplier")
    if sigma is None:  # calibrated to target_epsilon by the server, which sends it each round
        sigma = config["dp-noise-multiplier"]
    return ClientPrivacy(clip_norm=clip_norm, noise_std=float(sigma) * clip_norm)


def handle_train(msg: Message, context: Context, experiment: Mapping[str, Any]) -> Message:
    """Train locally and reply with the compressed update."""
    config = msg.content["config"]
    strategy = str(config["strategy"])
    server_round = int(config["server-round"])
    settings = strategy_settings(experiment, strategy)
    train_cfg, compression = settings["train"], settings["compression"]
    device = pick_device(os.environ.get("FEDPOWER_DEVICE", train_cfg.get("device", "auto")))
    pid = partition_id(context)
    dataset, parts, x_train, y_train, _, _ = experiment_data(experiment)

    model = experiment_model(experiment, strategy, dataset).to(device)
    global_params = arrays_to_tensors(msg.content["arrays"], device)
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
    codec = build_codec(compression, dense=dense, basis=basis, side=side)  # type: ignore[arg-type]
    state = load_client_state(context, strategy, device)
    if state is None:
        state = codec.init_state(inputs, device, seed=int(experiment["seed"]) + pid)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    state_norm_in = state_norm(state)
    privacy = settings.get("privacy")
    if privacy:
        dp = client_privacy(privacy, config)
        noise = (noise_generator(privacy.get("noise_seed"), int(experiment["seed"]), server_round, pid)
                 if dp.noise_std > 0 else None)
        encoded, new_state, info = private_encode(codec, update, None if dense else state, dp, generator, noise)
        if not dense:
            state = new_state
            save_client_state(context, strategy, state)
    else:
        info = {}
        if dense:
            encoded, _ = codec.encode(update, None, generator)
        else:
            encoded, state = codec.encode(update, state, generator)
            save_client_state(context, strategy, state)
    packed = pack(encoded, codec.layout(inputs))
    metrics: dict[str, Any] = {"num-examples": int(num_examples), "train_loss": float(loss), "partition-id": pid,
                               "state_norm_in": state_norm_in, "state_norm_out": state_norm(state)}
    if privacy and privacy["mode"] == "local":
        # The server is not trusted under local DP: send nothing un-noised about the data.
        metrics = {"num-examples": 1, "partition-id": pid}
    elif privacy:
        metrics["update_norm"] = info["clip_norm_in"]  # to a trusted server only: helps choosing C
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
    device = pick_device(os.environ.get("FEDPOWER_DEVICE", settings["train"].get("device", "auto")))
    dataset, parts, x_train, y_train, _, _ = experiment_data(experiment)
    model = experiment_model(experiment, strategy, dataset).to(device)
    set_params(model, arrays_to_tensors(msg.content["arrays"], device))
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
