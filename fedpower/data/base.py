"""The in-memory data set every loader returns, its one error type, and shared array helpers.

A :class:`Dataset` holds the whole data set once; clients receive *index arrays* into
``x_train`` (see :mod:`fedpower.data.partition`), never copies. Helpers here turn raw arrays
(user files, generated data) into model-ready arrays and split off a held-out test set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: pip extra that pulls in the optional data dependencies (sklearn, pandas, flwr-datasets, ...).
SIM_EXTRA_HINT = "pip install 'fedpower[sim]'"


class DataError(ValueError):
    """A user mistake with data: missing file, malformed arrays, unknown data set or partition."""


@dataclass
class Dataset:
    """A whole data set in memory: train arrays shared by all clients plus a held-out test set."""

    name: str
    x_train: np.ndarray  # float32 (N, *input_shape) ready for the model; int64 token ids for "next_char"
    y_train: np.ndarray  # int64 (N,) class ids in [0, num_classes)
    x_test: np.ndarray  # same layout as x_train; never used in training
    y_test: np.ndarray  # int64 (M,)
    num_classes: int  # size of the output layer (vocabulary size for "next_char")
    input_shape: tuple[int, ...]  # shape of one example, i.e. x_train.shape[1:]
    natural_ids: np.ndarray | None = None  # int64 (N,) natural client id per train example, or None
    task: str = "classification"  # "classification" or "next_char" (sequence of ids -> next id)
    info: dict[str, Any] = field(default_factory=dict)  # provenance: class/role names, vocabulary, args

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of held-out test examples."""
        return int(self.y_test.shape[0])

    def __repr__(self) -> str:
        """Short summary instead of dumping the arrays."""
        natural = "" if self.natural_ids is None else f", natural_clients={len(np.unique(self.natural_ids))}"
        return (
            f"Dataset({self.name!r}, task={self.task!r}, train={self.num_train}, test={self.num_test}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}{natural})"
        )


def cache_dir() -> Path:
    """Directory for generated-data caches: ``$FEDPOWER_CACHE`` or ``~/.cache/fedpower``."""
    configured = os.environ.get("FEDPOWER_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fedpower"


def check_test_fraction(test_fraction: float) -> float:
    """Validate the held-out fraction used when a data set has no test split of its own."""
    if not isinstance(test_fraction, (int, float)) or not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
    return float(test_fraction)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into (train, test) index arrays, both sorted ascending."""
    test_fraction = check_test_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        # Round per class, but keep at least one example of every class in train: a class that
        # only exists in the test set can never be learned and would only add noise to accuracy.
        num_test = min(int(round(len(members) * test_fraction)), len(members) - 1)
        test_parts.append(members[:num_test])
        train_parts.append(members[num_test:])
    train = np.sort(np.concatenate(train_parts)).astype(np.int64)
    test = np.sort(np.concatenate(test_parts)).astype(np.int64)
    if len(test) == 0 or len(train) == 0:
        raise DataError(
            f"too few examples ({len(y)}) to hold out a test set with test_fraction={test_fraction}; "
            "provide more data or explicit test arrays"
        )
    return train, test


def as_labels(y: Any, what: str = "y") -> np.ndarray:
    """Validate integer class labels and return them as a 1-D int64 array."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # a column vector is a common export format
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{what} must be a 1-D array of integer labels, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{what} must hold integer class labels, got non-integer floats")
    elif y.dtype.kind not in "iub":
        raise DataError(f"{what} must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"{what} must hold non-negative class labels, found {int(y.min())}")
    return y


def as_features(x: Any, what: str = "x") -> np.ndarray:
    """Convert user features to float32, channels-first: uint8 images are scaled to [0, 1].

    uint8 N×H×W becomes N×1×H×W and uint8 N×H×W×C becomes N×C×H×W (the npz contract); uint8
    N×D (flattened images) is scaled too. Other numeric arrays are cast to float32 unchanged,
    assumed already model-ready.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise DataError(f"{what} must be a numeric array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{what} must have shape (N, ...) with one row per example, got shape {x.shape}")
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[:, None, :, :]
        elif x.ndim == 4 and not (x.shape[-1] > 4 and x.shape[1] <= 4):
            # The contract is N×H×W×C; only an array that is unmistakably N×C×H×W is left as is.
            x = np.transpose(x, (0, 3, 1, 2))
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what} contains NaN or infinite values")
    return np.ascontiguousarray(x)


def assemble(
    name: str,
    x: Any,
    y: Any,
    x_test: Any | None = None,
    y_test: Any | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    info: dict[str, Any] | None = None,
) -> Dataset:
    """Validate raw arrays, split off a test set if none is given, and build a :class:`Dataset`."""
    x, y = as_features(x, "x"), as_labels(y, "y")
    if len(x) != len(y):
        raise DataError(f"x and y must have the same number of rows, got {len(x)} and {len(y)}")
    if (x_test is None) != (y_test is None):
        raise DataError("give both x_test and y_test, or neither")
    if x_test is None:
        train, test = stratified_split(y, test_fraction, seed)
        x, x_test, y, y_test = x[train], x[test], y[train], y[test]
    else:
        x_test, y_test = as_features(x_test, "x_test"), as_labels(y_test, "y_test")
        if len(x_test) != len(y_test):
            raise DataError(f"x_test and y_test must have the same number of rows, got {len(x_test)} and {len(y_test)}")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"x_test examples have shape {x_test.shape[1:]} but x examples have {x.shape[1:]}")
    if len(x) == 0 or len(x_test) == 0:
        raise DataError("the training and the test set must both be non-empty")
    num_classes = int(max(y.max(), y_test.max())) + 1
    return Dataset(
        name=name,
        x_train=x,
        y_train=y,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x.shape[1:]),
        info=dict(info or {}),
    )
