"""Per-round checkpoints of a comparison run, and reading them back for ``run.py --resume DIR``.

One file, ``DIR/checkpoint.npz``, rewritten atomically after every finished round (temp file in the
same folder, fsync, ``os.replace``, fsync of the folder): a crash at any moment leaves either the
previous checkpoint or the new one, never a mix. It holds numpy arrays only plus one JSON document
stored as bytes (``meta.json``); it is read with ``allow_pickle=False``, so a damaged or hostile file
cannot run code.

Contents: the experiment (the resolved config), which strategy of the comparison is running and how
many of its rounds are done, that strategy's state (global model, server-optimizer state, shared basis
and round parity, privacy accountant — see ``CompressedFedAvg.state_dict``), the results so far of
every strategy (rows, per-client metrics, ledgers) and the global RNG states (Python, numpy, torch).
Client state (error-feedback residuals) is not in here: clients keep it themselves (``client_state``).
"""

from __future__ import annotations

import json
import os
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from fedpower.atomic import atomic_savez
from fedpower.ledger import Ledger, Transfer
from fedpower.results import RunResults, StrategyResult

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT = "fedpower-checkpoint"
VERSION = 1
_META = "meta.json"
_LEDGER_FIELDS = ("round", "client", "direction", "payload_bytes", "wire_bytes", "dense_bytes", "purpose",
                  "header_bytes")
_DIRECTIONS = ("up", "down")
_PURPOSES = ("train", "evaluate", "discover")  # append only: checkpoints store the index


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run."""


@dataclass
class ResumePoint:
    """Where a run stands according to its checkpoint."""

    experiment: dict[str, Any]  # the resolved config the run was started with
    strategy_index: int  # index of the strategy that was running (len(strategies): all finished)
    completed_round: int  # rounds of that strategy already done
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # its state_dict() arrays
    strategy_meta: dict[str, Any] | None = None  # its state_dict() metadata (None: not started yet)
    results: dict[str, StrategyResult] = field(default_factory=dict)  # results so far, by strategy name
    rng: dict[str, Any] = field(default_factory=dict)  # global RNG states (see capture_rng)

    @property
    def finished(self) -> bool:
        """Whether every strategy of the run had finished."""
        return self.strategy_index >= len(self.experiment["strategies"])


def checkpoint_path(directory: str | os.PathLike[str]) -> Path:
    """The checkpoint file of an output folder."""
    return Path(directory) / CHECKPOINT_NAME


# -- RNG states ---------------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The process-global RNG states (Python ``random``, numpy, torch CPU) as arrays + JSON."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    arrays = {"rng/python": np.asarray(internal, dtype=np.uint64), "rng/numpy": np.asarray(keys, dtype=np.uint32),
              "rng/torch": torch.get_rng_state().numpy().copy()}
    meta = {"python": {"version": version, "gauss_next": gauss_next},
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    return arrays, meta


def restore_rng(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Set the process-global RNGs to a captured state."""
    if not meta:
        return
    python = meta["python"]
    random.setstate((python["version"], tuple(int(x) for x in arrays["rng/python"]), python["gauss_next"]))
    state = meta["numpy"]
    np.random.set_state((state["kind"], np.asarray(arrays["rng/numpy"], dtype=np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))
    torch.set_rng_state(torch.from_numpy(np.array(arrays["rng/torch"], dtype=np.uint8)))


# -- results ------------------------------------------------------------------------------------------
def _ledger_array(ledger: Ledger) -> np.ndarray:
    """A ledger as an int64 matrix, one row per transfer (direction 0 = up, 1 = down; purpose 0 = train)."""
    rows = [[t.round, t.client, _DIRECTIONS.index(t.direction), t.payload_bytes, t.wire_bytes, t.dense_bytes,
             _PURPOSES.index(t.purpose), t.header_bytes] for t in ledger.transfers]
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), len(_LEDGER_FIELDS))


def _ledger_from_array(matrix: np.ndarray) -> Ledger:
    """Inverse of :func:`_ledger_array`."""
    # Older checkpoints lack trailing columns: purpose (before evaluation was counted, 0 = train) and
    # header_bytes (before headers were counted: their wire bytes were content only, header 0 is exact).
    if matrix.ndim == 2 and len(_LEDGER_FIELDS) - 2 <= matrix.shape[1] < len(_LEDGER_FIELDS):
        missing = len(_LEDGER_FIELDS) - matrix.shape[1]
        matrix = np.concatenate([matrix, np.zeros((len(matrix), missing), dtype=matrix.dtype)], axis=1)
    if matrix.ndim != 2 or matrix.shape[1] != len(_LEDGER_FIELDS):
        raise CheckpointError(f"ledger array has shape {matrix.shape}, expected (n, {len(_LEDGER_FIELDS)})")
    return Ledger([Transfer(int(r), int(c), _DIRECTIONS[int(d)], int(p), int(w), int(n), _PURPOSES[int(k)], int(h))  # type: ignore[arg-type]
                   for r, c, d, p, w, n, k, h in matrix.tolist()])


def _result_meta(result: StrategyResult) -> dict[str, Any]:
    """One strategy's results as JSON-able data (the ledger goes into arrays)."""
    return {"name": result.name, "rounds": result.rounds, "wall_seconds": result.wall_seconds,
            "completed": result.completed, "initial_accuracy": result.initial_accuracy,
            "stop_reason": result.stop_reason,
            "client_metrics": {str(r): rows for r, rows in result.client_metrics.items()}}


def _result_from_meta(meta: Mapping[str, Any], ledger: Ledger) -> StrategyResult:
    """Inverse of :func:`_result_meta`."""
    return StrategyResult(name=meta["name"], rounds=list(meta["rounds"]), ledger=ledger,
                          wall_seconds=float(meta["wall_seconds"]), completed=bool(meta["completed"]),
                          initial_accuracy=meta["initial_accuracy"], stop_reason=meta["stop_reason"],
                          client_metrics={int(r): rows for r, rows in meta["client_metrics"].items()})


# -- files --------------------------------------------------------------------------------------------
def write_checkpoint(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Write arrays + a JSON document to one ``.npz``, atomically (temp, fsync, replace, fsync folder)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    document = np.frombuffer(json.dumps(meta, allow_nan=True).encode("utf-8"), dtype=np.uint8)
    payload = {_META: document, **{k: np.ascontiguousarray(v) for k, v in arrays.items()}}
    atomic_savez(target, payload, prefix=".checkpoint-")
    return target


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, JSON document) of a checkpoint file; CheckpointError if it is damaged or not ours."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    try:
        meta = json.loads(arrays.pop(_META).tobytes().decode("utf-8"))
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path} has no valid {_META} ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fedpower checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')}; this fedpower reads {VERSION}")
    return arrays, meta


# -- a run --------------------------------------------------------------------------------------------
def save_run_checkpoint(
    directory: str | os.PathLike[str], *, experiment: Mapping[str, Any], results: RunResults, strategy_index: int,
    completed_round: int, strategy_state: tuple[Mapping[str, np.ndarray], Mapping[str, Any]] | None,
) -> Path:
    """Checkpoint the run after a finished round (or a finished strategy) into ``directory``."""
    arrays: dict[str, np.ndarray] = {}
    rng_arrays, rng_meta = capture_rng()
    arrays.update(rng_arrays)
    names = []
    for position, result in enumerate(results.strategies.values()):
        arrays[f"ledger/{position}"] = _ledger_array(result.ledger)
        names.append(_result_meta(result))
    strategy_meta = None
    if strategy_state is not None:
        state_arrays, strategy_meta = strategy_state
        arrays.update({f"strategy/{k}": np.asarray(v) for k, v in state_arrays.items()})
    meta = {"format": FORMAT, "version": VERSION, "experiment": dict(experiment), "strategy_index": int(strategy_index),
            "completed_round": int(completed_round), "strategy": strategy_meta, "results": names, "rng": rng_meta}
    return write_checkpoint(checkpoint_path(directory), arrays, _jsonable(meta))


def load_run_checkpoint(directory: str | os.PathLike[str]) -> ResumePoint | None:
    """The run's resume point, or None when no round has been checkpointed yet."""
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    arrays, meta = read_checkpoint(path)
    try:
        results = {}
        for position, entry in enumerate(meta["results"]):
            ledger = _ledger_from_array(arrays.get(f"ledger/{position}", np.zeros((0, len(_LEDGER_FIELDS)))))
            results[entry["name"]] = _result_from_meta(entry, ledger)
        prefix = "strategy/"
        return ResumePoint(
            experiment=meta["experiment"], strategy_index=int(meta["strategy_index"]),
            completed_round=int(meta["completed_round"]),
            strategy_arrays={k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)},
            strategy_meta=meta["strategy"], results=results,
            rng={"arrays": {k: v for k, v in arrays.items() if k.startswith("rng/")}, "meta": meta["rng"]})
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"{path} is incomplete or inconsistent ({type(err).__name__}: {err})") from None


def _jsonable(value: Any) -> Any:
    """Metadata with string keys, lists and plain Python numbers (NaN stays: json writes and reads it back).

    Through the C JSON encoder rather than a Python walk: a checkpoint is written after every round and
    carries every result so far, so this runs over a growing document each round.
    """
    return json.loads(json.dumps(value, default=_numpy_scalar))


def _numpy_scalar(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (json's hook for types it does not know)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def strategy_state(name: str, params: Mapping[str, torch.Tensor], optimizer: Any, codec_state: Any, privacy: Any,
                   stop_reason: str | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, JSON-able meta) of one strategy: model, server-optimizer moments, codec state, accountant."""
    from fedpower.server_state import to_arrays

    arrays, meta = to_arrays(codec_state)
    arrays.update({f"params/{k}": v.detach().cpu().numpy() for k, v in params.items()})
    for slot, tensors in optimizer.state.items():
        arrays.update({f"optimizer/{slot}/{k}": v.detach().cpu().numpy() for k, v in tensors.items()})
    meta.update(name=name, stop_reason=stop_reason,
                optimizer_slots={slot: list(tensors) for slot, tensors in optimizer.state.items()})
    if privacy is not None:
        meta["privacy"] = privacy.checkpoint()
    return arrays, meta


def restore_strategy_state(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], *, name: str,
                           params: Mapping[str, torch.Tensor], optimizer: Any, codec_state: Any,
                           privacy: Any) -> tuple[dict[str, torch.Tensor], Any, str | None]:
    """(params, codec state, stop reason) saved by :func:`strategy_state`; fills the optimizer and accountant.

    ValueError when the state belongs to another strategy or model.
    """
    from fedpower.server_state import from_arrays

    if meta.get("name") != name:
        raise ValueError(f"checkpoint state is for strategy {meta.get('name')!r}, not {name!r}")
    for k, v in params.items():
        saved = arrays.get(f"params/{k}")
        if saved is None or tuple(saved.shape) != tuple(v.shape):
            raise ValueError(f"checkpoint has no parameter {k!r} of shape {tuple(v.shape)}")
    restored = {k: torch.from_numpy(np.array(arrays[f"params/{k}"], dtype=np.float32)) for k in params}
    optimizer.state = {slot: {k: torch.from_numpy(np.array(arrays[f"optimizer/{slot}/{k}"])) for k in names}
                       for slot, names in meta.get("optimizer_slots", {}).items()}
    if privacy is not None and meta.get("privacy") is not None:
        privacy.restore(meta["privacy"])
    return restored, from_arrays(arrays, meta, codec_state), meta.get("stop_reason")


# -- releases in flight (local DP) ---------------------------------------------------------------------
_INFLIGHT = "release-in-flight.json"


def mark_release(directory: str | os.PathLike[str], strategy_index: int, server_round: int,
                 cohort: list[int]) -> None:
    """Record, before a round's messages go out, that its clients are about to release noisy updates.

    Why: under local DP a client's reply is a release to an untrusted server the moment it is sent.
    If the run dies before the round's checkpoint, a resume redoes the round and the clients release
    again; :func:`lost_release` lets the resumed run account that first release too.
    """
    path = Path(directory) / _INFLIGHT
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"strategy_index": int(strategy_index), "round": int(server_round),
                               "cohort": [int(p) for p in cohort]}))
    os.replace(tmp, path)


def lost_release(directory: str | os.PathLike[str], strategy_index: int, completed_round: int) -> list[int] | None:
    """The cohort of a round that was sent but never checkpointed (the one a resume redoes), else None."""
    path = Path(directory) / _INFLIGHT
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if marker.get("strategy_index") != strategy_index or marker.get("round") != completed_round + 1:
        return None  # that round finished (its checkpoint is newer) or belongs to another strategy
    return [int(p) for p in marker.get("cohort", [])]
