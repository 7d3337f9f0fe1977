"""What both ends of a run derive from the resolved experiment dict (``ExperimentConfig.to_dict()``).

The server and every client hold the same experiment description and derive the data partition,
the model and each strategy's settings from it — one source of truth, nothing extra on the wire.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from fedpower.data import Dataset, load_dataset, partition
from fedpower.models import build_model
from fedpower.privacy.sampling import cohort_sampler

if TYPE_CHECKING:
    from fedpower.privacy.plan import PrivacyPlan


PARTITION_PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (), "natural": (), "dirichlet": ("alpha",), "pathological": ("classes_per_client",),
    "shard": ("shards_per_client",),
}


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """``base`` with ``override`` merged in recursively (override wins)."""
    out = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def strategy_settings(experiment: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Resolved settings of one strategy: its compression, privacy, train and model."""
    for entry in experiment["strategies"]:
        if entry["name"] == name:
            return {
                "name": name,
                "compression": dict(entry.get("compression") or {"method": "none"}),
                "privacy": entry.get("privacy"),
                "train": deep_merge(experiment["train"], entry.get("train")),
                "model": deep_merge(experiment["model"], entry.get("model")),
            }
    raise KeyError(f"no strategy named {name!r} in the experiment")


def clients_per_round(train: Mapping[str, Any], num_clients: int) -> int:
    """Cohort size from ``clients_per_round`` or ``fraction`` (the expected size under Poisson sampling)."""
    if train.get("fraction"):
        return max(1, round(float(train["fraction"]) * num_clients))
    return max(1, min(int(train.get("clients_per_round") or num_clients), num_clients))


def privacy_plan(experiment: Mapping[str, Any], name: str) -> PrivacyPlan | None:
    """The resolved DP plan of a strategy (σ calibrated if asked), or None without DP; may raise BudgetExceeded."""
    settings = strategy_settings(experiment, name)
    privacy = settings.get("privacy")
    if not privacy:
        return None
    from fedpower.privacy.plan import make_plan  # needs dp-accounting (the [sim] extra): server side only

    num_clients = int(experiment["data"]["num_clients"])
    cohort = clients_per_round(settings["train"], num_clients)
    sample = cohort_sampler(int(experiment["seed"]), range(num_clients), cohort, privacy.get("sampling", "poisson"))
    return make_plan(privacy, num_clients=num_clients, cohort_size=cohort, rounds=int(settings["train"]["rounds"]),
                     cohorts=sample)


def planned_noise_multiplier(experiment: Mapping[str, Any], name: str) -> float:
    """σ of a DP strategy as the server plans it (calibrated to target_epsilon if asked); cached per process.

    A local-DP client calls this so that it never depends on the server for its own noise level.
    """
    return _planned_noise_multiplier(json.dumps(experiment, sort_keys=True, default=str), name)


@lru_cache(maxsize=8)
def _planned_noise_multiplier(experiment_key: str, name: str) -> float:
    """Cached body of :func:`planned_noise_multiplier` (calibration runs the accountant many times)."""
    plan = privacy_plan(json.loads(experiment_key), name)
    if plan is None:
        raise ValueError(f"strategy {name!r} has no privacy settings")
    return float(plan.noise_multiplier)


def _data_key(experiment: Mapping[str, Any]) -> str:
    """Cache key of the data part of an experiment."""
    return json.dumps({"data": experiment["data"], "seed": experiment["seed"]}, sort_keys=True, default=str)


@lru_cache(maxsize=4)
def _load(data_key: str) -> tuple[Dataset, tuple[np.ndarray, ...], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load and partition once per process (Ray actors and the server reuse it across rounds)."""
    spec = json.loads(data_key)
    data, seed = spec["data"], spec["seed"]
    dataset = load_dataset(data["dataset"], path=data.get("path"), seed=seed,
                           test_fraction=data.get("test_fraction", 0.2),
                           label_column=data.get("label_column", "label"), **(data.get("options") or {}))
    part = dict(data.get("partition") or {"kind": "iid"})
    kind = part.pop("kind")
    # The schema carries every partitioner's parameter with a default; pass only this kind's own.
    params = {key: part[key] for key in PARTITION_PARAMS.get(kind, ()) if part.get(key) is not None}
    parts = partition(dataset, data["num_clients"], kind, seed=seed, **params)
    tensors = (torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train).long(),
               torch.from_numpy(dataset.x_test), torch.from_numpy(dataset.y_test).long())
    return (dataset, tuple(parts), *tensors)


def experiment_data(experiment: Mapping[str, Any]):
    """(dataset, partitions, x_train, y_train, x_test, y_test) for this experiment, cached per process."""
    return _load(_data_key(experiment))


def experiment_model(experiment: Mapping[str, Any], strategy: str, dataset: Dataset) -> torch.nn.Module:
    """The strategy's model, initialised identically on every end (seeded by the experiment seed)."""
    settings = strategy_settings(experiment, strategy)
    torch.manual_seed(int(experiment["seed"]))
    model_cfg = settings["model"]
    return build_model(model_cfg["name"], dataset, **(model_cfg.get("options") or {}))
