"""A real deployment on 127.0.0.1: SuperLink + two SuperNodes over TLS with node authentication.

Everything docs/deployment.md tells a user to run, in the same order, with throwaway certificates and
keys made at test time and a temporary FLWR_HOME. Checked: an unregistered SuperNode is refused; two
registered ones train 3 rounds of shared PowerSGD int8 through ``flwr run``; accuracy improves; the
ledger's uplink bytes match the per-run traffic the SuperLink reports; a SuperNode stopped (SIGTERM,
as a reboot does) and restarted between its rounds continues from the residual it had on disk (the
ServerApp waits up to ``train.failures.rejoin_wait_s`` for a sampled node that is offline).
Every process is started in its own session and killed (group and descendants) in a finally block.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONNECTION = "fedpower-test"
SEED = 5  # with one client per round, partition 0 trains in rounds 1 and 3 and idles in round 2
OVERRIDES = f"train.clients_per_round=1; seed={SEED}"


# ----------------------------------------------------------------------------------------------
# Certificates and node keys (what `openssl` / `ssh-keygen` do in docs/deployment.md).


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a SuperLink certificate for 127.0.0.1 / localhost, signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def write_key(key: Any, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpower test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1)).add_extension(san, critical=False)
                   .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, paths["key"])
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format: (private key for the SuperNode, public key to register)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


# ----------------------------------------------------------------------------------------------
# Processes: each in its own session; torn down with its whole tree, whatever happens.


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc), so that children that left the group die too."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Proc:
    """A started command with its log file; ``kill`` takes down its process group and descendants."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path) -> None:
        """Start ``args`` in a new session, output to ``log_dir/<name>.log``."""
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)

    def text(self) -> str:
        """Everything the process printed so far."""
        return self.log.read_text(errors="replace")

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the main process only, as systemd or a shutdown does, so it can sign off; then ``kill``.

        Signalling the whole group at once also stops the SuperNode's helpers while it is still
        shutting down, and then it may never tell the SuperLink it is leaving (it stays 'online' until
        its heartbeat lapses, ≈60 s, and refuses a restart with the same key until then).
        """
        try:
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        """Signal the group and every descendant; SIGKILL whatever is left after ``grace`` seconds."""
        pids = [self.popen.pid, *descendants(self.popen.pid)]
        for one in (sig, signal.SIGKILL) if sig != signal.SIGKILL else (signal.SIGKILL,):
            try:
                os.killpg(self.popen.pid, one)
            except ProcessLookupError:
                pass
            for pid in pids:
                try:
                    os.kill(pid, one)
                except ProcessLookupError:
                    pass
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            if one == signal.SIGKILL or all(not Path(f"/proc/{p}").exists() for p in pids[1:]):
                break
        self.popen.wait(timeout=grace)


def wait_for(what: str, check: Callable[[], Any], timeout: float, procs: list[Proc], interval: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the processes' logs on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    logs = "\n".join(f"----- {p.name} -----\n{p.text()[-3000:]}" for p in procs)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ----------------------------------------------------------------------------------------------


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Certificates, keys, FLWR_HOME with the connection, and a process list torn down at the end."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    certs = make_certificates(tmp_path)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs["ca"]}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    procs: list[Proc] = []
    with ExitStack() as stack:
        stack.callback(lambda: [p.kill() for p in reversed(procs)])
        yield {"tmp": tmp_path, "home": home, "certs": certs, "port": port, "env": env, "procs": procs}


def flwr(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """One `flwr` CLI call (bounded in time)."""
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def json_out(proc: subprocess.CompletedProcess[str]) -> Any:
    """The JSON document a `flwr ... --format json` call printed."""
    text = proc.stdout
    return json.loads(text[text.index("{"):])


def initial_accuracy(overrides: str) -> float:
    """Test accuracy of the untrained global model, computed the way the ServerApp does."""
    from fedpower.app_config import experiment_from_run_config
    from fedpower.experiment import experiment_data, experiment_model
    from fedpower.training import evaluate

    experiment = experiment_from_run_config({"config": "configs/deployment.yaml", "overrides": overrides})
    dataset, _, _, _, x_test, y_test = experiment_data(experiment)
    model = experiment_model(experiment.resolved()[0], dataset)
    return float(evaluate(model, x_test, y_test)[1])


def test_tls_node_auth_training_traffic_and_restart(deployment: dict[str, Any]) -> None:
    """The documented deployment end to end (see the module docstring for what is checked)."""
    from fedpower.privacy import cohort_sampler

    tmp, env, certs, port, procs = (deployment[k] for k in ("tmp", "env", "certs", "port", "procs"))
    untrained = initial_accuracy(OVERRIDES)  # also fills the data cache the SuperNodes read
    started = time.monotonic()
    # 1. SuperLink with TLS and SuperNode authentication, offline (no `uv sync` of the app).
    superlink = Proc("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]),
                                   "--ssl-certfile", str(certs["cert"]), "--ssl-keyfile", str(certs["key"]),
                                   "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                                   "--host", "127.0.0.1", "--port", str(port)], env, tmp, tmp)
    procs.append(superlink)
    wait_for("the SuperLink to listen", lambda: port_open(port), 60, procs)

    # 2. Node keys; register two of them, keep a third unregistered.
    keys = [make_node_key(tmp, f"node{i}") for i in range(3)]
    node_ids: list[int] = []
    registering = [subprocess.Popen([str(BIN / "flwr"), "supernode", "register", str(public), CONNECTION, "--format",
                                     "json"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True) for _, public in keys[:2]]
    for reg in registering:
        try:
            output, _ = reg.communicate(timeout=90)
        finally:
            if reg.poll() is None:
                os.killpg(reg.pid, signal.SIGKILL)
        answer = json.loads(output[output.index("{"):])
        assert reg.returncode == 0 and answer["success"], output
        node_ids.append(int(answer["node-id"]))

    def supernode(index: int, partition: int, name: str | None = None) -> Proc:
        state_dir = tmp / f"state{index}"
        node_config = f'partition-id={partition} num-partitions=2 state-dir="{state_dir}"'
        return Proc(name or f"supernode{index}", [
            str(BIN / "flower-supernode"), "--root-certificates", str(certs["ca"]),
            "--superlink", f"127.0.0.1:{port}", "--auth-supernode-private-key", str(keys[index][0]),
            "--node-config", node_config, "--port", str(runtime_ports[index]), "--max-retries", "0"],
            env, tmp, tmp)

    runtime_ports = [free_port() for _ in range(3)]
    # 3. The two registered SuperNodes, and an unregistered one that must be refused (it exits with an error).
    intruder = supernode(2, 0)
    nodes = [supernode(0, 0), supernode(1, 1)]
    procs.extend([intruder, *nodes])
    wait_for("the unregistered SuperNode to be refused", lambda: intruder.popen.poll() is not None, 90, procs)
    assert intruder.popen.returncode != 0, intruder.text()
    assert "Failed to initialize the connection to the SuperLink" in intruder.text(), intruder.text()
    assert "No SuperNode found with the given public key" in superlink.text()
    procs.remove(intruder)

    # 4. `flwr run` the app (the repository itself) against the SuperLink.
    out_dir = tmp / "results"
    run = flwr(env, "run", str(REPO), CONNECTION, "--format", "json", "--run-config",
               f"out-dir='{out_dir}' overrides='{OVERRIDES}'")
    assert run.returncode == 0, run.stdout + run.stderr
    run_id = int(json_out(run)["run-id"])
    results_path, metrics_path = out_dir / "results.json", out_dir / "client_metrics.json"

    def rounds_done() -> int:
        try:
            return len(json.loads(results_path.read_text())["strategies"][0]["rounds"])
        except (OSError, ValueError, IndexError, KeyError):
            return 0

    # 5. Stop the SuperNode of partition 0 after its round (its memory, Context.state included, is gone) and
    # restart it while it idles. SIGTERM, as a reboot does: the node signs off, so the SuperLink lets the same
    # key back in at once. After SIGKILL (a power cut) the SuperLink refuses to re-activate the node until its
    # heartbeat lapses (up to 60 s); the state on disk is restored the same way.
    sample = cohort_sampler(SEED, [0, 1], 1, "fixed")
    assert [sample(r) for r in (1, 2, 3)] == [[0], [1], [0]]
    wait_for("round 1 to finish", lambda: rounds_done() >= 1, 240, procs)
    assert (tmp / "state0" / "deployment" / "powersgd-shared-r4-int8" / "partition-0" / "round-00000001.npz").is_file()
    nodes[0].stop()
    procs.remove(nodes[0])

    def node_status(node_id: int) -> str | None:
        listing = flwr(env, "supernode", "ls", CONNECTION, "--format", "json")
        if listing.returncode != 0:
            return None
        return next((n["status"] for n in json_out(listing)["nodes"] if int(n["node-id"]) == node_id), None)

    wait_for("the stopped SuperNode to sign off", lambda: node_status(node_ids[0]) == "offline", 60, procs,
             interval=1.0)
    restarted = supernode(0, 0, "supernode0-restarted")
    procs.append(restarted)

    def finished() -> dict[str, Any] | None:
        listing = flwr(env, "ls", CONNECTION, "--format", "json")
        if listing.returncode != 0:
            return None
        for row in json_out(listing)["runs"]:
            if int(row["run-id"]) == run_id and str(row["status"]).startswith("finished"):
                return row
        return None

    # The ServerApp writes metrics.csv last; only then is `flwr ls` (a slow CLI call) worth asking.
    wait_for("the ServerApp to write its results", lambda: (out_dir / "metrics.csv").is_file(), 240, procs)
    row = wait_for("the run to finish", finished, 60, procs, interval=2.0)
    assert row["status"] == "finished:completed", (row, superlink.text()[-3000:])
    duration = time.monotonic() - started

    results = json.loads(results_path.read_text())
    strategy = results["strategies"][0]
    assert strategy["name"] == "powersgd-shared-r4-int8" and strategy["completed"]
    accuracies = [r["accuracy"] for r in strategy["rounds"]]
    assert len(accuracies) == 3 and all(r["failures"] == 0 for r in strategy["rounds"]), strategy["rounds"]
    # One client per round and a half-step of the shared basis per round: progress is real but not monotone
    # (measured, deterministic for the seed: untrained 0.123, rounds 0.119 / 0.261 / 0.203).
    assert max(accuracies) > untrained + 0.1 and accuracies[-1] > untrained + 0.05, (untrained, accuracies)
    assert (out_dir / "metrics.csv").is_file() and (out_dir / "ledger.csv").is_file()

    # 6. The restarted node loaded the residual it saved in round 1 (norm in of round 3 = norm out of round 1).
    client_metrics = json.loads(metrics_path.read_text())["powersgd-shared-r4-int8"]
    by_round = {int(r): rows[0] for r, rows in client_metrics.items()}
    assert [int(by_round[r]["partition-id"]) for r in (1, 2, 3)] == [0, 1, 0]
    assert by_round[1]["state_norm_in"] == 0.0 and by_round[1]["state_norm_out"] > 0
    assert by_round[3]["state_norm_in"] == pytest.approx(by_round[1]["state_norm_out"], rel=1e-6)

    # 7. Uplink: the SuperLink's inbound traffic for the run = our ledger's uplink (content, message
    # headers and the two partition answers at start-up) + the Fleet API's framing (pull/push requests,
    # the metadata they repeat, object-id trees). The ledger's header model must never exceed the real wire.
    ledger_up = strategy["final"]["uplink_bytes_total"]
    assert strategy["final"]["uplink_discover_bytes_total"] > 0 and strategy["final"]["uplink_header_bytes_total"] > 0
    traffic = row["network-traffic"]
    inbound, outbound = int(traffic["inbound-bytes"]), int(traffic["outbound-bytes"])
    # Measured: 9,914 B ledger (8,439 B before headers and discovery were counted), 13,071 B inbound
    # (≈ 630 B of framing per reply message); allow 2 kB per reply message.
    replies = 2 + len(accuracies)  # two partition queries at start-up, one train reply per round
    assert 0 < ledger_up <= inbound <= ledger_up + 2_000 * replies, (ledger_up, inbound)
    ledger_down = strategy["final"]["downlink_bytes_total"]
    assert ledger_down <= outbound, (ledger_down, outbound)
    print(f"\ndeployment: {duration:.1f} s; accuracy {accuracies}; uplink ledger {ledger_up} B, SuperLink "
          f"inbound {inbound} B; downlink ledger {ledger_down} B, outbound {outbound} B")


def _kill_matching(needle: str) -> None:
    """SIGKILL every process whose command line mentions ``needle`` (and their descendants)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and int(entry.name) != os.getpid():
            for pid in [int(entry.name), *descendants(int(entry.name))]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_flwr_run_against_a_local_simulation(tmp_path: Path) -> None:
    """`flwr run .` on a local simulation connection (Flower starts its own SuperLink) writes our results."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
                                      "options.num-supernodes = 4\n")
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    out_dir = tmp_path / "results"
    try:
        run = flwr(env, "run", str(REPO), "local", "--format", "json", "--run-config",
                   f"out-dir='{out_dir}' overrides='data.num_clients=4; train.rounds=2; train.clients_per_round=2'",
                   timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        run_id = int(json_out(run)["run-id"])

        def status() -> str | None:
            listing = flwr(env, "ls", "local", "--format", "json")
            if listing.returncode != 0:
                return None
            found = [r for r in json_out(listing)["runs"] if int(r["run-id"]) == run_id]
            return str(found[0]["status"]) if found and str(found[0]["status"]).startswith("finished") else None

        final = wait_for("the local simulation run to finish", status, 300, [], interval=3.0)
        assert final == "finished:completed", (home / "local-superlink" / "superlink.log").read_text()[-3000:]
        results = json.loads((out_dir / "results.json").read_text())
        rounds = results["strategies"][0]["rounds"]
        assert [r["round"] for r in rounds] == [1, 2] and all(r["uplink_bytes"] > 0 for r in rounds)
        assert (out_dir / "metrics.csv").is_file() and (out_dir / "ledger.csv").is_file()
    finally:
        _kill_matching(str(home))  # the local SuperLink is detached and would outlive the test
