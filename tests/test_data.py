"""Data sets (generated, shipped and local files) and client partitioning."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # flwr_datasets would post usage events

import numpy as np
import pytest

from fedpower.data import DATASET_NAMES, PARTITION_KINDS, DataError, Dataset, load_dataset, partition

partition_module = sys.modules["fedpower.data.partition"]  # the package attribute is the function


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory: pytest.TempPathFactory):
    """One throw-away FEDPOWER_CACHE for the session, so mnist1d is generated only once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDPOWER_CACHE", str(tmp_path_factory.mktemp("fedpower-cache")))
        yield


@pytest.fixture(scope="session")
def mnist1d(cache_env) -> Dataset:
    return load_dataset("mnist1d")


@pytest.fixture(scope="session")
def synthetic() -> Dataset:
    return load_dataset("synthetic", num_devices=12, max_samples_per_device=400, seed=3)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="session")
def shakespeare() -> Dataset:
    return load_dataset("shakespeare", plays=["hamlet", "macbeth"], max_examples=3000)


def _check_arrays(data: Dataset) -> None:
    """Common invariants of every loaded data set."""
    assert data.x_train.shape[1:] == data.x_test.shape[1:] == data.input_shape
    assert len(data.x_train) == len(data.y_train) > 0 and len(data.x_test) == len(data.y_test) > 0
    assert data.y_train.dtype == data.y_test.dtype == np.int64
    for y in (data.y_train, data.y_test):
        assert y.min() >= 0 and y.max() < data.num_classes
    if data.task == "classification":
        assert data.x_train.dtype == data.x_test.dtype == np.float32
        assert np.isfinite(data.x_train).all()
    if data.natural_ids is not None:
        assert data.natural_ids.shape == data.y_train.shape and data.natural_ids.dtype == np.int64


def _rows(x: np.ndarray, y: np.ndarray) -> set[bytes]:
    return {np.append(row.ravel().astype(np.float64), label).tobytes() for row, label in zip(x, y)}


def _disjoint(data: Dataset) -> bool:
    return not (_rows(data.x_train, data.y_train) & _rows(data.x_test, data.y_test))


# --------------------------------------------------------------------------------------------
# built-in data sets


def test_mnist1d_shapes_and_own_split(mnist1d: Dataset) -> None:
    _check_arrays(mnist1d)
    assert (mnist1d.num_train, mnist1d.num_test, mnist1d.input_shape, mnist1d.num_classes) == (4000, 1000, (40,), 10)
    assert _disjoint(mnist1d)


def test_mnist1d_is_deterministic_cached_and_leaves_global_rng_alone(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDPOWER_CACHE", str(tmp_path / "a"))
    np.random.seed(123), random.seed(123)
    expected_numpy, expected_python = np.random.random(), random.random()
    np.random.seed(123), random.seed(123)
    first = load_dataset("mnist1d", num_samples=400)
    assert (np.random.random(), random.random()) == (expected_numpy, expected_python)
    cached = sorted((tmp_path / "a").iterdir(), key=lambda f: f.suffix)
    # the data and mnist1d's remembered default args; no temp file left behind
    assert [f.suffix for f in cached] == [".json", ".npz"], cached
    again = load_dataset("mnist1d", num_samples=400)  # from the cache
    monkeypatch.setenv("FEDPOWER_CACHE", str(tmp_path / "b"))
    fresh = load_dataset("mnist1d", num_samples=400)  # generated again elsewhere
    for other in (again, fresh):
        np.testing.assert_array_equal(first.x_train, other.x_train)
        np.testing.assert_array_equal(first.y_test, other.y_test)
    assert first.num_train == 320
    different = load_dataset("mnist1d", num_samples=400, generator_seed=7)
    assert not np.array_equal(first.x_train, different.x_train)


def test_mnist1d_cache_hit_does_not_import_mnist1d(tmp_path: Path) -> None:
    """A process that finds mnist1d's data in the cache loads it without importing mnist1d (and matplotlib)."""
    script = ("import sys; from fedpower.data import load_dataset; d = load_dataset('mnist1d', num_samples=400); "
              "print(d.num_train, sorted(m for m in ('mnist1d', 'matplotlib', 'scipy') if m in sys.modules))")
    env = {**os.environ, "FEDPOWER_CACHE": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    assert runs[0].stdout.split()[0] == "320" and "mnist1d" in runs[0].stdout  # generated: mnist1d was needed
    assert runs[1].stdout.strip() == "320 []", runs[1].stdout  # cached: nothing of mnist1d imported


def test_digits_images_and_stratified_split(digits: Dataset) -> None:
    _check_arrays(digits)
    assert digits.input_shape == (1, 8, 8) and digits.num_train + digits.num_test == 1797
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    assert _disjoint(digits)
    test_share = np.bincount(digits.y_test) / np.bincount(digits.y_train, minlength=10).astype(float)
    assert np.allclose(test_share, 0.25, atol=0.03)  # 20 % of each class held out
    reseeded = load_dataset("digits", seed=1)
    assert not np.array_equal(reseeded.y_train, digits.y_train)
    np.testing.assert_array_equal(load_dataset("digits").x_test, digits.x_test)


def test_synthetic_natural_devices(synthetic: Dataset) -> None:
    _check_arrays(synthetic)
    assert synthetic.input_shape == (60,) and synthetic.num_classes == 10
    assert set(np.unique(synthetic.natural_ids)) == set(range(12))
    assert _disjoint(synthetic)
    again = load_dataset("synthetic", num_devices=12, max_samples_per_device=400, seed=3)
    np.testing.assert_array_equal(again.x_train, synthetic.x_train)
    iid = load_dataset("synthetic", num_devices=5, iid=True, num_classes=4, num_features=8)
    assert iid.input_shape == (8,) and iid.num_classes == 4


def test_shakespeare_next_char_per_role(shakespeare: Dataset) -> None:
    from fedpower.data.shakespeare import NUM_CHARS, decode, encode

    _check_arrays(shakespeare)
    assert shakespeare.task == "next_char" and shakespeare.input_shape == (80,)
    assert shakespeare.x_train.dtype == np.int64 and shakespeare.num_classes == NUM_CHARS
    assert shakespeare.num_train + shakespeare.num_test <= 3000
    roles = shakespeare.info["roles"]
    assert np.array_equal(np.unique(shakespeare.natural_ids), np.arange(len(roles)))
    assert any(role.endswith("/HAMLET") for role in roles) and all(r.split("/")[0] in ("hamlet", "macbeth") for r in roles)
    assert _disjoint(shakespeare)
    assert decode(encode("To be, or not to be")) == "To be, or not to be"
    assert encode("é")[0] == 0  # outside the fixed vocabulary


def test_shakespeare_options() -> None:
    data = load_dataset("shakespeare", plays=["macbeth"], seq_len=20, stride=5, max_examples=None, test_fraction=0.1)
    assert data.input_shape == (20,) and data.num_test < data.num_train
    with pytest.raises(DataError, match="unknown play"):
        load_dataset("shakespeare", plays=["hamlett"])


# --------------------------------------------------------------------------------------------
# local files


def test_npz_uint8_images_without_test_arrays(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 6, 5), dtype=np.uint8)
    y = np.repeat(np.arange(5), 10)
    np.savez(tmp_path / "gray.npz", x=x, y=y)
    data = load_dataset("npz", path=str(tmp_path / "gray.npz"), test_fraction=0.2)
    _check_arrays(data)
    assert data.input_shape == (1, 6, 5) and (data.num_train, data.num_test) == (40, 10)
    assert data.x_train.max() <= 1.0 and _disjoint(data)

    rgb = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=rgb, y=np.arange(30) % 3)
    data = load_dataset("npz", path=str(tmp_path / "rgb.npz"))
    assert data.input_shape == (3, 4, 4)
    original = rgb.reshape(30, -1)  # find one example back to check the channel layout
    row = int(np.flatnonzero((original == (data.x_train[0].transpose(1, 2, 0) * 255).round().reshape(-1)).all(1))[0])
    np.testing.assert_allclose(data.x_train[0][2], rgb[row][:, :, 2] / 255.0, atol=1e-6)


def test_npz_float_features_with_test_arrays(tmp_path) -> None:
    rng = np.random.default_rng(1)
    arrays = {
        "x": rng.normal(size=(20, 7)),
        "y": np.arange(20) % 4,
        "x_test": rng.normal(size=(6, 7)).astype(np.float32),
        "y_test": np.arange(6) % 4,
    }
    np.savez(tmp_path / "f.npz", **arrays)
    data = load_dataset("npz", path=str(tmp_path / "f.npz"))
    _check_arrays(data)
    np.testing.assert_allclose(data.x_train, arrays["x"].astype(np.float32))
    np.testing.assert_array_equal(data.y_test, arrays["y_test"])
    assert data.num_classes == 4


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 2))}, "lacks array"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, dtype=int)}, "same number of rows"),
        ({"x": np.zeros((4, 2)), "y": np.array([0.5, 1, 0, 1])}, "integer"),
        ({"x": np.full((4, 2), np.nan), "y": np.array([0, 1, 0, 1])}, "NaN"),
        ({"x": np.zeros(4), "y": np.array([0, 1, 0, 1])}, "shape"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, -1, 0, 1])}, "non-negative"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 0, 1]), "x_test": np.zeros((2, 2))}, "both x_test and y_test"),
        ({"x": np.zeros((4, 2)), "y": np.arange(4) % 2, "x_test": np.zeros((2, 3)), "y_test": np.zeros(2, int)}, "shape"),
        ({"x": np.array(["a", "b"]), "y": np.array([0, 1])}, "numeric"),
    ],
)
def test_npz_bad_arrays(tmp_path, arrays, message) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset("npz", path=str(tmp_path / "bad.npz"))


def test_missing_and_foreign_files_name_the_path(tmp_path) -> None:
    for kind in ("npz", "parquet", "csv", "hf"):
        missing = tmp_path / f"nothing-here.{'parquet' if kind == 'hf' else kind}"
        with pytest.raises(DataError, match="nothing-here"):
            load_dataset(kind, path=str(missing))
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(DataError, match="text.npz"):
        load_dataset("npz", path=str(tmp_path / "text.npz"))
    with pytest.raises(DataError, match="data.path"):
        load_dataset("csv")


def _table(rows: int = 40):
    import pandas as pd

    rng = np.random.default_rng(2)
    species = rng.choice(["fir", "oak", "yew"], rows)
    return pd.DataFrame({"a": rng.random(rows), "b": rng.integers(0, 9, rows), "species": species})


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_tables_with_a_label_column(tmp_path, kind) -> None:
    frame = _table()
    file = tmp_path / f"t.{kind}"
    frame.to_parquet(file) if kind == "parquet" else frame.to_csv(file, index=False)
    data = load_dataset(kind, path=str(file), label_column="species", seed=4)
    _check_arrays(data)
    assert data.input_shape == (2,) and data.num_classes == 3 and data.info["class_names"] == ["fir", "oak", "yew"]
    assert data.num_train + data.num_test == 40 and _disjoint(data)
    numeric = frame.assign(species=frame["species"].map({"fir": 0, "oak": 1, "yew": 2}))
    numeric.to_csv(tmp_path / "n.csv", index=False)
    assert load_dataset("csv", path=str(tmp_path / "n.csv"), label_column="species").num_classes == 3
    with pytest.raises(DataError, match="no label column 'label'"):
        load_dataset(kind, path=str(file))
    frame.to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(DataError, match="species"):  # a text column used as a feature
        load_dataset("csv", path=str(tmp_path / "text.csv"), label_column="b")


def test_hf_on_a_local_parquet_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDPOWER_CACHE", str(tmp_path / "cache"))
    frame = _table()
    frame.to_parquet(tmp_path / "t.parquet")
    data = load_dataset("hf", path=str(tmp_path / "t.parquet"), label_column="species", seed=4)
    table = load_dataset("parquet", path=str(tmp_path / "t.parquet"), label_column="species", seed=4)
    np.testing.assert_array_equal(data.x_train, table.x_train)
    np.testing.assert_array_equal(data.y_test, table.y_test)
    with pytest.raises(DataError, match="accepted: subset"):
        load_dataset("hf", path=str(tmp_path / "t.parquet"), label_column="species", splitt="x")


def test_hf_local_folder_with_test_split(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDPOWER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "splits"
    folder.mkdir()
    frame = _table()
    frame.to_parquet(folder / "train.parquet")
    test = frame[frame["species"] != "fir"].head(9).reset_index(drop=True)  # lacks one class
    test.to_parquet(folder / "test.parquet")
    data = load_dataset("hf", path=str(folder), label_column="species")
    assert (data.num_train, data.num_test) == (40, 9) and data.info["test_split"] == "test"
    oak_and_yew = np.isin(data.y_test, [1, 2])  # numbered like the train split: fir 0, oak 1, yew 2
    assert oak_and_yew.all()


def test_hf_image_column_becomes_channels_first(tmp_path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    monkeypatch.setenv("FEDPOWER_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (12, 6, 5, 3), dtype=np.uint8)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    columns = {"img": [Image.fromarray(p) for p in pixels], "label": list(range(3)) * 4}
    table = datasets.Dataset.from_dict(columns, features=features)
    table.to_parquet(str(tmp_path / "images.parquet"))
    data = load_dataset("hf", path=str(tmp_path / "images.parquet"), test_fraction=0.25)
    _check_arrays(data)
    assert data.input_shape == (3, 6, 5) and (data.num_train, data.num_test) == (9, 3)
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


def test_hf_without_datasets_names_the_extra(tmp_path, monkeypatch) -> None:
    _table().to_parquet(tmp_path / "t.parquet")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes "import datasets" fail
    with pytest.raises(DataError, match=r"fedpower\[sim\]"):
        load_dataset("hf", path=str(tmp_path / "t.parquet"))


def test_unknown_data_set_and_options() -> None:
    with pytest.raises(DataError, match="valid names: " + ", ".join(DATASET_NAMES)):
        load_dataset("cifar100")
    with pytest.raises(DataError, match="accepted: alpha"):
        load_dataset("synthetic", alpah=0.5)
    with pytest.raises(DataError, match="num_samples"):
        load_dataset("mnist1d", num_sample=10)
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)
    with pytest.raises(DataError, match="reads no file"):
        load_dataset("digits", path="digits.npz")


# --------------------------------------------------------------------------------------------
# partitioning


def _covers_exactly_once(parts: list[np.ndarray], size: int) -> bool:
    joined = np.concatenate(parts)
    return len(joined) == size and np.array_equal(np.sort(joined), np.arange(size))


@pytest.mark.parametrize(
    "kind, params",
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.5}),
        ("shard", {"shards_per_client": 2}),
        ("shard", {"shard_size": 35}),
        ("pathological", {"classes_per_client": 2}),
    ],
)
def test_partitions_are_valid_deterministic_and_seeded(digits: Dataset, kind: str, params: dict) -> None:
    parts = partition(digits, 10, kind, seed=0, **params)
    assert len(parts) == 10 and all(len(p) > 0 and p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # no example on two clients
    if kind == "pathological":  # what it guarantees: exactly k classes per client
        assert all(len(np.unique(digits.y_train[p])) == 2 for p in parts)
        assert len(np.unique(digits.y_train[joined])) == 10  # first-deterministic uses every class
    else:
        assert _covers_exactly_once(parts, digits.num_train)
    same = partition(digits, 10, kind, seed=0, **params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    other = partition(digits, 10, kind, seed=1, **params)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_shard_clients_hold_few_labels(digits: Dataset) -> None:
    parts = partition(digits, 20, "shard", shards_per_client=2)
    assert np.mean([len(np.unique(digits.y_train[p])) for p in parts]) <= 4


def test_natural_partition(synthetic: Dataset) -> None:
    parts = partition(synthetic, 12, "natural", seed=0)
    assert _covers_exactly_once(parts, synthetic.num_train)
    assert [int(np.unique(synthetic.natural_ids[p])[0]) for p in parts] == list(range(12))
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition(synthetic, 12, "natural", seed=5)))
    subset = partition(synthetic, 5, "natural", seed=0)
    assert all(len(np.unique(synthetic.natural_ids[p])) == 1 for p in subset)
    assert any(any(np.array_equal(a, b) for b in parts) for a in subset)
    assert not all(np.array_equal(a, b) for a, b in zip(subset, partition(synthetic, 5, "natural", seed=1)))


def test_dirichlet_small_alpha_is_more_skewed(digits: Dataset) -> None:
    def mean_label_entropy(alpha: float) -> float:
        entropies = []
        for part in partition(digits, 10, "dirichlet", alpha=alpha, seed=0):
            shares = np.bincount(digits.y_train[part], minlength=10) / len(part)
            shares = shares[shares > 0]
            entropies.append(-(shares * np.log(shares)).sum())
        return float(np.mean(entropies))

    assert mean_label_entropy(0.1) < mean_label_entropy(1.0) < mean_label_entropy(100.0)
    assert mean_label_entropy(100.0) > 0.95 * np.log(10)


def test_numpy_fallback_matches_flwr(synthetic: Dataset, monkeypatch) -> None:
    cases = [
        ("iid", 7, {}),
        ("dirichlet", 6, {"alpha": 0.3}),
        ("dirichlet", 6, {"alpha": 0.2, "self_balancing": True}),
        ("natural", 12, {}),
        ("natural", 4, {}),
    ]
    flwr = partition_module._flwr_partitioners()
    assert flwr is not None  # the dev install has flwr-datasets: compare against its partitioners
    expected = [[np.sort(p) for p in partition_module._partition_flwr(flwr, synthetic, n, kind, 2, dict(params))]
                for kind, n, params in cases]
    monkeypatch.setattr(partition_module, "_flwr_partitioners", lambda: None)  # as on a bare edge install
    for (kind, n, params), flwr_parts in zip(cases, expected):
        numpy_parts = partition(synthetic, n, kind, seed=2, **params)
        assert len(numpy_parts) == len(flwr_parts) == n, kind
        assert all(np.array_equal(a, b) for a, b in zip(flwr_parts, numpy_parts)), kind
    with pytest.raises(DataError, match=r"fedpower\[sim\]"):
        partition(synthetic, 4, "shard")


def test_partition_errors(digits: Dataset, synthetic: Dataset) -> None:
    with pytest.raises(DataError, match="1438 training examples"):
        partition(digits, 5000, "iid")
    with pytest.raises(DataError, match="natural client ids"):
        partition(digits, 10, "natural")
    with pytest.raises(DataError, match="12 natural clients"):
        partition(synthetic, 13, "natural")
    with pytest.raises(DataError, match="valid kinds: " + ", ".join(PARTITION_KINDS)):
        partition(digits, 10, "by-label")
    with pytest.raises(DataError, match="accepted: alpha"):
        partition(digits, 10, "dirichlet", beta=1.0)
    with pytest.raises(DataError, match="not both"):
        partition(digits, 10, "shard", shard_size=10, shards_per_client=2)
    with pytest.raises(DataError, match="num_clients"):
        partition(digits, 0, "iid")
    with pytest.raises(DataError):
        partition(digits, 10, "pathological", classes_per_client=11)
    with pytest.raises(DataError, match="dirichlet"):  # 143 examples each is impossible at alpha 0.01
        partition(digits, 10, "dirichlet", alpha=0.01, min_partition_size=143)
