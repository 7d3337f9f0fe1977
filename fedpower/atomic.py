"""Crash-safe file writes: a file is either the old version or the new one, never a mix.

Used for what must survive ``kill -9`` or a power cut: run checkpoints and client state on disk.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np


def atomic_savez(target: Path, arrays: Mapping[str, np.ndarray], prefix: str = ".tmp-") -> None:
    """Write ``arrays`` to ``target`` (.npz) via a temp file in the same folder, fsync, replace, fsync folder.

    The temp file is named ``{prefix}*.npz.part``; it is removed on any error.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".npz.part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)  # make the rename itself survive a power cut


def fsync_dir(folder: Path) -> None:
    """fsync a directory entry (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
