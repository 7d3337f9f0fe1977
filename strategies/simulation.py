"""The one place that starts a simulation engine: ``inprocess`` (our Grid, no Ray) or ``ray`` (Flower's).

Both run the same ServerApp (:func:`strategies.server.make_server_app`) and ClientApp
(:func:`clients.app.make_client_app`). The Ray engine uses ``flwr.simulation.run_simulation``
(deprecated in 1.41 but Flower's in-process driver path): the ServerApp runs in a thread of this
process, so results and progress come back as plain Python objects in both cases.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings
from typing import Any, Callable, Mapping

from fedpower.config import ExperimentConfig, SimulationConfig
from fedpower.results import RunResults


def prepare_flower_environment(flwr_home: str | None = None) -> None:
    """Keep Flower from writing to ~/.flwr, phoning home or checking for updates."""
    os.environ.setdefault("FLWR_HOME", flwr_home or os.path.join(tempfile.gettempdir(), "fedpower-flwr-home"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report, no banner about it


def quiet_flower(verbose: bool) -> None:
    """Hide Flower's console chatter unless ``verbose``; the logger itself stays at INFO for log files."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.INFO)
    for handler in flwr_logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)


#: Ray's object store holds the messages in flight (a 10 M-parameter fp32 model is 40 MB); Ray's own
#: default reserves 30 % of RAM in /dev/shm, which several simulations on one machine cannot afford.
#: Objects beyond it spill to disk instead of failing.
DEFAULT_OBJECT_STORE_MB = 512


def machine_cpus() -> int:
    """CPU cores this process may use (affinity/cgroup-aware where the OS tells, else all of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def actor_budget(cpus: int, per_client: float, max_concurrent: int | None) -> tuple[int, float]:
    """(CPUs to give a local Ray, CPU share per client) so that Flower starts min(cpus / share, cap) actors.

    Ray takes whole CPUs; when a fractional share times the cap is not a whole number, the cap wins
    and each actor counts as one CPU (Ray does not enforce CPU shares, it only counts them).
    """
    if per_client > cpus:
        return math.ceil(per_client), per_client  # one client still runs rather than an empty actor pool
    if not max_concurrent or cpus / per_client <= max_concurrent:
        return cpus, per_client
    wanted = max_concurrent * per_client
    if abs(wanted - round(wanted)) < 1e-9:
        return int(round(wanted)), per_client
    return max_concurrent, 1.0


def backend_config(simulation: SimulationConfig, verbose: bool) -> dict[str, Any]:
    """Flower's Ray backend settings from the experiment's ``simulation`` block (defaults fit this machine).

    Flower starts ``Ray CPUs / num_cpus_per_client`` actors; each is a process with its own torch
    (≈0.3 GB), so the actor count, not the number of virtual clients, sets the memory. By default one
    client runs per core; ``max_concurrent_clients`` caps that by giving Ray fewer CPUs.
    """
    init_args: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.ERROR,
                                 "log_to_driver": verbose, "include_dashboard": False}
    per_client = simulation.num_cpus_per_client
    if simulation.ray_address:
        # The cluster was sized by `ray start`; Ray refuses num_cpus / object store sizes when attaching.
        init_args["address"] = simulation.ray_address
    else:
        ray_cpus, per_client = actor_budget(machine_cpus(), per_client, simulation.max_concurrent_clients)
        init_args["num_cpus"] = ray_cpus
        store_mb = simulation.object_store_memory_mb or DEFAULT_OBJECT_STORE_MB
        init_args["object_store_memory"] = int(store_mb) * 1024 * 1024
        init_args.update(simulation.ray_init_args)
    return {"client_resources": {"num_cpus": per_client, "num_gpus": simulation.num_gpus_per_client},
            "init_args": init_args}


def run_simulation_experiment(
    experiment: ExperimentConfig | Mapping[str, Any], results: RunResults, *, observer: Any = None, verbose: bool = False,
    should_stop: Callable[[], bool] = lambda: False, client_app: Any = None,
) -> RunResults:
    """Run every strategy of the experiment on its ``simulation.engine``; returns the filled results."""
    prepare_flower_environment()
    quiet_flower(verbose)
    from clients.app import make_client_app
    from fedpower.experiment import as_experiment
    from strategies.server import make_server_app

    experiment = as_experiment(experiment)
    server_app = make_server_app(experiment, results, observer, should_stop)
    client_app = client_app if client_app is not None else make_client_app(experiment)
    if experiment.simulation.engine == "inprocess":
        run_inprocess(server_app, client_app, experiment.data.num_clients,
                      threads=max(1, round(experiment.simulation.num_cpus_per_client)))
        return results
    from flwr.simulation import run_simulation  # imported late: pulls in Ray

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=experiment.data.num_clients,
        backend_config=backend_config(experiment.simulation, verbose),  # type: ignore[arg-type]
        verbose_logging=verbose,
    )
    return results


def run_inprocess(server_app: Any, client_app: Any, num_nodes: int, run_id: int = 1, threads: int = 1) -> None:
    """Run ``server_app`` against ``num_nodes`` in-process nodes answering through ``client_app``.

    ``threads``: torch intra-op threads while the run lasts (a client's CPU share, as a Ray actor gets):
    small models train faster on one thread than on a pool that contends with the rest of the machine.
    """
    import torch
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from strategies.inprocess import InProcessGrid

    # Messages the ServerApp creates take their sender from the task identity, as under a SuperLink.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    grid = InProcessGrid(client_app, num_nodes, run_id=run_id)
    context = Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={})
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        server_app(grid, context)
    finally:
        torch.set_num_threads(previous)


def simulate(config: Any, *, verbose: bool = False, observer: Any = None) -> RunResults:
    """Run an experiment (an ``ExperimentConfig`` or its resolved dict) in simulation; returns its results."""
    from fedpower.report import environment_info

    from fedpower.experiment import as_experiment

    experiment = as_experiment(config)
    results = RunResults(experiment=experiment.experiment, config=experiment.to_dict(), environment=environment_info())
    return run_simulation_experiment(experiment, results, observer=observer, verbose=verbose)
