"""Local data files (the npz / table contract) and Hugging Face data sets via ``flwr_datasets``.

Contract (DESIGN §4):

- ``.npz`` with arrays ``x``, ``y`` and optionally ``x_test``, ``y_test``. Images are ``uint8``
  N×H×W or N×H×W×C (converted to float32 in [0, 1], channels-first C×H×W); features are
  floats N×D; labels are integers. Without test arrays, ``test_fraction`` is held out
  (stratified, seeded).
- ``.parquet`` / ``.csv``: one row per example, a label column (``label_column``), every other
  column a numeric feature. Integer labels are kept as is; text labels are numbered in sorted
  order (the names are kept in ``Dataset.info["class_names"]``).
- ``hf``: ``path`` is a local ``.parquet`` / ``.csv`` / ``.json`` file or a local folder of such
  files named by split (``train.parquet``, ``test.parquet``), both offline, or a Hugging Face
  Hub id (needs network), loaded with ``flwr_datasets.FederatedDataset``. Its ``test_split``
  (default "test") is used when present, otherwise ``test_fraction`` is held out. A single
  image/vector column is the example (images as in the npz contract), else numeric columns.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedpower.data.base import SIM_EXTRA_HINT, DataError, Dataset, assemble, cache_dir

_HF_LOCAL_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_HF_OPTIONS = ("subset", "train_split", "test_split")


def load_file(
    kind: str,
    *,
    path: str | None,
    seed: int,
    test_fraction: float,
    label_column: str,
    **options: Any,
) -> Dataset:
    """Load a local ``npz`` / ``parquet`` / ``csv`` file, or an ``hf`` data set."""
    if kind == "hf":
        unknown = sorted(set(options) - set(_HF_OPTIONS))
        if unknown:
            raise DataError(f"unknown option(s) {', '.join(unknown)} for data set 'hf'; accepted: {', '.join(_HF_OPTIONS)}")
        return _load_hf(path, seed=seed, test_fraction=test_fraction, label_column=label_column, **options)
    if options:
        raise DataError(f"unknown option(s) {', '.join(sorted(options))} for data set {kind!r}; accepted: none")
    file = _existing_file(path, kind)
    if kind == "npz":
        return _load_npz(file, seed=seed, test_fraction=test_fraction)
    return _load_table(file, kind, seed=seed, test_fraction=test_fraction, label_column=label_column)


def _existing_file(path: str | None, kind: str) -> Path:
    """The file at ``path``, or a DataError naming the path when it is missing."""
    if path is None:
        raise DataError(f"data set {kind!r} needs a file: set data.path")
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data file not found: {str(file)!r} (data set {kind!r})")
    return file


def _load_npz(file: Path, *, seed: int, test_fraction: float) -> Dataset:
    """Read the npz contract: ``x``, ``y`` and optionally ``x_test``, ``y_test``."""
    if not zipfile.is_zipfile(file):  # np.load would try to unpickle it and report that instead
        raise DataError(f"{str(file)!r} is not an .npz archive (np.savez writes one)")
    try:
        # allow_pickle=False: a data file must never be able to run code on load.
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"could not read {str(file)!r} as an .npz archive: {error}") from error
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise DataError(
            f"{str(file)!r} lacks array(s) {', '.join(missing)}; the npz contract is x, y and optionally "
            f"x_test, y_test (found: {', '.join(sorted(arrays)) or 'nothing'})"
        )
    try:
        return assemble(
            "npz",
            arrays["x"],
            arrays["y"],
            arrays.get("x_test"),
            arrays.get("y_test"),
            seed=seed,
            test_fraction=test_fraction,
            info={"path": str(file)},
        )
    except DataError as error:
        raise DataError(f"{str(file)!r}: {error}") from error


def _load_table(file: Path, kind: str, *, seed: int, test_fraction: float, label_column: str) -> Dataset:
    """Read a parquet / CSV table: one label column, all other columns numeric features."""
    try:
        import pandas as pd
    except ImportError:
        needs = "pandas and pyarrow" if kind == "parquet" else "pandas"
        raise DataError(f"reading {kind} files needs {needs}: {SIM_EXTRA_HINT}") from None
    try:
        frame = pd.read_parquet(file) if kind == "parquet" else pd.read_csv(file)
    except ImportError as error:  # pandas without a parquet engine
        raise DataError(f"reading parquet files needs pyarrow: {SIM_EXTRA_HINT} ({error})") from error
    except Exception as error:  # pandas/pyarrow raise many types for malformed files
        raise DataError(f"could not read {str(file)!r} as {kind}: {error}") from error
    x, y, info = _table_to_arrays(dict(frame.items()), label_column, str(file))
    info["path"] = str(file)
    return assemble(kind, x, y, seed=seed, test_fraction=test_fraction, info=info)


def _table_to_arrays(
    columns: dict[str, Any], label_column: str, source: str, class_names: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Split named columns into a float feature matrix and integer labels."""
    if label_column not in columns:
        raise DataError(f"{source!r} has no label column {label_column!r}; columns: {', '.join(map(str, columns))}")
    labels, info = _encode_labels(np.asarray(columns[label_column]), label_column, source, class_names)
    features = {name: np.asarray(values) for name, values in columns.items() if name != label_column}
    if not features:
        raise DataError(f"{source!r} has no feature columns besides the label column {label_column!r}")
    not_numeric = [str(name) for name, values in features.items() if values.dtype.kind not in "fiub"]
    if not_numeric:
        raise DataError(f"{source!r}: feature columns must be numeric, these are not: {', '.join(not_numeric)}")
    x = np.column_stack([values.astype(np.float32) for values in features.values()])
    missing = [str(name) for name, values in features.items() if not np.all(np.isfinite(values.astype(np.float64)))]
    if missing:
        raise DataError(f"{source!r}: missing or infinite values in column(s) {', '.join(missing)}")
    info["feature_names"] = [str(name) for name in features]
    return x, labels, info


def _encode_labels(
    values: np.ndarray, label_column: str, source: str, class_names: list[str] | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Integer labels pass through; text labels become ids in sorted order of their names.

    ``class_names`` (from the train split) fixes the numbering of a test split's text labels.
    """
    if values.dtype.kind in "iub" or values.dtype.kind == "f":
        if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise DataError(f"{source!r}: label column {label_column!r} has missing values")
        return values, {}
    as_text = np.array([None if v is None or v != v else str(v) for v in values.tolist()], dtype=object)
    if any(v is None for v in as_text):
        raise DataError(f"{source!r}: label column {label_column!r} has missing values")
    if class_names is None:
        class_names = sorted(set(as_text.tolist()))
    lookup = {name: index for index, name in enumerate(class_names)}
    unseen = sorted(set(as_text.tolist()) - set(lookup))
    if unseen:
        raise DataError(f"{source!r}: labels {', '.join(unseen)} of the test split never occur in the train split")
    return np.array([lookup[v] for v in as_text], dtype=np.int64), {"class_names": class_names}


# --------------------------------------------------------------------------------------------
# Hugging Face data sets through flwr_datasets


def _load_hf(
    path: str | None,
    *,
    seed: int,
    test_fraction: float,
    label_column: str,
    subset: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
) -> Dataset:
    """Load a Hub data set or a local table file with ``flwr_datasets.FederatedDataset``."""
    if path is None:
        raise DataError("data set 'hf' needs data.path: a local .parquet/.csv/.json file or a Hugging Face Hub id")
    try:
        import datasets
        from flwr_datasets import FederatedDataset
    except ImportError:
        raise DataError(f"the 'hf' data set needs the 'datasets' and 'flwr-datasets' packages: {SIM_EXTRA_HINT}") from None

    local = Path(path).expanduser()
    builder = _HF_LOCAL_BUILDERS.get(local.suffix.lower())
    looks_local = builder is not None or local.is_absolute() or path.startswith((".", "~"))
    kwargs: dict[str, Any] = {}
    if local.is_dir():  # a local folder of data files; datasets finds splits by file name
        name = str(local)
        kwargs["cache_dir"] = str(cache_dir() / "huggingface")
    elif looks_local:
        if not local.is_file():
            raise DataError(f"data file not found: {str(local)!r} (data set 'hf')")
        if builder is None:
            raise DataError(f"data set 'hf' reads local {', '.join(_HF_LOCAL_BUILDERS)} files, not {local.name!r}")
        name, kwargs["data_files"] = builder, str(local)
        # Arrow cache of a local file goes under fedpower's cache, next to our other generated
        # files; Hub downloads keep Hugging Face's default cache, shared with other tools.
        kwargs["cache_dir"] = str(cache_dir() / "huggingface")
    else:
        name = path  # a Hub id such as "ylecun/mnist": only works online
    progress_was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" bars would clutter experiment output
    try:
        # Our partition() splits the data, so FederatedDataset only loads it: one trivial
        # partition, no shuffling (the train/test split below is seeded by fedpower's seed).
        federated = FederatedDataset(
            dataset=name, subset=subset, partitioners={train_split: 1}, shuffle=False, **kwargs
        )
        train = federated.load_split(train_split)
        try:
            test = federated.load_split(test_split)
        except ValueError:  # flwr_datasets raises ValueError for a split the data set lacks
            test = None
    except Exception as error:  # network, parsing and builder errors come in many types
        raise DataError(f"could not load Hugging Face data set {path!r}: {error}") from error
    finally:
        if progress_was_enabled:
            datasets.enable_progress_bars()

    x, y, info = _hf_to_arrays(train, label_column, path)
    x_test = y_test = None
    if test is not None:  # text labels of the test split are numbered like the train split's
        x_test, y_test, _ = _hf_to_arrays(test, label_column, path, info.get("class_names"))
    info.update(source=path, train_split=train_split, test_split=test_split if test is not None else None)
    return assemble("hf", x, y, x_test, y_test, seed=seed, test_fraction=test_fraction, info=info)


def _hf_to_arrays(
    split: Any, label_column: str, source: str, class_names: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Numpy arrays of one ``datasets.Dataset`` split: an image/vector column, or numeric columns."""
    if label_column not in split.column_names:
        raise DataError(f"{source!r} has no label column {label_column!r}; columns: {', '.join(split.column_names)}")
    columns = split.with_format("numpy")[:]  # decodes Image features to uint8 arrays
    others = [name for name in split.column_names if name != label_column]
    if len(others) == 1 and np.asarray(columns[others[0]]).ndim >= 2:
        # A single image or vector column (e.g. "image" of MNIST): it is the example itself.
        labels, info = _encode_labels(np.asarray(columns[label_column]), label_column, source, class_names)
        return np.asarray(columns[others[0]]), labels, info
    return _table_to_arrays({name: columns[name] for name in split.column_names}, label_column, source, class_names)
