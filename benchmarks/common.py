"""What every benchmark script shares: where it ran, and writing its JSON and PNG without half-written files."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence


def machine_info(modules: Sequence[str] = ("torch", "flwr")) -> dict[str, Any]:
    """Where the benchmark ran: platform, CPU model, memory, Python and the versions of ``modules``."""
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
        if model:
            info["cpu_model"] = model
        with open("/proc/meminfo") as fh:
            info["mem_total_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    for module in modules:
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - just not reported
            info[module] = None
    return info


def write_json(doc: Any, path: Path) -> None:
    """Write ``doc`` as indented JSON via a temp file and a rename (non-JSON values as str)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure via a temp file and a rename, then close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
