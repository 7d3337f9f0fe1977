"""Scale: simulation settings chosen for the machine, a 200-client run, and a real two-node Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from strategies.simulation import DEFAULT_OBJECT_STORE_MB, actor_budget, backend_config

ROOT = Path(__file__).resolve().parent.parent


# --- settings (fast) -------------------------------------------------------------------------------------
def test_actor_budget_caps_concurrency_and_keeps_one_actor() -> None:
    """Flower starts Ray-CPUs / share actors: the cap holds, and a share above the machine still runs one."""
    def actors(cpus: int, share: float, cap: int | None) -> int:
        ray_cpus, per_client = actor_budget(cpus, share, cap)
        return int(ray_cpus / per_client + 1e-9)

    assert actors(2, 1.0, None) == 2  # default: one client per core
    assert actors(2, 1.0, 1) == 1
    assert actors(2, 0.5, None) == 4
    assert actors(2, 0.5, 3) == 3  # 1.5 CPUs is not a whole number: the cap still holds
    assert actors(16, 2.0, 3) == 3 and actor_budget(16, 2.0, 3) == (6, 2.0)  # 2 threads per client kept
    assert actors(2, 4.0, None) == 1  # share larger than the machine: one client rather than an empty pool
    assert actors(2, 1.0, 8) == 2  # a cap above the machine changes nothing


def test_backend_config_local_defaults_and_cluster_address() -> None:
    """Local Ray gets a CPU budget and a bounded object store; an existing cluster gets only its address."""
    from fedpower.config import SimulationConfig

    def ray(**keys: Any) -> SimulationConfig:
        return SimulationConfig.model_validate({"engine": "ray", **keys})

    local = backend_config(ray(num_cpus_per_client=1.0, max_concurrent_clients=1), verbose=False)
    init = local["init_args"]
    assert init["num_cpus"] == 1 and local["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert init["object_store_memory"] == DEFAULT_OBJECT_STORE_MB * 2**20
    assert init["log_to_driver"] is False and init["include_dashboard"] is False
    tuned = backend_config(ray(object_store_memory_mb=128, ray_init_args={"_temp_dir": "/tmp/x"}), verbose=True)
    assert tuned["init_args"]["object_store_memory"] == 128 * 2**20 and tuned["init_args"]["_temp_dir"] == "/tmp/x"
    assert tuned["init_args"]["log_to_driver"] is True
    cluster = backend_config(ray(ray_address="127.0.0.1:6379", max_concurrent_clients=1), verbose=False)
    # Ray refuses resource sizes when it attaches to a running cluster.
    assert cluster["init_args"]["address"] == "127.0.0.1:6379"
    assert not {"num_cpus", "object_store_memory"} & set(cluster["init_args"])


def test_cluster_address_with_local_sizes_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    """run.py exits 2 naming the field when a local-only size is combined with ray_address."""
    from fedpower.cli import main

    code = main([str(ROOT / "configs" / "scale_1000.yaml"), "--dry-run", "--set", "simulation.ray_address=auto"])
    assert code == 2
    err = capsys.readouterr().err
    assert "simulation.object_store_memory_mb" in err and "ray_address" in err


def test_scale_1000_config_is_valid_and_samples_ten_percent() -> None:
    """The shipped 1000-client config: 100 clients per round, residuals of idle clients on disk."""
    from fedpower.config import load_config

    config = load_config(ROOT / "configs" / "scale_1000.yaml")
    assert config.data.num_clients == 1000
    assert all(settings.clients_per_round == 100 for settings in config.resolved())
    assert config.client_state.store == "disk"


# --- 200 clients in one simulation (slow) -----------------------------------------------------------
def _experiment(num_clients: int, state_dir: Path) -> dict[str, Any]:
    """A tiny model on mnist1d's default 4000 examples (20 per client), 10 % sampled, 2 rounds."""
    from fedpower.config import parse_config

    return parse_config({
        "experiment": "scale-test", "seed": 0,
        "data": {"dataset": "mnist1d", "num_clients": num_clients, "partition": {"kind": "iid"}},
        "model": {"name": "logreg"},
        "train": {"rounds": 2, "fraction": 0.1, "clients_per_round": None, "local_epochs": 1, "batch_size": 32,
                  "lr": 0.05, "device": "cpu"},
        "client_state": {"store": "disk", "dir": str(state_dir), "dtype": "float16"},
        "strategies": [{"name": "fedavg"},
                       {"name": "powersgd", "compression": {"method": "powersgd", "rank": 2, "quantize_bits": 8}}],
    }).to_dict()


@pytest.mark.slow
def test_two_hundred_clients_in_one_simulation(tmp_path: Path) -> None:
    """200 virtual clients, 20 per round, both strategies complete; residuals are spilled per sampled client."""
    from strategies.simulation import simulate

    experiment = _experiment(200, tmp_path / "state")
    started = time.perf_counter()
    results = simulate(experiment)
    seconds = time.perf_counter() - started
    assert seconds < 600
    sampled: set[int] = set()
    for name in ("fedavg", "powersgd"):
        result = results.strategies[name]
        assert result.completed and len(result.rounds) == 2, name
        for row in result.rounds:
            assert row["clients"] == 20 and row["accepted"] == 20 and row["failures"] == 0, (name, row)
        ups = [t for t in result.ledger.transfers if t.direction == "up"]
        partitions = {t.client for t in ups}
        assert len(ups) == 40 and partitions <= set(range(200)), name
        if name == "powersgd":
            sampled = partitions
    # logreg is 410 parameters, so Flower's framing dominates the wire bytes: compare the payloads.
    payload = {name: results.strategies[name].ledger.total("up", "payload_bytes") for name in ("fedavg", "powersgd")}
    assert payload["powersgd"] * 3 < payload["fedavg"]
    # Only clients that trained hold state, one folder each, and only the compressing strategy has any.
    folders = {p.name for p in (tmp_path / "state" / "scale-test" / "powersgd").iterdir()}
    assert folders == {f"partition-{p}" for p in sampled}
    assert not (tmp_path / "state" / "scale-test" / "fedavg").exists()


# --- a real two-node Ray cluster (slow) -------------------------------------------------------------------
CLUSTER_SCRIPT = textwrap.dedent("""\
    set -u
    # A private network namespace holds only the loopback interface: Ray binds its servers to every
    # interface of the host (and rewrites 127.0.0.1 to the routable address), so this is what keeps the
    # cluster on 127.0.0.1.
    ip link set lo up
    export RAY_USAGE_STATS_ENABLED=0
    RAY="$1"; PORT="$2"; WORK="$3"; shift 3
    HEAD=""; NODE=""
    # Stop both nodes however this script ends (the test also kills the whole session afterwards).
    trap 'kill -TERM $HEAD $NODE 2>/dev/null; wait' EXIT
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=1 --temp-dir="$WORK/head" \\
        --include-dashboard=false --object-store-memory=100000000 --block > "$WORK/head.log" 2>&1 &
    HEAD=$!
    for i in $(seq 1 {wait}); do grep -q "Ray runtime started" "$WORK/head.log" && break; sleep 1; done
    "$RAY" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 --temp-dir="$WORK/node" \\
        --object-store-memory=100000000 --block > "$WORK/node.log" 2>&1 &
    NODE=$!
    for i in $(seq 1 {wait}); do grep -q "Ray runtime started" "$WORK/node.log" && break; sleep 1; done
    "$@"
""")


def _free_port() -> int:
    """A TCP port nobody listens on right now (in the private namespace every port is free anyway)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _can_unshare_network() -> bool:
    """Whether this process may create a private network namespace (root or user namespaces)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_run_py_on_a_two_node_ray_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """run.py --set simulation.engine=ray simulation.ray_address=... trains on a head and a worker node (one CPU each)."""
    if not _can_unshare_network():
        pytest.skip("needs `unshare -n` (a private loopback-only network) to keep Ray's servers off the network")
    ray_cli = Path(sys.executable).with_name("ray")
    port = _free_port()
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent("""\
        experiment: ray-cluster
        data: {dataset: mnist1d, num_clients: 8, partition: {kind: iid}}
        model: {name: logreg}
        train: {rounds: 2, clients_per_round: 4, local_epochs: 1, device: cpu}
        strategies:
          - name: fedavg
          - name: powersgd
            compression: {method: powersgd, rank: 2}
    """))
    command = [sys.executable, str(ROOT / "run.py"), str(config), "--out", str(out), "--no-plots",
               "--set", "simulation.engine=ray", "--set", f"simulation.ray_address=127.0.0.1:{port}"]
    script = CLUSTER_SCRIPT.format(wait=240)
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), FEDPOWER_CACHE=os.environ.get(
        "FEDPOWER_CACHE", str(Path.home() / ".cache" / "fedpower")))
    # Ray's Unix sockets live under its temp dir and AF_UNIX paths stop at 107 bytes: pytest's tmp_path is too long.
    ray_dir = Path(tempfile.mkdtemp(prefix="fpray-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(ray_dir, ignore_errors=True))
    proc = subprocess.Popen(["unshare", "-n", "bash", "-c", script, "cluster", str(ray_cli), str(port),
                             str(ray_dir), *command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=540)
    finally:
        # Everything the cluster started lives in this session: take it down, also on failure or timeout.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3 if sig == signal.SIGTERM else 0)
        proc.wait(timeout=30)
    assert proc.returncode == 0, output[-3000:]
    results = json.loads((out / "results.json").read_text())
    for strategy in results["strategies"]:
        assert len(strategy["rounds"]) == 2 and strategy["final"]["client_failures"] == 0, strategy["name"]
    # Each node keeps the logs of the Ray workers it ran: both must have run a Flower client actor.
    for node in ("head", "node"):
        logs = list((ray_dir / node).glob("session_*/logs/worker-*.out"))
        assert any("ClientAppActor" in log.read_text(errors="replace") for log in logs), (node, len(logs))
