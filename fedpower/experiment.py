"""What both ends of a run derive from the validated experiment (:class:`~fedpower.config.ExperimentConfig`).

The server and every client hold the same experiment and derive the data partition, the model and
each strategy's :class:`~fedpower.config.StrategyConfig` from it — one source of truth, nothing extra
on the wire. A peer that receives the experiment as JSON re-validates it (:func:`as_experiment`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from fedpower.config import ExperimentConfig, StrategyConfig, parse_config
from fedpower.data import Dataset, load_dataset, partition, split_holdout
from fedpower.models import build_model
from fedpower.privacy.sampling import cohort_sampler

if TYPE_CHECKING:
    from fedpower.privacy.plan import PrivacyPlan


PARTITION_PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (), "natural": (), "dirichlet": ("alpha",), "pathological": ("classes_per_client",),
    "shard": ("shards_per_client",),
}


def as_experiment(experiment: ExperimentConfig | Mapping[str, Any] | str) -> ExperimentConfig:
    """The validated experiment: as is, or re-validated from its dict / JSON form (cached per process)."""
    if isinstance(experiment, ExperimentConfig):
        return experiment
    text = experiment if isinstance(experiment, str) else json.dumps(experiment, sort_keys=True, default=str)
    return _validated(text)


@lru_cache(maxsize=8)
def _validated(text: str) -> ExperimentConfig:
    """Parse and validate one experiment's JSON once per process (every message of a run carries the same)."""
    return parse_config(json.loads(text), source="<experiment JSON>")


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's round (local training order, stochastic rounding): same on every engine."""
    return int(seed) * 1_000_003 + int(server_round) * 10_007 + int(partition_id)


def privacy_plan(settings: StrategyConfig) -> PrivacyPlan | None:
    """The resolved DP plan of a strategy (σ calibrated if asked), or None without DP; may raise BudgetExceeded."""
    if settings.privacy is None:
        return None
    from fedpower.privacy.plan import make_plan  # needs dp-accounting (the [sim] extra): server side only

    cohort = settings.clients_per_round
    sample = cohort_sampler(settings.seed, range(settings.num_clients), cohort, settings.privacy.sampling)
    plan = make_plan(settings.privacy, num_clients=settings.num_clients, cohort_size=cohort,
                     rounds=settings.train.rounds, cohorts=sample)
    plan.noise_seed = settings.noise_seed  # this strategy's own stream (never shared with another strategy)
    return plan


def planned_noise_multiplier(settings: StrategyConfig) -> float:
    """σ of a DP strategy as the server plans it (calibrated to target_epsilon if asked); cached per process.

    A local-DP client calls this so that it never depends on the server for its own noise level.
    """
    return _planned_noise_multiplier(settings.to_json())


@lru_cache(maxsize=8)
def _planned_noise_multiplier(settings_json: str) -> float:
    """Cached body of :func:`planned_noise_multiplier` (calibration runs the accountant many times)."""
    plan = privacy_plan(StrategyConfig.from_json(settings_json))
    if plan is None:
        raise ValueError("this strategy has no privacy settings")
    return float(plan.noise_multiplier)


def _data_key(experiment: ExperimentConfig) -> str:
    """Cache key of the data part of an experiment."""
    return json.dumps({"data": experiment.data.model_dump(mode="json"), "seed": experiment.seed}, sort_keys=True)


@lru_cache(maxsize=4)
def _load(data_key: str) -> tuple[Dataset, tuple[np.ndarray, ...], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load and partition once per process (Ray actors and the server reuse it across rounds)."""
    spec = json.loads(data_key)
    data, seed = spec["data"], spec["seed"]
    dataset = load_dataset(data["dataset"], path=data["path"], seed=seed, test_fraction=data["test_fraction"],
                           label_column=data["label_column"], **data["options"])
    part = dict(data["partition"])
    kind = part.pop("kind")
    # The schema carries every partitioner's parameter with a default; pass only this kind's own.
    params = {key: part[key] for key in PARTITION_PARAMS.get(kind, ()) if part.get(key) is not None}
    parts = partition(dataset, data["num_clients"], kind, seed=seed, **params)
    tensors = (torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train).long(),
               torch.from_numpy(dataset.x_test), torch.from_numpy(dataset.y_test).long())
    return (dataset, tuple(parts), *tensors)


def experiment_data(experiment: ExperimentConfig):
    """(dataset, partitions, x_train, y_train, x_test, y_test) for this experiment, cached per process."""
    return _load(_data_key(experiment))


def holdout_fraction(experiment: ExperimentConfig) -> float:
    """Share of each client's partition kept for federated evaluation: 0 unless some strategy evaluates so.

    One value for the whole run (the top-level ``train.federated_holdout``): every strategy then
    trains on the same examples, whichever of them evaluates federatedly.
    """
    # Read from the entries directly: resolving every strategy on every client message would cost more.
    evaluating = any(entry.train.federated_evaluation if entry.train is not None
                     and entry.train.federated_evaluation is not None else experiment.train.federated_evaluation
                     for entry in experiment.strategies)
    return experiment.train.federated_holdout if evaluating else 0.0


def client_indices(experiment: ExperimentConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(examples a client trains on, examples it evaluates the global model on) of its partition."""
    parts = experiment_data(experiment)[1]
    return split_holdout(parts[partition_id], holdout_fraction(experiment), seed=experiment.seed,
                         partition_id=partition_id)


def experiment_model(settings: StrategyConfig, dataset: Dataset, pretrained: bool = True) -> torch.nn.Module:
    """The strategy's model, initialised identically on every end (seeded by the experiment seed).

    ``pretrained``: load ``model.weights`` when set (the server's starting model); clients pass False,
    since every round's message carries the model they start from.
    """
    # The CPU generator is what initialisation draws from (models are built on the CPU, then moved);
    # torch.manual_seed would also queue a lazy CUDA seeding that records a stack trace on every call.
    torch.default_generator.manual_seed(settings.seed)
    model = build_model(settings.model.name, dataset, **settings.model.options)
    if pretrained and settings.model.weights is not None:
        from fedpower.models.weights import apply_weights, load_weights

        apply_weights(model, load_weights(settings.model.weights), settings.model.weights)
    return model
