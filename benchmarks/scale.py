#!/usr/bin/env python
"""Scale benchmark: hundreds to a thousand simulated clients on one machine, against a bare Python loop.

Every scenario runs in its own subprocess while this process samples the memory of that subprocess's
whole process tree (Ray's GCS, raylet, agents and actor workers included) from ``/proc``:

- **clients axis**: N ∈ {100, 500, 1000} clients, the same work per round at every N (10 sampled
  clients × 1 local epoch over ``--samples-per-client`` mnist1d examples each, the MNIST-1D 1-D CNN),
  FedAvg and PowerSGD (rank 4, 2 power iterations, int8 factors, error feedback) in one Flower
  simulation per N (Ray starts once per N);
- **model axis**: 1000 clients, an MLP on mnist1d with ≈100 k, 1 M and 10 M parameters;
- **bare loop**: the same rounds, cohorts, local training (``train_local``), codec encode / pack /
  server-side ``decode_contribution``, aggregation, server optimizer and evaluation, sequentially in
  one plain Python process without Flower or Ray. Flower's overhead is the ratio of the two, measured
  in the same benchmark run on the same (shared, noisy) machine;
- **idle client state**: bytes held per idle client by each client-state store (memory fp32, memory
  fp16, disk), measured as the RSS growth of a process filling the store for many clients.

Wall time per round is the time between consecutive ``round finished`` events (steady state:
rounds ≥ 2; round 1 also pays the actors' first imports and data loading). Peak memory is reported as
the sum of RSS over the process tree (what the issue asks; counts shared pages once per process) and
as the sum of PSS (shared pages split between processes: the honest total).

Outputs: ``benchmarks/results/scale.json`` and ``benchmarks/results/scale.png``.

Usage::

    .venv/bin/python benchmarks/scale.py                 # everything (≈ 15 min on 2 busy CPU cores)
    .venv/bin/python benchmarks/scale.py --quick         # N = 100 only, 3 rounds, no model axis (≈ 2 min)
    .venv/bin/python benchmarks/scale.py --clients 100 1000 --sizes 1m --rounds 4
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages come first
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, save_figure, write_json  # noqa: E402  (sibling module)

RESULTS_DIR = ROOT / "benchmarks" / "results"
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: hidden width of a 2-hidden-layer MLP on mnist1d (40 → h → h → 10: h² + 52h + 10 parameters)
MLP_WIDTHS = {"100k": 292, "1m": 974, "10m": 3136}
POWERSGD = {"method": "powersgd", "mode": "independent", "rank": 4, "power_iterations": 2, "quantize_bits": 8,
            "error_feedback": True, "entropy_coding": "none"}
STRATEGIES = [{"name": "fedavg", "compression": {"method": "none"}}, {"name": "powersgd", "compression": POWERSGD}]
TARGET_OVERHEAD = 1.5
TARGET_RSS_GB = 4.0


# --- memory of a process tree, from /proc ------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    """parent pid → child pids, for every process we may read."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process: shared pages divided among their users (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def process_name(pid: int) -> str:
    """Short name of a process (Ray sets its actors' titles to ``ray::...``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().split(b"\0")[0].decode(errors="replace")
        return Path(cmd).name if "/" in cmd and not cmd.startswith("ray::") else cmd[:40]
    except OSError:
        return "?"


class TreeMemorySampler:
    """Samples RSS and PSS summed over a process tree in a background thread; keeps the time series."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.samples: list[tuple[float, int, int, int]] = []  # (unix time, rss sum, pss sum, processes)
        self.peak_breakdown: list[tuple[str, int, int]] = []  # per process at the RSS peak: (name, rss, pss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        peak = -1
        while not self._stop.is_set():
            pids = process_tree(self.root)
            per = [(pid, rss_bytes(pid), pss_bytes(pid)) for pid in pids]
            rss, pss = sum(p[1] for p in per), sum(p[2] for p in per)
            self.samples.append((time.time(), rss, pss, len(pids)))
            if rss > peak:
                peak = rss
                self.peak_breakdown = sorted(((process_name(pid), r, p) for pid, r, p in per),
                                             key=lambda item: -item[2])
            self._stop.wait(self.interval)

    def peak(self, start: float = 0.0, end: float = math.inf) -> dict[str, float]:
        """Peak RSS / PSS sums (GB) and the most processes seen between two unix times."""
        window = [s for s in self.samples if start <= s[0] <= end] or self.samples
        if not window:
            return {"rss_gb": float("nan"), "pss_gb": float("nan"), "processes": 0}
        return {"rss_gb": max(s[1] for s in window) / 1e9, "pss_gb": max(s[2] for s in window) / 1e9,
                "processes": max(s[3] for s in window)}


# --- scenarios -------------------------------------------------------------------------------------------
def model_spec(size: str) -> dict[str, Any]:
    """The model block for a size label: the 1-D CNN for "cnn1d", else an MLP of that many parameters."""
    if size == "cnn1d":
        return {"name": "cnn1d"}
    return {"name": "mlp", "options": {"hidden": [MLP_WIDTHS[size]] * 2}}


def shape_only_dataset():  # -> fedpower.data.base.Dataset (imported late: the parent stays light)
    """An empty stand-in for mnist1d's shape (40 features, 10 classes): enough to build a model."""
    import numpy as np

    from fedpower.data.base import Dataset

    return Dataset(name="shape-only", x_train=np.zeros((1, 40), np.float32), y_train=np.zeros(1, np.int64),
                   x_test=np.zeros((1, 40), np.float32), y_test=np.zeros(1, np.int64), num_classes=10,
                   input_shape=(40,))


def experiment_for(num_clients: int, size: str, rounds: int, clients_per_round: int, samples_per_client: int,
                   client_state: Mapping[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """A validated, resolved experiment: iid mnist1d with ``samples_per_client`` examples per client."""
    from fedpower.config import parse_config

    # mnist1d keeps 80 % for training and makes the same number of samples per class (10 classes).
    num_samples = int(math.ceil(samples_per_client * num_clients / 0.8 / 10.0)) * 10
    config = {
        "experiment": f"scale-{num_clients}-{size}", "seed": seed,
        "data": {"dataset": "mnist1d", "num_clients": num_clients, "partition": {"kind": "iid"},
                 "options": {"num_samples": num_samples}},
        "model": model_spec(size),
        # Evaluate only before round 1 and after the last: the per-round work stays the same at every N.
        "train": {"rounds": rounds, "clients_per_round": clients_per_round, "local_epochs": 1, "batch_size": 32,
                  "optimizer": "sgd", "lr": 0.05, "device": "cpu", "evaluate_every": rounds,
                  "server_optimizer": {"name": "momentum", "lr": 1.0, "momentum": 0.9}},
        "client_state": dict(client_state or {"store": "memory", "dtype": "float32"}),
        "strategies": STRATEGIES,
    }
    return parse_config(config, source="benchmarks/scale.py").to_dict()


class Timeline:
    """RunObserver recording unix times of strategy starts, round ends and strategy ends."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}

    def strategy_started(self, name: str, rounds: int) -> None:
        """A strategy begins."""
        self.events[name] = {"start": time.time(), "rounds": [], "accuracy": None}

    def round_finished(self, name: str, row: dict[str, Any]) -> None:
        """One round of a strategy ended."""
        self.events[name]["rounds"].append(time.time())
        if row.get("accuracy") == row.get("accuracy"):  # NaN on rounds without evaluation
            self.events[name]["accuracy"] = row["accuracy"]

    def strategy_finished(self, name: str, final: dict[str, Any]) -> None:
        """A strategy ended."""
        self.events[name]["end"] = time.time()


def run_flower(experiment: dict[str, Any], timeline: Timeline, engine: str = "ray") -> dict[str, Any]:
    """The experiment through a simulation engine (``ray`` or ``inprocess``); start-up split into engine and discovery."""
    import strategies.server as server
    from fedpower.results import RunResults
    from strategies.simulation import run_simulation_experiment

    discover = server.discover_partitions
    phases: dict[str, float] = {}

    def timed_discovery(*args: Any, **kwargs: Any) -> Any:
        """The server's first step: ask every node for its partition (N query messages on Ray, none in-process)."""
        phases["discovery_start"] = time.time()
        try:
            return discover(*args, **kwargs)
        finally:
            phases["discovery_end"] = time.time()

    server.discover_partitions = timed_discovery  # timing only: the function itself is unchanged
    experiment = {**experiment, "simulation": {**experiment["simulation"], "engine": engine}}
    if engine == "inprocess":  # Ray's resource keys mean nothing without Ray
        experiment["simulation"] = {"engine": "inprocess", "num_cpus_per_client": 1.0}
    results = RunResults(experiment=experiment["experiment"], config=experiment)
    phases["simulate_start"] = time.time()
    run_simulation_experiment(experiment, results, observer=timeline)
    phases["simulate_end"] = time.time()
    failures = {name: s.final()["client_failures"] for name, s in results.strategies.items()}
    completed = {name: s.completed for name, s in results.strategies.items()}
    return {"phases": phases, "client_failures": failures, "completed": completed}


def run_bare(experiment: dict[str, Any], timeline: Timeline) -> dict[str, Any]:
    """The same rounds without Flower: :func:`client_step`/:func:`server_step` called in a plain loop.

    The floor an engine is measured against: the same training, codec, aggregation and evaluation
    code as every engine (``fedpower.round``), no messages.
    """
    import torch

    from fedpower.codecs import layout_of
    from fedpower.experiment import as_experiment, client_seed, experiment_data, experiment_model
    from fedpower.privacy import cohort_sampler
    from fedpower.round import NUM_EXAMPLES, TRAIN_LOSS, Reply, client_codec, client_step, server_step
    from fedpower.server_opt import ServerOptimizer
    from fedpower.server_state import init_server_state, plan_round, round_codec, sends_basis
    from fedpower.training import evaluate, get_params, local_update, set_params

    # One intra-op thread, as each Ray actor has (Ray sets OMP_NUM_THREADS=1 for a 1-CPU actor) and as the
    # in-process engine uses: with torch's default thread pool tiny batches on a busy 2-core machine ran ~20×
    # slower (measured).
    torch.set_num_threads(1)
    phases = {"data_start": time.time()}
    config = as_experiment(experiment)
    dataset, parts, x_train, y_train, x_test, y_test = experiment_data(config)
    phases["data_end"] = time.time()
    for settings in config.resolved():
        timeline.strategy_started(settings.name, settings.train.rounds)
        server_model = experiment_model(settings, dataset)
        params = {k: v.float() for k, v in get_params(server_model).items()}
        optimizer = ServerOptimizer(**settings.train.server_optimizer.model_dump())
        codec_state = init_server_state(settings.compression, layout_of(params), settings.seed)
        sample = cohort_sampler(settings.seed, range(settings.num_clients), settings.clients_per_round, "fixed")
        states: dict[int, dict[str, Any]] = {}  # the clients' codec state, kept across rounds as a store keeps it
        evaluate(server_model, x_test, y_test)  # round 0, as the engines do
        for server_round in range(1, settings.train.rounds + 1):
            plan = plan_round(codec_state, settings.compression, settings.name, server_round)
            basis = codec_state.basis if sends_basis(settings.compression, plan) else None
            codec = round_codec(settings.compression, plan, basis)  # the server's (no client privacy stages)
            replies = []
            for pid in sample(server_round):
                seed = client_seed(settings.seed, server_round, pid)
                model = experiment_model(settings, dataset, pretrained=False)  # a fresh model per client, as a ClientApp does
                update, examples, loss = local_update(model, params, x_train, y_train, parts[pid], settings.train, seed)
                payload, state, metrics = client_step(update, states.get(pid), plan, settings,
                                                      client_codec(settings, plan, basis, pid), partition=pid,
                                                      seed=seed)
                if state:
                    states[pid] = {k: v.numpy() for k, v in state.items()}
                replies.append(Reply(pid, payload, {NUM_EXAMPLES: examples, TRAIN_LOSS: loss, **metrics,
                                                    **plan.echo()}))
            outcome = server_step(replies, plan, settings, codec, params=params, optimizer=optimizer,
                                  codec_state=codec_state, sampled=len(replies))
            if outcome.params is not None:
                params, codec_state = outcome.params, outcome.codec_state
            if server_round % settings.train.evaluate_every == 0 or server_round == settings.train.rounds:
                set_params(server_model, params)
                _, accuracy = evaluate(server_model, x_test, y_test)
                timeline.events[settings.name]["accuracy"] = accuracy
            timeline.events[settings.name]["rounds"].append(time.time())
        timeline.strategy_finished(settings.name, {})
    return {"phases": phases}


def worker_main(spec_path: Path, out_path: Path) -> int:
    """Subprocess entry: run one scenario (flower or bare) and write its timeline as JSON."""
    started = time.time()
    spec = json.loads(spec_path.read_text())
    timeline = Timeline()
    if spec["kind"] == "bare":
        extra = run_bare(spec["experiment"], timeline)
    else:
        extra = run_flower(spec["experiment"], timeline, engine="ray" if spec["kind"] == "flower" else "inprocess")
    out = {"process_start": started, "process_end": time.time(), "events": timeline.events, **extra}
    out_path.write_text(json.dumps(out))
    return 0


def run_scenario(kind: str, experiment: dict[str, Any], timeout: float, log_dir: Path) -> dict[str, Any]:
    """Run one scenario in a subprocess, sampling its process tree's memory; returns timings and peaks."""
    with tempfile.TemporaryDirectory(prefix="fedpower-scale-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps({"kind": kind, "experiment": experiment}))
        log_path = log_dir / f"{experiment['experiment']}-{kind}.log"
        env = dict(os.environ, FLWR_HOME=str(Path(tmp) / "flwr-home"), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(out_path)]
        launched = time.time()
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            with TreeMemorySampler(proc.pid) as sampler:
                try:
                    code = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _kill_tree(proc.pid)
                    raise SystemExit(f"{kind} scenario {experiment['experiment']} ran past {timeout:.0f} s "
                                     f"(log: {log_path})") from None
                finally:
                    _kill_tree(proc.pid)  # Ray processes a crashed driver left behind
        if code != 0 or not out_path.is_file():
            raise SystemExit(f"{kind} scenario {experiment['experiment']} failed with exit code {code} "
                             f"(log: {log_path})")
        out = json.loads(out_path.read_text())
    return summarize(kind, experiment, out, sampler, launched)


def _kill_tree(root: int) -> None:
    """SIGKILL every live process of a tree rooted at ``root`` (children first)."""
    import signal

    for pid in reversed(process_tree(root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _mean(values: Sequence[float]) -> float:
    """Arithmetic mean (NaN for no values)."""
    return sum(values) / len(values) if values else float("nan")


def summarize(kind: str, experiment: Mapping[str, Any], out: Mapping[str, Any], sampler: TreeMemorySampler,
              launched: float) -> dict[str, Any]:
    """Per strategy: round times, steady-state mean, peak memory in its window; plus start-up phases."""
    strategies = {}
    for name, ev in out["events"].items():
        marks = [ev["start"], *ev["rounds"]]
        per_round = [b - a for a, b in zip(marks, marks[1:])]
        strategies[name] = {"round_seconds": per_round, "first_round_seconds": per_round[0] if per_round else None,
                            "steady_round_seconds": _mean(per_round[1:]), "accuracy": ev.get("accuracy"),
                            "memory": sampler.peak(ev["start"], ev.get("end", math.inf))}
    first_start = min((ev["start"] for ev in out["events"].values()), default=out["process_end"])
    row: dict[str, Any] = {
        "kind": kind, "num_clients": experiment["data"]["num_clients"], "model": experiment["model"],
        "client_state": experiment["client_state"], "rounds": experiment["train"]["rounds"],
        "total_seconds": out["process_end"] - launched,
        "startup_seconds": first_start - launched,  # interpreter + imports + (Ray, actors, discovery) or data
        "strategies": strategies, "memory": sampler.peak(),
        "peak_processes": [{"name": n, "rss_mb": r / 1e6, "pss_mb": p / 1e6} for n, r, p in sampler.peak_breakdown[:12]],
    }
    phases = out.get("phases", {})
    if kind in ("flower", "inprocess") and "simulate_start" in phases:
        row["imports_seconds"] = phases["simulate_start"] - launched
        row["ray_start_seconds"] = phases.get("discovery_start", first_start) - phases["simulate_start"]
        row["discovery_seconds"] = phases.get("discovery_end", first_start) - phases.get("discovery_start", first_start)
        row["client_failures"] = out.get("client_failures")
        row["completed"] = out.get("completed")
    return row


# --- idle client state ------------------------------------------------------------------------------
def state_worker(size: str, clients: int, store_kind: str, dtype: str, directory: str | None) -> dict[str, Any]:
    """Fill one client-state store for ``clients`` idle clients (two saved rounds each); bytes per client."""
    import gc

    import numpy as np
    import torch

    from clients.state_store import DiskStore, MemoryStore
    from fedpower.codecs import build_codec, layout_of
    from fedpower.models import build_model

    torch.manual_seed(0)
    model = build_model(model_spec(size)["name"], shape_only_dataset(), **(model_spec(size).get("options") or {}))
    params = {k: v.detach() for k, v in model.state_dict().items()}
    inputs = layout_of(params)
    codec = build_codec(POWERSGD)
    _, state = codec.encode({k: torch.randn_like(v) for k, v in params.items()}, codec.init_state(inputs, seed=0),
                            torch.Generator().manual_seed(0))
    template = {k: v.numpy() for k, v in state.items()}
    state_bytes = sum(a.nbytes for a in template.values())
    store = MemoryStore(dtype=dtype) if store_kind == "memory" else DiskStore(directory or ".", dtype=dtype)  # type: ignore[arg-type]
    gc.collect()
    before = rss_bytes(os.getpid())
    rng = np.random.default_rng(0)
    for pid in range(clients):
        for server_round in (1, 2):  # a client that took part twice keeps two versions (redo-safe)
            noise = rng.standard_normal(1, dtype=np.float32)[0]
            store.save("powersgd", pid, server_round, {k: a + noise for k, a in template.items()})  # fresh arrays
    gc.collect()
    after = rss_bytes(os.getpid())
    disk = 0
    if store_kind == "disk":
        disk = sum(p.stat().st_size for p in Path(directory or ".").rglob("*.npz"))
    return {"store": store_kind, "dtype": dtype, "model": size, "clients": clients,
            "state_bytes_fp32_per_version": state_bytes,
            "rss_bytes_per_idle_client": (after - before) / clients, "disk_bytes_per_idle_client": disk / clients}


def measure_idle_state(size: str, clients: int) -> list[dict[str, Any]]:
    """RSS (and disk) per idle client of each store, each in a fresh subprocess."""
    rows = []
    for store_kind, dtype in (("memory", "float32"), ("memory", "float16"), ("disk", "float32"), ("disk", "float16")):
        with tempfile.TemporaryDirectory(prefix="fedpower-state-") as tmp:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--state-worker", size, str(clients), store_kind,
                   dtype, tmp]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise SystemExit(f"state measurement failed:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


# --- report ---------------------------------------------------------------------------------------------
def _params_of(size: str) -> int:
    """Parameter count of a model size label, from the model itself."""
    from fedpower.models import build_model

    spec = model_spec(size)
    return sum(p.numel() for p in build_model(spec["name"], shape_only_dataset(), **(spec.get("options") or {})).parameters())


def pair_rows(flower: Mapping[str, Any], bare: Mapping[str, Any], label: str,
              inprocess: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One table row per strategy: Ray engine and in-process engine vs the bare loop, in the same run."""
    rows = []
    for name, f in flower["strategies"].items():
        b = bare["strategies"][name]
        row = {} if inprocess is None else {
            "inprocess_round_s": inprocess["strategies"][name]["steady_round_seconds"],
            "inprocess_overhead_per_round": inprocess["strategies"][name]["steady_round_seconds"] / b["steady_round_seconds"],
            "inprocess_peak_rss_gb": inprocess["strategies"][name]["memory"]["rss_gb"],
            "accuracy_inprocess": inprocess["strategies"][name]["accuracy"]}
        rows.append({
            **row, "scenario": label, "num_clients": flower["num_clients"], "strategy": name,
            "flower_round_s": f["steady_round_seconds"], "bare_round_s": b["steady_round_seconds"],
            "overhead_per_round": f["steady_round_seconds"] / b["steady_round_seconds"],
            "flower_first_round_s": f["first_round_seconds"], "bare_first_round_s": b["first_round_seconds"],
            "flower_peak_rss_gb": f["memory"]["rss_gb"], "flower_peak_pss_gb": f["memory"]["pss_gb"],
            "bare_peak_rss_gb": b["memory"]["rss_gb"], "accuracy_flower": f["accuracy"], "accuracy_bare": b["accuracy"],
        })
    return rows


def markdown(doc: Mapping[str, Any]) -> str:
    """Markdown tables of the run."""
    out = []
    head = ("| N clients | model | strategy | bare s/round | in-process s/round | in-process / bare | Ray s/round | "
            "Ray / bare | in-process peak RSS | Ray peak RSS (tree) | Ray PSS | bare peak RSS |")
    for title, key in (("Clients axis", "clients_axis"), ("Model axis (N = 1000)", "model_axis")):
        pairs = doc.get(key) or []
        if not pairs:
            continue
        out += [f"**{title}**", "", head, "|" + "---|" * 12]
        for pair in pairs:
            for r in pair["rows"]:
                out.append(f"| {r['num_clients']} | {pair['model_label']} | {r['strategy']} | {r['bare_round_s']:.3f} | "
                           f"{r.get('inprocess_round_s', math.nan):.3f} | "
                           f"{r.get('inprocess_overhead_per_round', math.nan):.2f}× | {r['flower_round_s']:.3f} | "
                           f"{r['overhead_per_round']:.2f}× | {r.get('inprocess_peak_rss_gb', math.nan):.2f} GB | "
                           f"{r['flower_peak_rss_gb']:.2f} GB | {r['flower_peak_pss_gb']:.2f} GB | "
                           f"{r['bare_peak_rss_gb']:.2f} GB |")
        out.append("")
        out += ["| N clients | model | engine | total s | / bare total | imports s | engine start s | discovery s | "
                "start-up after imports s | peak RSS | PSS | processes |", "|" + "---|" * 12]
        for pair in pairs:
            b = pair["bare"]
            for kind, label in (("inprocess", "in-process"), ("flower", "Ray")):
                if kind not in pair:
                    continue
                f = pair[kind]
                after_imports = f.get("ray_start_seconds", 0) + f.get("discovery_seconds", 0)
                out.append(f"| {f['num_clients']} | {pair['model_label']} | {label} | {f['total_seconds']:.1f} | "
                           f"{f['total_seconds'] / b['total_seconds']:.2f}× | {f.get('imports_seconds', 0):.1f} | "
                           f"{f.get('ray_start_seconds', 0):.1f} | {f.get('discovery_seconds', 0):.1f} | "
                           f"{after_imports:.1f} | {f['memory']['rss_gb']:.2f} GB | {f['memory']['pss_gb']:.2f} GB | "
                           f"{f['memory']['processes']} |")
        out.append("")
    if doc.get("idle_state"):
        out += ["**Memory per idle client** (PowerSGD r4 state of the model, two saved rounds kept)", "",
                "| store | dtype | model | RSS per idle client | disk per idle client |", "|---|---|---|---|---|"]
        for r in doc["idle_state"]:
            out.append(f"| {r['store']} | {r['dtype']} | {r['model']} | {r['rss_bytes_per_idle_client'] / 1e6:.3f} MB | "
                       f"{r['disk_bytes_per_idle_client'] / 1e6:.3f} MB |")
    return "\n".join(out)


def plot(doc: Mapping[str, Any], path: Path) -> None:
    """Seconds per round and peak memory against N (clients axis) and against parameters (model axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    clients = doc.get("clients_axis") or []
    for strategy, color in (("fedavg", "tab:blue"), ("powersgd", "tab:orange")):
        xs = [p["flower"]["num_clients"] for p in clients]
        rows = [next(r for r in p["rows"] if r["strategy"] == strategy) for p in clients]
        if xs:
            axes[0].plot(xs, [r["flower_round_s"] for r in rows], "o-", color=color, label=f"{strategy} Ray")
            if all("inprocess_round_s" in r for r in rows):
                axes[0].plot(xs, [r["inprocess_round_s"] for r in rows], "^-.", color=color,
                             label=f"{strategy} in-process")
            axes[0].plot(xs, [r["bare_round_s"] for r in rows], "s--", color=color, label=f"{strategy} bare loop")
    axes[0].set(xlabel="clients N (10 sampled per round)", ylabel="seconds per round (steady state)",
                title="time per round, 1-D CNN")
    if clients:
        xs = [p["flower"]["num_clients"] for p in clients]
        axes[1].plot(xs, [p["flower"]["memory"]["rss_gb"] for p in clients], "o-", label="Ray, RSS sum")
        axes[1].plot(xs, [p["flower"]["memory"]["pss_gb"] for p in clients], "o:", label="Ray, PSS sum")
        if all("inprocess" in p for p in clients):
            axes[1].plot(xs, [p["inprocess"]["memory"]["rss_gb"] for p in clients], "^-.", label="in-process, RSS")
        axes[1].plot(xs, [p["bare"]["memory"]["rss_gb"] for p in clients], "s--", label="bare loop, RSS")
    axes[1].axhline(TARGET_RSS_GB, color="grey", lw=0.8, ls=":")
    axes[1].set(xlabel="clients N", ylabel="peak memory of the process tree (GB)", title="peak memory, 1-D CNN")
    models = doc.get("model_axis") or []
    if models:
        xs = [_params_of(p["model_label"]) for p in models]
        axes[2].plot(xs, [p["flower"]["memory"]["rss_gb"] for p in models], "o-", label="Ray, RSS sum")
        axes[2].plot(xs, [p["flower"]["memory"]["pss_gb"] for p in models], "o:", label="Ray, PSS sum")
        if all("inprocess" in p for p in models):
            axes[2].plot(xs, [p["inprocess"]["memory"]["rss_gb"] for p in models], "^-.", label="in-process, RSS")
        axes[2].plot(xs, [p["bare"]["memory"]["rss_gb"] for p in models], "s--", label="bare loop, RSS")
        axes[2].set_xscale("log")
    axes[2].axhline(TARGET_RSS_GB, color="grey", lw=0.8, ls=":")
    axes[2].set(xlabel="model parameters (MLP)", ylabel="peak memory (GB)", title="peak memory, 1000 clients")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def pregenerate(experiments: Sequence[Mapping[str, Any]]) -> None:
    """Generate (and cache) each mnist1d variant once, outside every timed scenario."""
    from fedpower.experiment import as_experiment, experiment_data

    for experiment in experiments:
        started = time.perf_counter()
        experiment_data(as_experiment(experiment))
        print(f"data for {experiment['experiment']}: {time.perf_counter() - started:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, then print and save the tables, the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 500, 1000], help="clients axis (N values)")
    parser.add_argument("--sizes", nargs="*", default=["100k", "1m", "10m"], choices=sorted(MLP_WIDTHS),
                        help="model axis (MLP sizes) at --model-axis-clients clients; none to skip")
    parser.add_argument("--model-axis-clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per strategy (default %(default)s)")
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--samples-per-client", type=int, default=100,
                        help="mnist1d training examples per client (the data set grows with N)")
    parser.add_argument("--idle-state-clients", type=int, default=200,
                        help="clients filled into each store for the per-idle-client memory (0 skips)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per scenario")
    parser.add_argument("--quick", action="store_true", help="N = 100, 3 rounds, no model axis, small idle-state run")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--state-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    if args.state_worker:
        size, clients, store, dtype, directory = args.state_worker
        print(json.dumps(state_worker(size, int(clients), store, dtype, directory)))
        return 0
    if args.quick:
        args.clients, args.sizes, args.rounds, args.idle_state_clients = [100], [], 3, 50

    started = time.time()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = ROOT / "results" / "scale-logs"  # gitignored: each scenario's console output
    log_dir.mkdir(parents=True, exist_ok=True)
    plan = [("cnn1d", n) for n in args.clients] + [(size, args.model_axis_clients) for size in args.sizes]
    experiments = {(size, n): experiment_for(n, size, args.rounds, args.clients_per_round, args.samples_per_client)
                   for size, n in plan}
    pregenerate(list({e["data"]["num_clients"]: e for e in experiments.values()}.values()))

    doc: dict[str, Any] = {
        "benchmark": "scale", "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/scale.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(("torch", "flwr", "ray")),
        "note": "2 CPU cores shared with other jobs during the run: timings are noisy; ratios are taken "
                "within the same run",
        "setup": {"rounds": args.rounds, "clients_per_round": args.clients_per_round, "local_epochs": 1,
                  "batch_size": 32, "samples_per_client": args.samples_per_client, "partition": "iid",
                  "strategies": STRATEGIES, "simulation": experiments[plan[0]]["simulation"],
                  "params": {size: _params_of(size) for size, _ in plan}},
        "clients_axis": [], "model_axis": [],
    }
    for size, n in plan:
        experiment = experiments[(size, n)]
        pair: dict[str, Any] = {"model_label": size, "params": _params_of(size)}
        for kind in ("bare", "inprocess", "flower"):
            print(f"--- {kind}: N={n}, model {size}, {args.rounds} rounds × {len(STRATEGIES)} strategies", flush=True)
            pair[kind] = run_scenario(kind, experiment, args.timeout, log_dir)
            print(f"    total {pair[kind]['total_seconds']:.1f} s, peak RSS {pair[kind]['memory']['rss_gb']:.2f} GB "
                  f"(PSS {pair[kind]['memory']['pss_gb']:.2f} GB)", flush=True)
        pair["rows"] = pair_rows(pair["flower"], pair["bare"], f"N={n} {size}", pair["inprocess"])
        doc["clients_axis" if size == "cnn1d" else "model_axis"].append(pair)
    if args.idle_state_clients:
        print(f"--- idle client state: 1m model, {args.idle_state_clients} clients per store", flush=True)
        doc["idle_state"] = measure_idle_state("1m", args.idle_state_clients)
    doc["wall_seconds"] = time.time() - started
    doc["markdown"] = markdown(doc)
    png = args.results_dir / "scale.png"
    plot(doc, png)
    out_json = args.results_dir / "scale.json"
    write_json(doc, out_json)
    print(doc["markdown"])
    print(f"wrote {out_json}, {png} in {doc['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
