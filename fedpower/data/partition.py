"""``partition``: split a data set's training examples among clients as index arrays.

The partitioners are ``flwr_datasets``' (IidPartitioner, DirichletPartitioner,
PathologicalPartitioner, ShardPartitioner, NaturalIdPartitioner). They work on a Hugging Face
``datasets.Dataset``; we give them a small table built from the labels (or natural ids) with an
``index`` column, so each partition they return is read back as indices into the one shared
``x_train`` — no example is ever copied.

Before partitioning, the rows are put in a seeded random order: flwr's IidPartitioner takes
contiguous blocks and the label-based ones take classes in row order, so without it a data set
stored sorted (by device, by time) would leak that order into the clients.

``iid``, ``dirichlet`` and ``natural`` always use numpy re-implementations of the same algorithms
that consume the same random numbers, so they give *identical* partitions (tested against flwr's)
without importing HF ``datasets`` (pyarrow, pandas) — which matters on an edge client that starts a
fresh process per message. ``pathological`` and ``shard`` use flwr's partitioners; without
``flwr-datasets`` they raise a DataError naming the extra to install.
"""

from __future__ import annotations

import importlib
import math
import warnings
from typing import Any
from unittest import mock

import numpy as np

from fedpower.data.base import SIM_EXTRA_HINT, DataError, Dataset

#: accepted parameters of each partition kind (their defaults are documented in ``partition``)
PARTITION_PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha", "min_partition_size", "self_balancing"),
    "pathological": ("classes_per_client", "class_assignment"),
    "shard": ("shards_per_client", "shard_size"),
    "natural": (),
}
#: every value ``partition`` accepts as ``kind``
PARTITION_KINDS: tuple[str, ...] = tuple(PARTITION_PARAMS)
_NUMPY_KINDS = ("iid", "dirichlet", "natural")  # kinds with a numpy fallback


def partition(dataset: Dataset, num_clients: int, kind: str, *, seed: int = 0, **params: Any) -> list[np.ndarray]:
    """Split ``dataset.x_train`` among ``num_clients``: one sorted int64 index array per client.

    Kinds and parameters:

    - ``iid``: uniform random, sizes differ by at most one. Covers every example once.
    - ``dirichlet``: per class, client shares ~ Dir(``alpha``) (default 0.5; small = skewed);
      redrawn (at most 10 times) until every client has ``min_partition_size`` examples
      (default 1); ``self_balancing`` (default False)
      stops feeding clients above the average size. Covers every example once.
    - ``pathological``: each client gets ``classes_per_client`` classes (default 2), each
      class split evenly among the clients holding it. ``class_assignment`` is flwr's mode:
      "first-deterministic" (default: client i surely gets class i mod C, so all classes are used
      when num_clients >= classes), "deterministic" or "random". Examples of classes no client
      drew are left out.
    - ``shard``: rows sorted by label cut into shards, ``shards_per_client`` (default 2) random
      shards per client, or shards of ``shard_size`` examples. Covers every example once (the
      last, smaller shard is kept; some clients may get one shard more).
    - ``natural``: one client per natural id (``dataset.natural_ids``, e.g. a Shakespeare role),
      in ascending id order. With fewer clients than ids, a seeded random subset of ids is used
      (like LEAF's user sampling) and the other ids' examples are left out.

    Deterministic for a given ``seed``; every client is non-empty.
    """
    if kind not in PARTITION_PARAMS:
        raise DataError(f"unknown partition kind {kind!r}; valid kinds: {', '.join(PARTITION_KINDS)}")
    unknown = sorted(set(params) - set(PARTITION_PARAMS[kind]))
    if unknown:
        accepted = ", ".join(PARTITION_PARAMS[kind]) or "none"
        raise DataError(f"unknown parameter(s) {', '.join(unknown)} for partition kind {kind!r}; accepted: {accepted}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"partition seed must be a non-negative integer, got {seed!r}")
    labels = np.asarray(dataset.y_train)
    num_examples = len(labels)
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}")
    num_clients = int(num_clients)
    if num_clients > num_examples:
        raise DataError(
            f"cannot split {num_examples} training examples of {dataset.name!r} among {num_clients} clients: "
            "every client needs at least one example"
        )
    if kind == "natural":
        if dataset.natural_ids is None:
            raise DataError(
                f"partition kind 'natural' needs natural client ids, and data set {dataset.name!r} has none; "
                "use iid, dirichlet, pathological or shard"
            )
        num_ids = len(np.unique(dataset.natural_ids))
        if num_clients > num_ids:
            raise DataError(
                f"data set {dataset.name!r} has {num_ids} natural clients, fewer than num_clients={num_clients}"
            )

    if kind in _NUMPY_KINDS:
        # The numpy versions return flwr's partitions (tested) without importing HF datasets, pyarrow and
        # pandas: ~190 MiB and 1.5 s in every ClientApp process (one per message on a SuperNode), and server
        # and nodes agree whether or not the [sim] extra is installed on each.
        parts = _partition_numpy(dataset, num_clients, kind, int(seed), params)
    else:
        flwr = _flwr_partitioners()
        if flwr is None:
            raise DataError(f"partition kind {kind!r} needs the 'flwr-datasets' package: {SIM_EXTRA_HINT}")
        parts = _partition_flwr(flwr, dataset, num_clients, kind, int(seed), params)

    parts = [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
    empty = [client for client, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise DataError(
            f"partition {kind!r} left {len(empty)} of {num_clients} clients without data; "
            "use fewer clients or different parameters"
        )
    return parts


def _flwr_partitioners() -> Any | None:
    """The ``flwr_datasets.partitioner`` module, or None where flwr-datasets/datasets are missing."""
    try:
        return importlib.import_module("flwr_datasets.partitioner")
    except ImportError:
        return None


def _row_order(num_examples: int, seed: int) -> np.ndarray:
    """Seeded random row order; a stream distinct from the partitioner's own ``default_rng(seed)``."""
    return np.random.default_rng([seed, 1]).permutation(num_examples)


def _dirichlet_settings(params: dict[str, Any]) -> tuple[float, int, bool]:
    """Validated (alpha, min_partition_size, self_balancing) with fedpower's defaults."""
    alpha = float(params.get("alpha", 0.5))
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be positive, got {alpha}")
    # Default 1 (no empty client), not flwr's 10: flwr redraws at most 10 times, and with 10 the
    # common mnist1d setting (4000 examples, 100 clients, alpha 0.3) fails every time.
    min_size = int(params.get("min_partition_size", 1))
    if min_size < 1:
        raise DataError("dirichlet min_partition_size must be at least 1 (no client may be empty)")
    return alpha, min_size, bool(params.get("self_balancing", False))


def _partition_flwr(
    flwr: Any, dataset: Dataset, num_clients: int, kind: str, seed: int, params: dict[str, Any]
) -> list[np.ndarray]:
    """Run the flwr_datasets partitioner for ``kind`` and read the partitions back as indices."""
    import datasets

    labels = np.asarray(dataset.y_train)
    if kind == "natural":
        table = {"index": np.arange(len(labels)), "natural_id": np.asarray(dataset.natural_ids)}
    else:
        order = _row_order(len(labels), seed)
        table = {"index": order, "label": labels[order]}
    # Arrow format: flwr reads whole label columns with np.array(dataset[column]); in the default
    # and numpy formats that converts row by row (seconds for 10^5 rows), with Arrow it is a view.
    rows = datasets.Dataset.from_dict(table).with_format("arrow")
    wanted = range(num_clients)

    if kind == "iid":
        partitioner = flwr.IidPartitioner(num_partitions=num_clients)
    elif kind == "dirichlet":
        alpha, min_size, balancing = _dirichlet_settings(params)
        partitioner = flwr.DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=alpha,
            min_partition_size=min_size, self_balancing=balancing, seed=seed,
        )
    elif kind == "pathological":
        partitioner = flwr.PathologicalPartitioner(
            num_partitions=num_clients, partition_by="label",
            num_classes_per_partition=int(params.get("classes_per_client", 2)),
            class_assignment_mode=params.get("class_assignment", "first-deterministic"), seed=seed,
        )
    elif kind == "shard":
        partitioner = flwr.ShardPartitioner(
            num_partitions=num_clients, partition_by="label", num_shards_per_partition=None,
            shard_size=_shard_size(len(labels), num_clients, params), keep_incomplete_shard=True, seed=seed,
        )
    else:  # natural
        partitioner = flwr.NaturalIdPartitioner(partition_by="natural_id")
        wanted = _natural_subset(len(np.unique(dataset.natural_ids)), num_clients, seed)
    partitioner.dataset = rows

    natural_module = importlib.import_module("flwr_datasets.partitioner.natural_id_partitioner")
    try:
        # NaturalIdPartitioner wraps a per-example loop in an unconditional tqdm bar; silence it.
        quiet_tqdm = mock.patch.object(natural_module, "tqdm", lambda iterable, **_: iterable)
        with quiet_tqdm, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parts = [partitioner.load_partition(client)["index"].to_numpy() for client in wanted]
    except (ValueError, TypeError) as error:  # flwr reports impossible configurations this way
        hint = "; raise alpha, lower min_partition_size or use fewer clients" if kind == "dirichlet" else ""
        raise DataError(f"cannot build {kind!r} partition for {num_clients} clients: {error}{hint}") from error
    _reemit(caught, kind)
    return parts


def _reemit(caught: list[warnings.WarningMessage], kind: str) -> None:
    """Pass flwr's warnings on, but one summary for Dirichlet redraws and none for pyarrow's sort."""
    redraws = 0
    for item in caught:
        message = str(item.message)
        if "Specifying null_placement" in message:  # pyarrow deprecation inside datasets' sort()
            continue
        if "min_partition_size" in message and "was not satisfied" in message:
            redraws += 1  # DirichletPartitioner warns once per redraw
            continue
        warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    if redraws:
        warnings.warn(
            f"{kind} partition: {redraws} redraw(s) were needed to give every client min_partition_size examples",
            stacklevel=4,
        )


def _shard_size(num_examples: int, num_clients: int, params: dict[str, Any]) -> int:
    """Shard size from ``shard_size`` or ``shards_per_client`` (not both)."""
    if "shard_size" in params and "shards_per_client" in params:
        raise DataError("give shard partitioning either shards_per_client or shard_size, not both")
    if "shard_size" in params:
        size = int(params["shard_size"])
    else:
        shards_per_client = int(params.get("shards_per_client", 2))
        if shards_per_client < 1:
            raise DataError(f"shards_per_client must be at least 1, got {shards_per_client}")
        size = math.ceil(num_examples / (num_clients * shards_per_client))
    if size < 1:
        raise DataError(f"shard_size must be at least 1, got {size}")
    return size


def _natural_subset(num_ids: int, num_clients: int, seed: int) -> np.ndarray:
    """Which natural partitions become clients: all of them, or a seeded random subset, ascending."""
    if num_clients == num_ids:
        return np.arange(num_ids)
    return np.sort(np.random.default_rng([seed, 2]).choice(num_ids, size=num_clients, replace=False))


# --------------------------------------------------------------------------------------------
# numpy fallback: the same algorithms as flwr_datasets, drawing the same random numbers


def _partition_numpy(dataset: Dataset, num_clients: int, kind: str, seed: int, params: dict[str, Any]) -> list[np.ndarray]:
    """Partition without flwr-datasets, identical to what the flwr path returns."""
    labels = np.asarray(dataset.y_train)
    if kind == "natural":
        ids = np.asarray(dataset.natural_ids)
        unique_ids = np.unique(ids)
        chosen = _natural_subset(len(unique_ids), num_clients, seed)
        return [np.flatnonzero(ids == unique_ids[client]) for client in chosen]
    order = _row_order(len(labels), seed)
    if kind == "iid":
        return list(np.array_split(order, num_clients))  # = datasets' contiguous shard()
    alpha, min_size, balancing = _dirichlet_settings(params)
    positions = _dirichlet_positions(labels[order], num_clients, alpha, min_size, balancing, seed)
    return [order[np.asarray(pos, dtype=np.int64)] for pos in positions]


def _dirichlet_positions(
    targets: np.ndarray, num_clients: int, alpha: float, min_size: int, balancing: bool, seed: int
) -> list[list[int]]:
    """flwr's DirichletPartitioner algorithm on row positions (up to 10 resampling tries)."""
    rng = np.random.default_rng(seed)
    alphas = np.full(num_clients, alpha)
    average = len(targets) / num_clients
    for _attempt in range(11):
        assigned: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(targets):
            members = np.nonzero(targets == label)[0]
            shares = rng.dirichlet(alphas)
            if balancing:
                shares = np.where([len(a) > average for a in assigned], 0.0, shares)
                shares = shares / shares.sum()
            cuts = (np.cumsum(shares) * len(members)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                assigned[client].extend(chunk.tolist())
        if min(len(a) for a in assigned) >= min_size:
            if _attempt:  # the same summary the flwr path gives for its per-redraw warnings
                warnings.warn(f"dirichlet partition: {_attempt} redraw(s) were needed to give every client "
                              "min_partition_size examples", stacklevel=4)
            for indices in assigned:
                rng.shuffle(indices)  # flwr shuffles each partition; keeps the random stream aligned
            return assigned
    raise DataError(
        f"dirichlet partition: no draw in 11 tries gave every client {min_size} examples; "
        "raise alpha, lower min_partition_size or use fewer clients"
    )
