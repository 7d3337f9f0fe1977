"""Client state stores: exact round trips, versions by round, atomic writes, pruning, damaged files."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from clients.state_store import DiskStore, MemoryStore, make_store


def _state(seed: int, n: int = 12) -> dict[str, np.ndarray]:
    """A codec-like state: a residual matrix, a bias residual and a warm-start factor."""
    rng = np.random.default_rng(seed)
    return {"residual/fc.weight": rng.standard_normal((n, 7)).astype(np.float32),
            "residual/fc.bias": rng.standard_normal(n).astype(np.float32),
            "inner/0/fc.weight.Q": rng.standard_normal((7, 2)).astype(np.float32)}


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Each behavioural test runs against both stores."""
    return MemoryStore() if request.param == "memory" else DiskStore(tmp_path / "state")


def _assert_same(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray]) -> None:
    """Same names, dtypes and bit-identical values."""
    assert a is not None and sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        np.testing.assert_array_equal(a[name], b[name])


def test_round_trip_fp32_is_exact(store: Any) -> None:
    """float32 state comes back bit for bit, also integer arrays (dtype kept)."""
    state = {**_state(0), "counts": np.arange(5, dtype=np.int64), "mask": np.array([True, False])}
    store.save("psgd", 3, 1, state)
    _assert_same(store.load("psgd", 3, before_round=2), state)


def test_fp16_within_tolerance_and_returned_as_fp32(tmp_path: Path) -> None:
    """dtype float16 is lossy (relative error ≤ 2^-11) and returns float32; the file is about half the size."""
    state = _state(1, n=200)
    full, half, memory = DiskStore(tmp_path / "full"), DiskStore(tmp_path / "half", dtype="float16"), MemoryStore(
        dtype="float16")
    for one in (full, half, memory):
        one.save("psgd", 0, 1, state)
    for loaded in (half.load("psgd", 0, 2), memory.load("psgd", 0, 2)):
        assert loaded is not None
        for name, value in state.items():
            assert loaded[name].dtype == np.float32
            np.testing.assert_allclose(loaded[name], value, rtol=2.0 ** -11, atol=1e-7)
            assert not np.array_equal(loaded[name], value)  # it really went through fp16
    size = {s: next(s.folder("psgd", 0).glob("*.npz")).stat().st_size for s in (full, half)}
    assert size[half] < 0.6 * size[full]


def test_fp16_overflow_is_refused(tmp_path: Path) -> None:
    """A value beyond fp16's range would silently become inf: saving it raises and names the array."""
    with pytest.raises(ValueError, match="residual/x.*float16 range"):
        DiskStore(tmp_path, dtype="float16").save("s", 0, 1, {"residual/x": np.array([1e6], np.float32)})


def test_isolated_between_partitions_and_strategies(store: Any) -> None:
    """Each (strategy, partition) sees only its own versions."""
    store.save("a", 0, 1, _state(10))
    store.save("a", 1, 1, _state(11))
    store.save("b", 0, 1, _state(12))
    _assert_same(store.load("a", 0, 5), _state(10))
    _assert_same(store.load("a", 1, 5), _state(11))
    _assert_same(store.load("b", 0, 5), _state(12))
    assert store.load("b", 1, 5) is None and store.load("c", 0, 5) is None
    assert store.load("a", 10, 5) is None  # partition 10 must not match partition 1's prefix


def test_newest_version_before_round(store: Any) -> None:
    """load(before_round=r) is the newest save of a round < r: a redone round sees the same state."""
    store.save("s", 0, 2, _state(2))
    assert store.load("s", 0, before_round=2) is None
    store.save("s", 0, 5, _state(5))
    _assert_same(store.load("s", 0, before_round=5), _state(2))  # round 5 redone after a crash
    _assert_same(store.load("s", 0, before_round=6), _state(5))
    _assert_same(store.load("s", 0, before_round=100), _state(5))  # rounds skipped in between


def test_keeps_only_two_versions(store: Any, tmp_path: Path) -> None:
    """Older versions are pruned: the newest two remain."""
    for r in (1, 2, 3, 4):
        store.save("s", 0, r, _state(r))
    assert store.load("s", 0, before_round=3) is None
    _assert_same(store.load("s", 0, before_round=4), _state(3))
    _assert_same(store.load("s", 0, before_round=5), _state(4))
    if isinstance(store, DiskStore):
        names = sorted(p.name for p in store.folder("s", 0).iterdir())
        assert names == ["round-00000003.npz", "round-00000004.npz"]


def test_saving_an_earlier_round_drops_later_versions(store: Any) -> None:
    """A rewound run (resumed from an earlier checkpoint) must not later load state from its abandoned future."""
    for r in (3, 4):
        store.save("s", 0, r, _state(r))
    store.save("s", 0, 2, _state(20))
    _assert_same(store.load("s", 0, before_round=10), _state(20))


def test_crash_between_write_and_replace_keeps_old_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the process dies after writing the temp file but before the rename, the old version still loads."""
    store = DiskStore(tmp_path)
    store.save("s", 0, 1, _state(1))

    def crash(src: Any, dst: Any) -> None:
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save("s", 0, 2, _state(2))
    monkeypatch.undo()
    _assert_same(store.load("s", 0, before_round=3), _state(1))
    # A temp file left by a hard kill (no cleanup) is ignored by load and removed by the next save.
    leftover = store.folder("s", 0) / ".tmp-dead.npz.part"
    leftover.write_bytes(b"half a zip")
    _assert_same(store.load("s", 0, before_round=3), _state(1))
    store.save("s", 0, 2, _state(2))
    assert not leftover.exists()
    assert sorted(p.name for p in store.folder("s", 0).iterdir()) == ["round-00000001.npz", "round-00000002.npz"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "pickle", "nan"])
def test_damaged_newest_version_falls_back_with_warning(tmp_path: Path, damage: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A damaged file is set aside with a warning naming it; the older intact version is used instead."""
    store = DiskStore(tmp_path)
    store.save("s", 0, 1, _state(1))
    store.save("s", 0, 2, _state(2))
    newest = store.folder("s", 0) / "round-00000002.npz"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        newest.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8)))
    elif damage == "empty":
        newest.write_bytes(b"")
    elif damage == "pickle":  # an object array can only be read by unpickling: refused
        with newest.open("wb") as fh:
            np.savez(fh, **{"residual/x": np.array([{"evil": 1}], dtype=object)})
    else:
        bad = _state(2)
        bad["residual/fc.bias"][0] = np.nan
        with newest.open("wb") as fh:
            np.savez(fh, **bad)
    with caplog.at_level(logging.WARNING, logger="fedpower.client.state"):
        loaded = store.load("s", 0, before_round=3)
    _assert_same(loaded, _state(1))
    assert "round-00000002.npz" in caplog.text
    assert (store.folder("s", 0) / "round-00000002.npz.corrupt").exists()
    assert store.load("s", 0, before_round=3) is not None  # set aside: no second warning needed


def test_only_version_damaged_gives_fresh_state(tmp_path: Path) -> None:
    """With no intact version left the store returns None: the client starts a fresh state."""
    store = DiskStore(tmp_path)
    store.save("s", 0, 1, _state(1))
    (store.folder("s", 0) / "round-00000001.npz").write_bytes(b"PK\x03\x04broken")
    assert store.load("s", 0, before_round=2) is None


def test_refuses_unsafe_names_and_object_arrays(tmp_path: Path) -> None:
    """Strategy names become path parts: separators and '..' are refused; object arrays are never pickled."""
    store = DiskStore(tmp_path)
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(ValueError, match="cannot key client state"):
            store.save(bad, 0, 1, _state(0))
    with pytest.raises(TypeError, match="dtype object"):
        store.save("s", 0, 1, {"x": np.array([None], dtype=object)})
    with pytest.raises(ValueError, match="float32 or float16"):
        DiskStore(tmp_path, dtype="float64")  # type: ignore[arg-type]


def _context(node_config: dict[str, Any]) -> Context:
    """A node context as Flower builds it."""
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_make_store_picks_the_configured_store(tmp_path: Path) -> None:
    """Default memory (in Context.state); disk from the YAML block; node-config state-dir wins."""
    from fedpower.config import ClientStateConfig

    memory_settings = ClientStateConfig(store="memory")
    context = _context({"partition-id": 0})
    memory = make_store(memory_settings, "my exp", context)
    assert isinstance(memory, MemoryStore) and memory.state is context.state
    memory.save("s", 0, 1, _state(0))
    _assert_same(make_store(memory_settings, "my exp", context).load("s", 0, 2), _state(0))  # survives across calls

    node = make_store(memory_settings, "my exp", _context({"partition-id": 0, "state-dir": str(tmp_path / "node")}))
    assert isinstance(node, DiskStore) and node.directory == tmp_path / "node" / "my_exp"

    disk = ClientStateConfig(store="disk", dir=str(tmp_path / "yaml"), dtype="float16")
    chosen = make_store(disk, "my exp", _context({}))
    assert isinstance(chosen, DiskStore) and chosen.dtype == "float16"
    assert chosen.directory == tmp_path / "yaml" / "my_exp"

    with pytest.raises(ValueError, match="client_state.dir"):
        make_store(ClientStateConfig(store="disk"), "my exp", _context({}))


def test_disk_state_survives_a_new_store_object(tmp_path: Path) -> None:
    """What a restarted SuperNode does: a fresh DiskStore on the same folder finds the saved state."""
    DiskStore(tmp_path).save("s", 4, 7, _state(7))
    _assert_same(DiskStore(tmp_path).load("s", 4, before_round=8), _state(7))


def test_client_state_config_block(tmp_path: Path) -> None:
    """The YAML block validates with field-named errors and resolves dir against the YAML file's folder."""
    from fedpower.config import ConfigError, parse_config

    base = {"strategies": [{"name": "fedavg"}]}
    config = parse_config(base)
    assert config.client_state.store == "memory" and config.client_state.dir is None
    config = parse_config({**base, "client_state": {"store": "disk", "dir": "state"}}, base_dir=tmp_path)
    assert config.client_state.dir == str((tmp_path / "state").resolve())
    assert config.to_dict()["client_state"] == {"store": "disk", "dir": str((tmp_path / "state").resolve()),
                                                "dtype": "float32"}
    with pytest.raises(ConfigError, match=r"client_state\.dir"):
        parse_config({**base, "client_state": {"store": "memory", "dir": "state"}})
    with pytest.raises(ConfigError, match=r"client_state\.dtype"):
        parse_config({**base, "client_state": {"dtype": "int8"}})
    with pytest.raises(ConfigError, match=r"client_state\.store"):
        parse_config({**base, "client_state": {"store": "cloud"}})
