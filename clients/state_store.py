"""Where a client keeps its codec state (error-feedback residual, warm-start factors) between rounds.

Two stores with one interface:

- :class:`MemoryStore` keeps the arrays in the node's ``Context.state`` (the default). Flower keeps
  that in the SuperNode's memory (in simulation: in the driver process), so a restart loses it.
- :class:`DiskStore` writes one ``.npz`` per (strategy, partition, round) under a node-local
  directory, atomically, so a device reboot or a SuperNode restart does not lose it.

Both keep **versions by round**: ``load(strategy, partition, before_round=r)`` returns the newest
state saved in a round ``< r``. A client training round ``r`` loads from rounds before ``r``, so a
round that is redone after a crash (the client may already have saved round ``r``) sees exactly the
state it saw the first time. Two versions per (strategy, partition) are kept: the newest one and the
one before it, which is what a redone round needs.

``dtype="float16"`` stores floating arrays as fp16: half the memory or disk, but lossy (a relative
error of up to about 5e-4 per value; saving a value beyond fp16's ±65504 raises ValueError). Arrays
come back as float32 either way.

A damaged file (truncated, not a zip, pickled objects, non-finite values) is never trusted: the store
logs a warning naming the file, moves it aside (``*.corrupt``) and falls back to the next older
version, or to ``None`` (the client then starts a fresh state). Writes are atomic, so damage comes
only from outside (disk faults, manual edits); a lost residual costs some accuracy, whereas a client
that fails every round until someone deletes a file costs the whole device.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, Context, RecordDict

from fedpower.atomic import atomic_savez
from fedpower.config import ClientStateConfig

log = logging.getLogger("fedpower.client.state")

StateDtype = Literal["float32", "float16"]
KEEP_VERSIONS = 2  # newest + the one before it: enough to redo the newest round exactly
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_VERSION = re.compile(r"^round-(\d{8})\.npz$")
MEMORY_PREFIX = "fedpower-state:"


class StateStore(Protocol):
    """What the ClientApp needs from a state store."""

    def load(self, strategy: str, partition: int, before_round: int) -> dict[str, np.ndarray] | None:
        """The newest saved state of a round < ``before_round``, or None."""

    def save(self, strategy: str, partition: int, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Save the state produced in ``server_round``."""


def _check_name(strategy: str) -> str:
    """A strategy name safe to use as a path part and a record key."""
    if not _NAME.match(strategy) or strategy in (".", ".."):
        raise ValueError(f"strategy name {strategy!r} cannot key client state: use letters, digits, '_', '.', '-'")
    return strategy


def _check_ids(partition: int, server_round: int) -> None:
    """Partition and round are non-negative integers."""
    if int(partition) < 0 or int(server_round) < 0:
        raise ValueError(f"partition ({partition}) and round ({server_round}) must be >= 0")


def _encode(arrays: Mapping[str, Any], dtype: StateDtype) -> dict[str, np.ndarray]:
    """Plain contiguous numpy arrays as stored; floating arrays cast to ``dtype``."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError(f"client state '{name}' has dtype object; only numeric arrays are stored (no pickle)")
        if np.issubdtype(arr.dtype, np.floating):
            with np.errstate(over="ignore"):  # overflow is detected just below, with a better message
                cast = arr.astype(np.dtype(dtype), copy=False)
            if dtype == "float16" and not np.isfinite(cast).all() and np.isfinite(arr).all():
                raise ValueError(f"client state '{name}' exceeds the float16 range (max |x| "
                                 f"{float(np.abs(arr).max()):.3g}); set client_state.dtype: float32")
            arr = cast
        out[name] = np.ascontiguousarray(arr)
    return out


def _decode(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored arrays as returned: fp16 back to float32 (fp64 etc. stay as they were saved)."""
    return {name: (arr.astype(np.float32) if arr.dtype == np.float16 else np.array(arr)) for name, arr in arrays.items()}


def _all_finite(arrays: Mapping[str, np.ndarray]) -> bool:
    """True when no floating array holds NaN or inf (a poisoned residual would poison every later update)."""
    return all(np.isfinite(a).all() for a in arrays.values() if np.issubdtype(a.dtype, np.floating))


class MemoryStore:
    """Client state in the node's ``Context.state`` (RecordDict): lost when the SuperNode restarts."""

    def __init__(self, state: RecordDict | None = None, dtype: StateDtype = "float32") -> None:
        """Keep versions in ``state`` (the node's ``context.state``; a private RecordDict if None)."""
        if dtype not in ("float32", "float16"):
            raise ValueError(f"client_state.dtype must be float32 or float16, got {dtype!r}")
        self.state = state if state is not None else RecordDict()
        self.dtype: StateDtype = dtype

    def _prefix(self, strategy: str, partition: int) -> str:
        """Record key prefix of one (strategy, partition)."""
        return f"{MEMORY_PREFIX}{_check_name(strategy)}:{int(partition)}:"

    def _versions(self, strategy: str, partition: int) -> dict[int, str]:
        """Saved round → record key, for one (strategy, partition)."""
        prefix = self._prefix(strategy, partition)
        return {int(key[len(prefix):]): key for key in list(self.state.keys()) if key.startswith(prefix)}

    def load(self, strategy: str, partition: int, before_round: int) -> dict[str, np.ndarray] | None:
        """The newest saved state of a round < ``before_round``, or None."""
        older = [r for r in self._versions(strategy, partition) if r < before_round]
        if not older:
            return None
        record = self.state[f"{self._prefix(strategy, partition)}{max(older)}"]
        assert isinstance(record, ArrayRecord)
        return _decode({name: arr.numpy() for name, arr in record.items()})

    def save(self, strategy: str, partition: int, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Save the state of ``server_round``; drop versions from later rounds (a rewind) and all but two."""
        _check_ids(partition, server_round)
        encoded = _encode(arrays, self.dtype)
        prefix = self._prefix(strategy, partition)
        self.state[f"{prefix}{int(server_round)}"] = ArrayRecord({k: Array(v) for k, v in encoded.items()})
        _prune(self._versions(strategy, partition), server_round, lambda key: self.state.pop(key))


def _prune(versions: Mapping[int, Any], saved_round: int, remove: Any) -> None:
    """Remove versions newer than ``saved_round`` (left by a run that was rewound) and all but the newest two."""
    kept = sorted(r for r in versions if r <= saved_round)
    for r in versions:
        if r > saved_round or r in kept[:-KEEP_VERSIONS]:
            remove(versions[r])


class DiskStore:
    """Client state as ``<directory>/<strategy>/partition-<p>/round-<r>.npz``, written atomically."""

    def __init__(self, directory: str | os.PathLike[str], dtype: StateDtype = "float32") -> None:
        """Store under ``directory`` (created on the first save); floating arrays kept as ``dtype``."""
        if dtype not in ("float32", "float16"):
            raise ValueError(f"client_state.dtype must be float32 or float16, got {dtype!r}")
        self.directory = Path(directory).expanduser()
        self.dtype: StateDtype = dtype

    def folder(self, strategy: str, partition: int) -> Path:
        """The folder holding one (strategy, partition)'s versions: one client's state only."""
        return self.directory / _check_name(strategy) / f"partition-{int(partition)}"

    def _versions(self, folder: Path) -> dict[int, Path]:
        """Saved round → file (temp files and set-aside corrupt files are not versions)."""
        if not folder.is_dir():
            return {}
        found = {}
        for path in folder.iterdir():
            match = _VERSION.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def load(self, strategy: str, partition: int, before_round: int) -> dict[str, np.ndarray] | None:
        """The newest intact state of a round < ``before_round``, or None (damaged files are set aside)."""
        versions = self._versions(self.folder(strategy, partition))
        for saved_round in sorted((r for r in versions if r < before_round), reverse=True):
            path = versions[saved_round]
            try:
                arrays = _read_npz(path)
            except FileNotFoundError:
                continue  # pruned by a concurrent save of the same client: an older version follows
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
                _set_aside(path, f"unreadable ({type(err).__name__}: {err})")
                continue
            if not _all_finite(arrays):
                _set_aside(path, "non-finite values")
                continue
            return _decode(arrays)
        return None

    def save(self, strategy: str, partition: int, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write the state of ``server_round`` atomically; drop later-round versions (a rewind) and all but two."""
        _check_ids(partition, server_round)
        encoded = _encode(arrays, self.dtype)
        folder = self.folder(strategy, partition)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"round-{int(server_round):08d}.npz"
        atomic_savez(target, encoded, prefix=".tmp-")
        _prune(self._versions(folder), server_round, lambda path: path.unlink(missing_ok=True))
        for stale in folder.glob(".tmp-*.npz.part"):  # left by a crash between write and replace
            stale.unlink(missing_ok=True)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (never unpickles: object arrays raise ValueError)."""
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _set_aside(path: Path, why: str) -> None:
    """Rename a damaged version to ``*.corrupt`` (kept for inspection, no longer loaded) and warn."""
    aside = path.with_name(path.name + ".corrupt")
    log.warning("client state %s is %s; moved to %s and falling back to an older version or a fresh state",
                path, why, aside.name)
    try:
        os.replace(path, aside)
    except OSError:
        pass  # read-only or already gone: the next load warns again, which is the honest outcome


def make_store(client_state: ClientStateConfig, experiment: str, context: Context) -> MemoryStore | DiskStore:
    """The store this node uses: node-config ``state-dir``, else the experiment's ``client_state`` block.

    A DiskStore is scoped to ``<dir>/<experiment name>``: two experiments never share state, and a run
    of the same experiment with the same directory continues from the state it finds (resume); start
    from an empty directory for a fresh start.
    """
    dtype = client_state.dtype
    node_dir = str(context.node_config.get("state-dir") or "")
    if node_dir:  # a device's own setting wins: it knows where its persistent storage is
        directory = node_dir
    elif client_state.store == "disk":
        directory = client_state.dir or ""
        if not directory:
            raise ValueError("client_state.store is 'disk' but no directory is set: set client_state.dir in the "
                             "experiment or pass --node-config 'state-dir=/path' to the SuperNode")
    else:
        return MemoryStore(context.state, dtype)
    return DiskStore(Path(directory) / _scope_name(experiment), dtype)


def _scope_name(experiment: str) -> str:
    """The experiment name as one safe path part."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)
    return safe if safe not in ("", ".", "..") else "experiment"


__all__ = ["DiskStore", "MemoryStore", "StateStore", "make_store", "KEEP_VERSIONS"]
