"""What a fresh ClientApp process per message costs a device, against a long-lived process.

Flower 1.41 runs every message a SuperNode receives in a new ``flwr-clientapp`` process, with
``--isolation subprocess`` (default) and with ``--isolation process`` + a separately started
``flower-superexec`` alike (``flwr-clientapp`` takes a per-task ``--token`` and runs exactly one
task; long-lived "warm executors" exist only for the Kubernetes executor). This script measures the
two sides of that choice on the real ClientApp (``clients.flower_app``) with the deployment
experiment (``configs/deployment.yaml``: mnist1d, MLP 40-128-128-10, shared PowerSGD r4 int8):

- cold: a new Python process per message — imports (torch, flwr, our code, the data code), the
  experiment and data load, one train handler call — as each Flower message does;
- warm: one process answering many train messages — what a long-lived ClientApp would pay.

The difference is the per-message process overhead. Usage::

    python benchmarks/process_model.py [--cold 5] [--warm 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = r"""
import sys, time, json
started = time.perf_counter()
import torch
after_torch = time.perf_counter()
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
import clients.flower_app as flower_app
from fedpower.codecs import layout_of
from fedpower.experiment import experiment_data, experiment_model
from fedpower.server_state import init_server_state, packed_basis, plan_round
after_imports = time.perf_counter()

run_config = {"config": "configs/deployment.yaml", "overrides": ""}
context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config=run_config)
experiment = flower_app.node_experiment(context)
settings = experiment.resolved()[0]
dataset = experiment_data(experiment)[0]
after_data = time.perf_counter()
params = {k: v.detach() for k, v in experiment_model(settings, dataset).state_dict().items()}
state = init_server_state(settings.compression, layout_of(params), settings.seed)


def message(server_round):
    content = {
        "arrays": ArrayRecord({k: Array(v.numpy()) for k, v in params.items()}),
        "config": ConfigRecord(plan_round(state, settings.compression, settings.name, server_round).to_record()),
    }
    if state.basis is not None:
        content["basis"] = ArrayRecord({"float32": Array(packed_basis(state))})
    content = RecordDict(content)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, server_round
    return Message(content, dst_node_id=1, message_type="train")


handler_seconds = []
for server_round in range(1, int(sys.argv[1]) + 1):
    msg = message(server_round)
    t = time.perf_counter()
    reply = flower_app.train(msg, context)
    handler_seconds.append(time.perf_counter() - t)
    assert not reply.has_error(), reply.error
print("RESULT " + json.dumps({"import_torch": after_torch - started, "imports": after_imports - started,
                              "experiment_and_data": after_data - after_imports, "handler": handler_seconds}))
"""


def run_worker(messages: int) -> tuple[float, dict]:
    """Start a fresh interpreter that handles ``messages`` train messages; (wall seconds, its own timings)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDPOWER_DEVICE": "cpu", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env.setdefault("FLWR_HOME", os.path.join(tempfile.gettempdir(), "fedpower-bench-flwr-home"))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WORKER, str(messages)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"worker failed:\n{done.stderr[-3000:]}")
    line = next(row for row in done.stdout.splitlines() if row.startswith("RESULT "))
    return wall, json.loads(line[len("RESULT "):])


def main() -> None:
    """Measure cold (one process per message) and warm (one process, many messages) and print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=5, help="fresh processes, one message each")
    parser.add_argument("--warm", type=int, default=10, help="messages answered by one long-lived process")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    run_worker(1)  # fills the data cache and the OS file cache: the steady state of a device, not its first boot
    cold = [run_worker(1) for _ in range(args.cold)]
    _, warm = run_worker(args.warm + 1)
    warm_handler = warm["handler"][1:]  # the first call in a process includes lazy initialisation
    summary = {
        "cold_wall_per_message_s": statistics.median(w for w, _ in cold),
        "cold_import_torch_s": statistics.median(t["import_torch"] for _, t in cold),
        "cold_imports_s": statistics.median(t["imports"] for _, t in cold),
        "cold_experiment_and_data_s": statistics.median(t["experiment_and_data"] for _, t in cold),
        "cold_handler_s": statistics.median(t["handler"][0] for _, t in cold),
        "warm_handler_per_message_s": statistics.median(warm_handler),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "cold_runs": args.cold, "warm_messages": args.warm,
    }
    summary["overhead_per_message_s"] = summary["cold_wall_per_message_s"] - summary["warm_handler_per_message_s"]
    for key, value in summary.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
