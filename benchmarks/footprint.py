"""What one client round costs a device: peak RSS, train and encode time, payload and wire bytes.

Runs the real ClientApp train handler (``clients.app.handle_train``) on the message a server would send,
once per reference model and strategy, in a fresh Python process per model so the peak RSS is that
model's alone (like a ClientApp process on a SuperNode). Encode time is measured by timing the codec's
``encode`` inside the handler (error feedback included: it decodes to form the residual).

    python benchmarks/footprint.py                    # all reference models, CPU, markdown table
    python benchmarks/footprint.py --models mlp --rounds 4 --device cpu --threads 1 --json out.json
    python benchmarks/footprint.py --deployment --rounds 2   # real SuperLink + SuperNode on 127.0.0.1

The first round of each process loads/generates the data set and warms up torch; the reported times are
the median of the later rounds, as CPU time of the process (wall time in brackets: on a busy machine wall
time mostly measures the wait for a core). Peak RSS is the process high-water mark (VmHWM) after all rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Reference models: the YAML that defines each one's data, model and local training.
MODELS = {
    "cnn1d": "configs/mnist1d_compare.yaml",       # mnist1d, conv 1-D
    "mlp": "configs/quickstart.yaml",               # mnist1d, MLP 40-256-256-10
    "char_lstm": "configs/shakespeare.yaml",        # Shakespeare next character, 2-layer LSTM 256
}
#: Strategies measured on every model (what the client sends; the server side does not matter here).
STRATEGIES = [
    {"name": "fedavg"},
    {"name": "powersgd-r4-int8",
     "compression": {"method": "powersgd", "mode": "independent", "rank": 4, "power_iterations": 2,
                     "quantize_bits": 8, "error_feedback": True, "entropy_coding": "none"}},
    {"name": "powersgd-shared-r4-int8",
     "compression": {"method": "powersgd", "mode": "shared", "rank": 4, "quantize_bits": 8, "error_feedback": True,
                                             "entropy_coding": "none"}},
]


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def experiment_for(model: str, device: str) -> Any:
    """The model's reference YAML with our strategies instead of its own (data, model, training unchanged)."""
    import yaml

    from fedpower.config import load_config

    raw = yaml.safe_load((ROOT / MODELS[model]).read_text())
    raw["strategies"] = STRATEGIES
    raw.setdefault("train", {})["device"] = device
    raw["train"]["clients_per_round"] = min(int(raw["train"].get("clients_per_round", 1)),
                                            int(raw["data"].get("num_clients", 1)))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(raw, handle)
    try:
        return load_config(handle.name)
    finally:
        os.unlink(handle.name)


class TimedCodec:
    """Wraps a codec and records (wall, CPU) seconds of each ``encode`` (synchronizing CUDA for honest times)."""

    def __init__(self, inner: Any, sink: list[tuple[float, float]]) -> None:
        self._inner, self._sink = inner, sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped codec's encode, timed."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = self._inner.encode(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._sink.append((time.perf_counter() - start, time.process_time() - start_cpu))
        return out


def measure_model(model_name: str, rounds: int, device: str, partition: int, threads: int) -> dict[str, Any]:
    """Run ``rounds`` train rounds per strategy through handle_train; sizes, times and peak RSS."""
    import torch

    if threads > 0:  # on a shared machine, idle OpenMP threads spin and inflate CPU time: 1 thread measures cleanly
        torch.set_num_threads(threads)
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import clients.app as client_app
    from fedpower.codecs import layout_of
    from fedpower.models import count_parameters
    from fedpower.server_state import init_server_state, packed_basis, plan_round
    from strategies.wire import array_bytes, wire_bytes

    rss_import_kib = proc_status_kib("VmRSS")
    experiment = experiment_for(model_name, device)
    encode_times: list[tuple[float, float]] = []
    real_build = client_app.client_codec
    client_app.client_codec = lambda *a, **k: TimedCodec(real_build(*a, **k), encode_times)  # type: ignore[assignment]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a SuperNode sets per task

    dataset, parts, *_ = client_app.experiment_data(experiment)
    if partition < 0:  # a typical client: the partition of median size (partition 0 may be tiny under Dirichlet)
        by_size = sorted(range(len(parts)), key=lambda p: (len(parts[p]), p))
        partition = by_size[len(by_size) // 2]
    rows = []
    for settings in experiment.resolved():
        name = settings.name
        model = client_app.experiment_model(settings, dataset)
        params = {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}
        server_state = init_server_state(settings.compression, layout_of(params), settings.seed)
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v.numpy()) for k, v in params.items()}),
            "config": ConfigRecord(plan_round(server_state, settings.compression, name, 1).to_record()),
        })
        if server_state.basis is not None:  # the server's first-round basis, as strategies/compressed.py sends it
            content["basis"] = ArrayRecord({"float32": Array(packed_basis(server_state))})
        context = Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(),
                          run_config={})
        round_seconds, round_cpu, encode_seconds, encode_cpu = [], [], [], []
        for server_round in range(1, rounds + 1):
            content["config"]["server-round"] = server_round
            message = Message(content, dst_node_id=1, message_type="train")
            encode_times.clear()
            start, start_cpu = time.perf_counter(), time.process_time()
            reply = client_app.handle_train(message, context, experiment)
            round_seconds.append(time.perf_counter() - start)
            round_cpu.append(time.process_time() - start_cpu)
            if reply.has_error():
                raise RuntimeError(f"{model_name}/{name}: client error {reply.error}")
            encode_seconds.append(sum(wall for wall, _ in encode_times))
            encode_cpu.append(sum(cpu for _, cpu in encode_times))
        later = slice(1, None) if rounds > 1 else slice(None)  # round 1 includes data generation and warm-up
        rows.append({
            "model": model_name, "strategy": name, "parameters": count_parameters(model), "partition": partition,
            "examples": int(reply.content["metrics"]["num-examples"]),
            "round_s": statistics.median(round_seconds[later]), "round_cpu_s": statistics.median(round_cpu[later]),
            "encode_ms": 1e3 * statistics.median(encode_seconds[later]),
            "encode_cpu_ms": 1e3 * statistics.median(encode_cpu[later]),
            "uplink_payload_bytes": array_bytes(reply.content["payload"]),
            "uplink_wire_bytes": wire_bytes(reply.content),
            "downlink_wire_bytes": wire_bytes(content),
        })
    peak_kib = proc_status_kib("VmHWM")
    for row in rows:
        row.update({"device": str(torch.device(client_app.node_device(context, experiment.train))),
                    "rss_after_import_mib": rss_import_kib / 1024, "peak_rss_mib": peak_kib / 1024,
                    "torch": torch.__version__, "threads": torch.get_num_threads()})
    return {"rows": rows}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = ["| model | params | examples | strategy | client round CPU s (wall) | encode CPU ms (wall) | uplink payload B | "
             "uplink wire B | downlink wire B | peak RSS MiB (after import) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['examples']} | {r['strategy']} | {r['round_cpu_s']:.2f} ({r['round_s']:.2f}) | "
                     f"{r['encode_cpu_ms']:.1f} ({r['encode_ms']:.1f}) | "
                     f"{r['uplink_payload_bytes']:,} | {r['uplink_wire_bytes']:,} | {r['downlink_wire_bytes']:,} | "
                     f"{r['peak_rss_mib']:.0f} ({r['rss_after_import_mib']:.0f}) |")
    return "\n".join(lines)


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def memory_of(pid: int) -> tuple[str, int, int] | None:
    """(command line, VmRSS KiB, VmHWM KiB) of a live process, None if it is gone."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return cmdline, int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def stop(process: subprocess.Popen[bytes]) -> None:
    """TERM, then KILL, a process started in its own session and everything below it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in reversed(process_tree(process.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure_deployment(rounds: int, threads: int, timeout: float = 1200.0, extra_overrides: str = "") -> dict[str, Any]:
    """Peak RSS of a real SuperNode and its ClientApp processes during ``flwr run`` on 127.0.0.1 (one node).

    The app is the repository's (configs/deployment.yaml cut to one node, plus ``extra_overrides`` such as
    ``model.options.hidden=[256,256]`` for the quickstart MLP); memory is sampled every 0.1 s. The train
    replies' ``t-*`` metrics (clients/flower_app.py) give where each message's time went on the client.
    """
    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="fedpower-footprint-"))
    port, runtime_port = free_port(), free_port()
    home = work / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "footprint"\n\n[superlink.footprint]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    started: list[subprocess.Popen[bytes]] = []
    peaks = {"supernode": 0, "clientapp": 0, "together": 0}
    clientapp_pids: set[int] = set()
    sampling = threading.Event()

    def sample(supernode: int) -> None:
        while not sampling.is_set():
            together = 0
            for pid in process_tree(supernode):
                found = memory_of(pid)
                if found is None:
                    continue
                cmdline, rss, hwm = found
                kind = "supernode" if pid == supernode else "clientapp" if "clientapp" in cmdline else ""
                if kind:
                    peaks[kind] = max(peaks[kind], hwm)
                    together += rss
                if kind == "clientapp":
                    clientapp_pids.add(pid)
            peaks["together"] = max(peaks["together"], together)
            time.sleep(0.1)

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with (work / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(args, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        started.append(process)
        return process

    def flwr(*args: str) -> str:
        done = subprocess.run([str(bin_dir / "flwr"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {args[0]} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        return done.stdout[done.stdout.index("{"):]

    try:
        start("superlink", [str(bin_dir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(port)])
        deadline = time.monotonic() + 120
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the SuperLink did not start: " + (work / "superlink.log").read_text()[-2000:])
            time.sleep(0.5)
        supernode = start("supernode", [str(bin_dir / "flower-supernode"), "--insecure", "--superlink",
                                        f"127.0.0.1:{port}", "--node-config", "partition-id=0 num-partitions=1 timings=1",
                                        "--host", "127.0.0.1", "--port", str(runtime_port)])
        sampler = threading.Thread(target=sample, args=(supernode.pid,), daemon=True)
        sampler.start()
        overrides = f"data.num_clients=1; train.clients_per_round=1; train.rounds={rounds}"
        if extra_overrides:
            overrides += "; " + extra_overrides
        run_id = int(json.loads(flwr("run", ".", "footprint", "--format", "json", "--run-config",
                                     f"out-dir='{work / 'results'}' overrides='{overrides}'"))["run-id"])
        deadline = time.monotonic() + timeout
        status = ""
        while not status.startswith("finished"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {run_id} did not finish in {timeout:.0f} s")
            time.sleep(2)
            rows = json.loads(flwr("ls", "footprint", "--format", "json"))["runs"]
            status = next((str(r["status"]) for r in rows if int(r["run-id"]) == run_id), "")
        sampling.set()
        sampler.join()
        if status != "finished:completed":
            raise RuntimeError(f"run {run_id} ended as {status}: " + (work / "superlink.log").read_text()[-2000:])
        strategy = json.loads((work / "results" / "results.json").read_text())["strategies"][0]
        per_client = json.loads((work / "results" / "client_metrics.json").read_text())[strategy["name"]]
        timings = {r: {k: v for k, v in rows[0].items() if k.startswith("t-")} for r, rows in per_client.items()}
        return {"strategy": strategy["name"], "rounds": len(strategy["rounds"]), "overrides": overrides,
                "client_timings_s": timings,
                "round_seconds": [r["seconds"] for r in strategy["rounds"]],
                "uplink_bytes": [r["uplink_bytes"] for r in strategy["rounds"]],
                "downlink_bytes": [r["downlink_bytes"] for r in strategy["rounds"]],
                "supernode_peak_rss_mib": peaks["supernode"] / 1024,
                "clientapp_peak_rss_mib": peaks["clientapp"] / 1024,
                "together_peak_rss_mib": peaks["together"] / 1024, "clientapp_processes": len(clientapp_pids)}
    finally:
        sampling.set()
        for process in reversed(started):
            stop(process)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Measure every requested model in its own process and print (and optionally save) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3, help="train rounds per strategy (first is warm-up)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto (CUDA → MPS → CPU)")
    parser.add_argument("--partition", type=int, default=-1,
                        help="which client's data to train on (default: the partition of median size)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--deployment", action="store_true",
                        help="instead: SuperLink + SuperNode + `flwr run` on 127.0.0.1, peak RSS of SuperNode/ClientApp")
    parser.add_argument("--overrides", default="",
                        help="with --deployment: more run overrides, e.g. 'model.options.hidden=[256,256]'")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model in this process
    args = parser.parse_args(argv)
    if args.deployment:
        found = measure_deployment(args.rounds, args.threads, extra_overrides=args.overrides)
        print(json.dumps(found, indent=2))
        if args.json:
            args.json.write_text(json.dumps(found, indent=2))
        return 0
    if args.one:
        print(json.dumps(measure_model(args.one, args.rounds, args.device, args.partition, args.threads)))
        return 0
    rows: list[dict[str, Any]] = []
    for model in args.models:
        done = subprocess.run([sys.executable, __file__, "--one", model, "--rounds", str(args.rounds),
                               "--device", args.device, "--partition", str(args.partition),
                               "--threads", str(args.threads)],
                              capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return 1
        rows += json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    print(markdown(rows))
    first = rows[0]
    print(f"\ndevice {first['device']}, torch {first['torch']}, {first['threads']} threads; median of rounds 2..{args.rounds}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
