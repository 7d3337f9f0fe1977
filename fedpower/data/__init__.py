"""Data sets and client partitioning (offline only; see DESIGN §4).

    dataset = load_dataset("mnist1d")
    client_indices = partition(dataset, num_clients=100, kind="dirichlet", alpha=0.5, seed=0)
    x0, y0 = dataset.x_train[client_indices[0]], dataset.y_train[client_indices[0]]
"""

from fedpower.data.base import DataError, Dataset
from fedpower.data.datasets import DATASET_NAMES, load_dataset
from fedpower.data.holdout import split_holdout
from fedpower.data.partition import PARTITION_KINDS, PARTITION_PARAMS, partition

__all__ = [
    "DATASET_NAMES",
    "PARTITION_KINDS",
    "PARTITION_PARAMS",
    "DataError",
    "Dataset",
    "load_dataset",
    "partition",
    "split_holdout",
]
