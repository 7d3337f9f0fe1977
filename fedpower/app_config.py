"""The Flower app's run config (``[tool.flwr.app.config]``) → the resolved experiment, on every end.

``flwr run .`` ships the app folder (a FAB) to the SuperLink and every SuperNode, so the YAML file
named by the run-config key ``config`` travels with it: the ServerApp and each ClientApp read the same
file and apply the same ``overrides``, which makes the YAML the one source of truth of a deployment
as it is of ``run.py``. Node-specific settings (data file, device, state folder) come from the
SuperNode's ``--node-config`` instead; only ``data-path`` changes the experiment itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from fedpower.config import ConfigError, ExperimentConfig, load_config

#: Run-config keys of the Flower app and what they mean (defaults in pyproject.toml).
RUN_CONFIG_KEYS = {
    "config": "YAML experiment, relative to the app folder (or absolute on the machines that read it)",
    "overrides": "'key.path=value' overrides as run.py --set takes them, separated by ';'",
    "out-dir": "where the ServerApp writes results.json etc.; empty: results/<experiment>-run<run id> "
               "under the SuperLink's working directory",
    "plots": "also write the PNG plots (needs matplotlib on the SuperLink)",
}
#: Node-config keys a SuperNode may set (``--node-config 'key=value ...'``).
NODE_CONFIG_KEYS = ("partition-id", "num-partitions", "data-path", "device", "state-dir", "threads", "timings")


def app_root() -> Path:
    """The app folder: where pyproject.toml and configs/ sit (the installed FAB in a deployment)."""
    return Path(__file__).resolve().parent.parent


def split_overrides(text: str) -> list[str]:
    """``"a.b=1; c=2"`` → ``["a.b=1", "c=2"]`` (empty parts dropped)."""
    return [part.strip() for part in str(text).split(";") if part.strip()]


def experiment_from_run_config(run_config: Mapping[str, Any],
                               node_config: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """The validated experiment named by the run config, with this node's ``data-path`` applied.

    Raises ConfigError (naming the run-config key or the YAML field) on any mistake.
    """
    name = str(run_config.get("config") or "")
    if not name:
        raise ConfigError("run config 'config' is empty: name the YAML experiment, e.g. "
                          "flwr run . <connection> --run-config \"config='configs/deployment.yaml'\"")
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = app_root() / path
    overrides = split_overrides(str(run_config.get("overrides") or ""))
    data_path = str((node_config or {}).get("data-path") or "")
    if data_path:  # JSON quoting keeps a path such as "yes" or "1.0" a YAML string
        overrides.append(f"data.path={json.dumps(str(Path(data_path).expanduser().resolve()))}")
    return load_config(path, overrides)


def check_partition(node_config: Mapping[str, Any], experiment: ExperimentConfig) -> int:
    """This node's partition id, checked against the experiment's number of clients."""
    if "partition-id" not in node_config:
        raise ConfigError("this SuperNode has no 'partition-id': start it with --node-config "
                          "'partition-id=N num-partitions=M'")
    try:
        partition = int(node_config["partition-id"])
    except (TypeError, ValueError):
        raise ConfigError(f"node config 'partition-id' must be an integer, got {node_config['partition-id']!r}") from None
    clients = experiment.data.num_clients
    if not 0 <= partition < clients:
        raise ConfigError(f"node config 'partition-id' is {partition}, but data.num_clients is {clients}: "
                          f"use 0 to {clients - 1}")
    declared = node_config.get("num-partitions")
    if declared is not None and int(declared) != clients:
        raise ConfigError(f"node config 'num-partitions' is {declared}, but the experiment's data.num_clients is "
                          f"{clients}: they must agree (every node must see the same partitioning)")
    return partition


def output_dir(run_config: Mapping[str, Any], experiment: ExperimentConfig, run_id: int) -> Path:
    """Where the ServerApp writes the run's outputs (run-config ``out-dir``, else results/<experiment>-run<id>)."""
    chosen = str(run_config.get("out-dir") or "")
    if chosen:
        return Path(chosen).expanduser().resolve()
    return (Path("results") / f"{experiment.experiment}-run{run_id}").resolve()
