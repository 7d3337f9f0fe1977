"""The one place that talks to Flower's simulation engine (swap to ``flwr run`` here only).

Uses ``flwr.simulation.run_simulation`` (Ray backend, deprecated in 1.41 but Flower's in-process
path): the ServerApp runs in a thread of this process, so results and progress come back as plain
Python objects.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Any, Callable, Mapping

from fedpower.results import RunResults


def prepare_flower_environment(flwr_home: str | None = None) -> None:
    """Keep Flower from writing to ~/.flwr, phoning home or checking for updates."""
    os.environ.setdefault("FLWR_HOME", flwr_home or os.path.join(tempfile.gettempdir(), "fedpower-flwr-home"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def quiet_flower(verbose: bool) -> None:
    """Hide Flower's console chatter unless ``verbose``; the logger itself stays at INFO for log files."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.INFO)
    for handler in flwr_logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def backend_config(simulation: Mapping[str, Any], verbose: bool) -> dict[str, Any]:
    """Flower's Ray backend settings from the experiment's ``simulation`` block."""
    init_args: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.ERROR,
                                 "log_to_driver": verbose, "include_dashboard": False}
    if simulation.get("ray_address"):
        init_args["address"] = simulation["ray_address"]
    else:
        cpus = os.cpu_count() or 1
        max_conc = simulation.get("max_concurrent_clients")
        per_client = float(simulation.get("num_cpus_per_client", 1.0))
        # Ray runs as many actors as the CPU budget allows: cap the budget to cap concurrency.
        init_args["num_cpus"] = int(min(cpus, max_conc * per_client)) if max_conc else cpus
    return {"client_resources": {"num_cpus": float(simulation.get("num_cpus_per_client", 1.0)),
                                 "num_gpus": float(simulation.get("num_gpus_per_client", 0.0))},
            "init_args": init_args}


def run_simulation_experiment(
    experiment: Mapping[str, Any], results: RunResults, *, observer: Any = None, verbose: bool = False,
    should_stop: Callable[[], bool] = lambda: False, client_app: Any = None,
) -> RunResults:
    """Run every strategy of the experiment in one Flower simulation; returns the filled results."""
    prepare_flower_environment()
    quiet_flower(verbose)
    from flwr.simulation import run_simulation  # imported late: pulls in Ray

    from clients.app import make_client_app
    from strategies.server import make_server_app

    run_simulation(
        server_app=make_server_app(experiment, results, observer, should_stop),
        client_app=client_app if client_app is not None else make_client_app(experiment),
        num_supernodes=int(experiment["data"]["num_clients"]),
        backend_config=backend_config(experiment.get("simulation") or {}, verbose),  # type: ignore[arg-type]
        verbose_logging=verbose,
    )
    return results


def simulate(config: Any, *, verbose: bool = False, observer: Any = None) -> RunResults:
    """Run an experiment (an ``ExperimentConfig`` or its resolved dict) in simulation; returns its results."""
    from fedpower.report import environment_info

    experiment = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    results = RunResults(experiment=experiment["experiment"], config=experiment, environment=environment_info())
    return run_simulation_experiment(experiment, results, observer=observer, verbose=verbose)
