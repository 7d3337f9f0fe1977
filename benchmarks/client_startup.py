"""What every ClientApp process pays before it trains: imports and optimizer set-up, as CPU and wall time.

A SuperNode (flwr 1.41) starts a fresh ``flwr-clientapp`` process per message, so this is paid per
message. The steps, in one process: what ``flwr-clientapp`` imports itself, ``import torch``, our app
(``clients.flower_app``: fedpower and clients), the client's optimizer (``PlainSGD``) and, for
comparison, a first ``torch.optim.SGD`` (which imports ``torch._dynamo``, inductor and sympy). CPU time
is the robust number on a shared or emulated machine; wall time is in brackets; VmHWM after each step.

    python benchmarks/client_startup.py
    sudo scripts/edge_arm64_check.sh exec python /opt/fedpower-src/benchmarks/client_startup.py   # emulated Pi 4
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    """Time each step once, in order, and print one line per step."""
    rows: list[tuple[str, float, float, float]] = []
    cpu, wall = time.process_time(), time.time()

    def done(step: str) -> None:
        nonlocal cpu, wall
        rows.append((step, time.process_time() - cpu, time.time() - wall, peak_rss_mib()))
        cpu, wall = time.process_time(), time.time()

    import flwr.supernode.cli.flwr_clientapp  # noqa: F401  (what the flwr-clientapp process imports first)
    done("flwr-clientapp's own imports")
    import torch
    done("import torch")
    import clients.flower_app  # noqa: F401
    done("import clients.flower_app (fedpower, clients)")
    from fedpower.training import PlainSGD

    model = torch.nn.Linear(40, 10)
    PlainSGD(model.parameters(), lr=0.1)
    done("PlainSGD(...) (the client's optimizer)")
    torch.optim.SGD(model.parameters(), lr=0.1)
    done("first torch.optim.SGD(...) (for comparison)")
    for step, cpu_s, wall_s, rss in rows:
        print(f"{step:48s} CPU {cpu_s:7.3f} s (wall {wall_s:7.3f} s)  peak RSS {rss:6.0f} MiB")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
