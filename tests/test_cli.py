"""run.py as a user runs it: a subprocess, exit codes, files, messages."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = """\
experiment: tiny
seed: 3
data:
  dataset: mnist1d
  num_clients: 8
  partition: {kind: iid}
model: {name: mlp, options: {hidden: [32]}}
train: {rounds: 2, clients_per_round: 3, local_epochs: 1, batch_size: 32, lr: 0.05}
strategies:
  - name: fedavg
  - name: psgd
    compression: {method: powersgd, mode: shared, rank: 2, quantize_bits: 8}
"""


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run run.py in a subprocess from the repository root."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    """A tiny valid experiment file."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def _metrics(results: dict) -> list:
    """Per-round metrics without timings."""
    return [[{k: v for k, v in r.items() if k != "seconds"} for r in s["rounds"]] for s in results["strategies"]]


@pytest.mark.slow
def test_run_writes_results_and_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    """Exit 0, results.json per the DESIGN schema, CSV and PNGs; same seed → same metrics.

    The second run also simulates 3g links: the same metrics plus link times in the report.
    """
    outs, stdouts = [], []
    for i in range(2):
        out = tmp_path / f"out{i}"
        proc = run_cli(str(tiny), "--out", str(out), *(["--set", "network.profile=3g"] if i else []))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        outs.append(out)
        stdouts.append(proc.stdout)
    results = json.loads((outs[0] / "results.json").read_text())
    assert results["experiment"] == "tiny" and results["config"]["seed"] == 3 and "environment" in results
    assert [s["name"] for s in results["strategies"]] == ["fedavg", "psgd"]
    for strategy in results["strategies"]:
        assert len(strategy["rounds"]) == 2
        for row in strategy["rounds"]:
            assert {"round", "accuracy", "loss", "uplink_bytes", "downlink_bytes", "epsilon", "seconds"} <= set(row)
            assert isinstance(row["uplink_bytes"], int) and row["uplink_bytes"] > 0
            assert 0.0 <= row["accuracy"] <= 1.0
        final = strategy["final"]
        for key in ("accuracy", "uplink_bytes_total", "downlink_bytes_total", "uplink_ratio_vs_dense",
                    "downlink_ratio_vs_dense", "epsilon", "wall_seconds"):
            assert key in final
    psgd, fedavg = results["strategies"][1]["final"], results["strategies"][0]["final"]
    assert psgd["uplink_bytes_total"] < fedavg["uplink_bytes_total"]
    with (outs[0] / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {"strategy", "round", "accuracy", "cumulative_uplink_bytes"} <= set(rows[0])
    with (outs[0] / "ledger.csv").open() as fh:
        ledger = list(csv.DictReader(fh))
    assert ledger and {"strategy", "direction", "wire_bytes", "purpose"} <= set(ledger[0])
    assert sum(int(r["wire_bytes"]) for r in ledger if r["strategy"] == "psgd" and r["direction"] == "up") == \
        psgd["uplink_bytes_total"]
    for png in ("accuracy_vs_round.png", "accuracy_vs_uplink.png", "bytes_per_round.png"):
        assert (outs[0] / png).stat().st_size > 1000
    assert (outs[0] / "run.log").exists()
    again = json.loads((outs[1] / "results.json").read_text())
    assert _metrics(again) == _metrics(results)
    assert "network" not in results and "link time" not in stdouts[0]
    network = again["network"]
    for name in ("fedavg", "psgd"):
        times = network["strategies"][name]["round_seconds"]
        assert set(times) == {"1", "2"} and all(t > 0 for t in times.values())
    assert network["strategies"]["psgd"]["total_seconds"] < network["strategies"]["fedavg"]["total_seconds"]
    assert "link time" in stdouts[1] and (outs[1] / "accuracy_vs_time.png").stat().st_size > 1000
    with (outs[1] / "metrics.csv").open() as fh:
        assert float(list(csv.DictReader(fh))[-1]["cumulative_sim_seconds"]) > 0


BAD = [
    ("typo key", TINY.replace("rounds: 2", "rouns: 2"), ["rouns", "rounds"]),
    ("wrong type", TINY.replace("rounds: 2", "rounds: many"), ["train.rounds"]),
    ("negative rounds", TINY.replace("rounds: 2", "rounds: -1"), ["train.rounds"]),
    ("missing data file", TINY.replace("dataset: mnist1d", "dataset: npz\n  path: nowhere/data.npz"), ["nowhere"]),
    ("unknown method", TINY.replace("method: powersgd", "method: zipit"), ["compression.method"]),
]


@pytest.mark.parametrize("label,text,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_configs_exit_2_with_field_named(tmp_path: Path, label: str, text: str, needles: list[str]) -> None:
    """A user mistake: exit 2, a message naming the field, no traceback."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = run_cli(str(path), timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, (needle, output)


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    """A config path that does not exist is named."""
    proc = run_cli(str(tmp_path / "nope.yaml"), timeout=60)
    assert proc.returncode == 2 and "nope.yaml" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_overrides_and_dry_run(tiny: Path) -> None:
    """--set is applied and validated; --dry-run shows the resolved config and the dense size."""
    proc = run_cli(str(tiny), "--dry-run", "--set", "train.rounds=7", "--set", "strategies.psgd.compression.rank=3",
                   timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"rounds": 7' in proc.stdout and '"rank": 3' in proc.stdout
    assert "parameters" in proc.stdout and "dense fp32 update" in proc.stdout
    bad = run_cli(str(tiny), "--set", "train.rounds=-3", timeout=60)
    assert bad.returncode == 2 and "train.rounds" in bad.stdout + bad.stderr
    bad = run_cli(str(tiny), "--set", "train.rounds", timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr


def test_privacy_config_dry_runs(tiny: Path, tmp_path: Path) -> None:
    """A DP strategy validates, σ is calibrated for a target ε, and the planned ε is shown (exit 0)."""
    path = tmp_path / "dp.yaml"
    path.write_text(TINY.replace("quantize_bits: 8}", "quantize_bits: 8}\n    privacy: {mode: central, clip_norm: 1.0, "
                                 "target_epsilon: 4.0}"))
    proc = run_cli(str(path), "--dry-run", timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "privacy psgd: central DP" in output and "calibrated for ε=4" in output, output
    assert "ε after 2 rounds" in output and "add-or-remove one client" in output


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(config: Path) -> None:
    """Every YAML we ship validates (the documented examples must work)."""
    from fedpower.config import load_config

    cfg = load_config(config)
    assert cfg.strategies


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_keeps_results(tiny: Path, tmp_path: Path) -> None:
    """SIGINT after the first round: exit 0, partial results written, no traceback."""
    import signal
    import time

    out = tmp_path / "interrupted"
    config = tmp_path / "long.yaml"
    config.write_text(tiny.read_text().replace("rounds: 2", "rounds: 200"))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), str(config), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        log = out / "run.log"
        while time.monotonic() < deadline:
            if log.exists() and "fedavg round 2/200" in log.read_text():
                break
            time.sleep(0.5)
        else:
            pytest.fail("the run never reached round 2")
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    results = json.loads((out / "results.json").read_text())
    fedavg = results["strategies"][0]
    assert 2 <= len(fedavg["rounds"]) < 200 and fedavg["completed"] is False
    assert len(results["strategies"]) == 1  # the second strategy never started
