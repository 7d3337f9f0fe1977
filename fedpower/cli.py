"""The ``run.py`` command line: validate a YAML experiment, run it, show progress, write outputs."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from fedpower.config import ConfigError, ExperimentConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of run.py (DESIGN.md §5 contract)."""
    parser = argparse.ArgumentParser(
        prog="run.py", description="Run every strategy of a YAML experiment on identical data and compare them.")
    parser.add_argument("config", nargs="?", help="YAML experiment (default: configs/quickstart.yaml)")
    parser.add_argument("--out", help="output folder (default: results/<experiment>-<timestamp>/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value, e.g. --set train.rounds=3 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and model size, then exit")
    parser.add_argument("--verbose", action="store_true", help="show Flower and Ray logs on the console")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--resume", metavar="DIR", help="continue the run whose output folder is DIR from its last "
                        "checkpoint (reuses DIR's config; a CONFIG given too must match it)")
    return parser


class LiveProgress:
    """Rich live view: one row per strategy with round, accuracy, cumulative uplink and ETA."""

    def __init__(self, console: Console, names: Sequence[str], rounds: dict[str, int]) -> None:
        self.console = console
        self.rows: dict[str, dict[str, Any]] = {n: {"round": 0, "rounds": rounds[n], "acc": None, "up": 0,
                                                    "eps": None, "status": "waiting", "started": None}
                                                for n in names}
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False)

    def _render(self) -> Table:
        table = Table(header_style="bold", title="fedpower run")
        for col in ("strategy", "round", "accuracy %", "uplink MB", "ε", "ETA", "status"):
            table.add_column(col, justify="left" if col in ("strategy", "status") else "right")
        for name, r in self.rows.items():
            eta = "-"
            if r["started"] and 0 < r["round"] < r["rounds"] and r["status"] == "running":
                per_round = (time.perf_counter() - r["started"]) / r["round"]
                eta = f"{per_round * (r['rounds'] - r['round']):.0f} s"
            acc = "-" if r["acc"] is None else f"{100 * r['acc']:.2f}"
            eps = "-" if r["eps"] is None else f"{r['eps']:.3g}"
            table.add_row(name, f"{r['round']}/{r['rounds']}", acc, f"{r['up'] / 1e6:.3f}", eps, eta, r["status"])
        return table

    def strategy_started(self, name: str, rounds: int) -> None:
        """A strategy begins."""
        self.rows[name].update(status="running", started=time.perf_counter())
        self.live.update(self._render())

    def round_finished(self, name: str, row: dict[str, Any]) -> None:
        """Update a strategy's row."""
        r = self.rows[name]
        r["round"] = row["round"]
        if row["accuracy"] == row["accuracy"]:  # NaN when evaluation was skipped this round
            r["acc"] = row["accuracy"]
        r["up"] += row["uplink_bytes"]
        r["eps"] = row.get("epsilon")
        self.live.update(self._render())

    def strategy_finished(self, name: str, final: dict[str, Any]) -> None:
        """Mark a strategy done."""
        r = self.rows[name]
        r["status"] = "done" if final["rounds_completed"] == r["rounds"] else (
            "budget spent" if final.get("stop_reason") else "stopped")
        self.live.update(self._render())


def _setup_logging(out_dir: Path, verbose: bool) -> None:
    """Everything goes to run.log; the console gets warnings only unless --verbose."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = logging.FileHandler(out_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state DB set-up chatter
    # Flower's "flwr" logger has its own console handler and also propagates to the root (our file).
    flwr_logger = logging.getLogger("flwr")
    if not flwr_logger.propagate:
        flwr_logger.addHandler(handler)
    if not verbose:
        for h in list(flwr_logger.handlers):
            if h is not handler and isinstance(h, logging.StreamHandler):
                h.setLevel(logging.ERROR)


def dense_summary(experiment: ExperimentConfig) -> dict[str, Any]:
    """Model size and dense fp32 bytes per round of each strategy (its own cohort), for --dry-run."""
    from fedpower.codecs import layout_of
    from fedpower.codecs.budget import ranks_for
    from fedpower.experiment import experiment_data, experiment_model
    from fedpower.training import get_params

    dataset = experiment_data(experiment)[0]
    out: dict[str, Any] = {}
    for settings in experiment.resolved():
        params = get_params(experiment_model(settings, dataset))
        numel = sum(t.numel() for t in params.values())
        out[settings.name] = {"parameters": numel, "dense_fp32_bytes_per_client": 4 * numel,
                              "clients_per_round": settings.clients_per_round,
                              "dense_uplink_bytes_per_round": 4 * numel * settings.clients_per_round}
        if settings.compression.uses_budget:  # needs the model's shapes, so checked here
            try:
                out[settings.name]["first_ranks"] = ranks_for(settings.compression, layout_of(params))
            except ValueError as err:
                raise ConfigError(f"strategies.{settings.name}.compression (byte budget): {err}") from None
    return out


def privacy_summary(experiment: ExperimentConfig) -> list[str]:
    """One line per DP strategy: resolved σ (calibrated if asked) and ε after the planned rounds.

    Raises BudgetExceeded (``on_budget_exceeded: error`` with a budget the planned rounds exceed) or
    ValueError (settings the accountant cannot analyse).
    """
    from fedpower.experiment import privacy_plan
    from fedpower.privacy import BudgetExceeded

    lines = []
    for settings in experiment.resolved():
        try:
            plan = privacy_plan(settings)
        except BudgetExceeded as err:
            raise BudgetExceeded(f"strategies[{settings.name}].privacy.target_epsilon: {err}") from None
        except ValueError as err:
            raise ValueError(f"strategies[{settings.name}].privacy: {err}") from None
        if plan is not None:
            lines.append(f"{settings.name}: {plan.planned_summary()}")
    return lines


def _differences(saved: Any, given: Any, where: str = "") -> list[str]:
    """Dotted paths where two resolved configs differ, with both values."""
    if isinstance(saved, dict) and isinstance(given, dict):
        out: list[str] = []
        for key in list(saved) + [k for k in given if k not in saved]:
            out += _differences(saved.get(key), given.get(key), f"{where}.{key}" if where else str(key))
        return out
    if isinstance(saved, list) and isinstance(given, list) and len(saved) == len(given):
        return [d for i, (a, b) in enumerate(zip(saved, given)) for d in _differences(a, b, f"{where}[{i}]")]
    return [] if saved == given else [f"{where or 'config'}: {json.dumps(saved, default=str)} then, "
                                      f"{json.dumps(given, default=str)} now"]


def _with_current_defaults(document: dict[str, Any], source: str) -> dict[str, Any]:
    """A saved resolved config re-read by this version's schema, so keys added since then get their
    defaults instead of counting as changes (as it was, when it no longer validates)."""
    from fedpower.config import ConfigError, parse_config

    try:
        return parse_config(migrate_saved_config(document), source=source).to_dict()
    except ConfigError:
        return document


def migrate_saved_config(document: dict[str, Any]) -> dict[str, Any]:
    """A resolved config written by an earlier version, with keys this version dropped removed.

    ``compression.downlink.rank`` / ``error_feedback`` were written as defaults but never did anything.
    """
    import copy

    out = copy.deepcopy(document)
    for strategy in out.get("strategies") or []:
        downlink = ((strategy or {}).get("compression") or {}).get("downlink")
        if isinstance(downlink, dict):
            downlink.pop("rank", None)
            downlink.pop("error_feedback", None)
    return out


def resume_config(resume_dir: Path, config_arg: str | None, overrides: Sequence[str]) -> Any:
    """The config of the run in ``resume_dir``; a CONFIG (+ --set) given too must resolve to it (ConfigError)."""
    from fedpower.config import ConfigError, load_config, parse_config

    saved_path = resume_dir / "config.resolved.json"
    if not saved_path.is_file():
        raise ConfigError(f"--resume {resume_dir}: no config.resolved.json there; give the output folder (--out) of "
                          "an earlier run.py run")
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume {resume_dir}: cannot read {saved_path.name} ({err})") from None
    if config_arg is None:
        if overrides:
            raise ConfigError("--resume without CONFIG reuses the saved config, which --set cannot change; a "
                              "changed experiment is a new run (use --out)")
        return parse_config(migrate_saved_config(saved), source=str(saved_path))
    config = load_config(config_arg, overrides)
    if config.client_state.store == "disk" and not config.client_state.dir:  # run.py put it in the output folder
        config.client_state.dir = str((resume_dir / "client_state").resolve())
    differences = _differences(_with_current_defaults(saved, str(saved_path)), config.to_dict())
    if differences:
        shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
        raise ConfigError(f"--resume {resume_dir}: {config_arg} (with its --set values) differs from the config that "
                          f"run started with: {shown}. Resume with the same config, or without CONFIG to reuse the "
                          "saved one; a changed experiment is a new run (use --out)")
    return config


def attach_resume_point(results: Any, out_dir: Path, config: ExperimentConfig, console: Console) -> bool:
    """Put ``out_dir``'s checkpoint into ``results``; True when that run had finished already.

    Raises CheckpointError (unreadable checkpoint) or ConfigError (a checkpoint of another config).
    """
    from fedpower.checkpoint import load_run_checkpoint
    from fedpower.config import ConfigError

    point = load_run_checkpoint(out_dir)
    if point is None:
        console.print(f"[yellow]{escape(str(out_dir))} has no checkpoint yet (no round had finished): starting from "
                      "round 1.[/]")
        return False
    differences = _differences(_with_current_defaults(point.experiment, str(out_dir / "checkpoint.npz")),
                               config.to_dict())
    if differences:
        raise ConfigError(f"--resume {out_dir}: checkpoint.npz was written for another config than "
                          f"config.resolved.json ({'; '.join(differences[:3])}); the folder was changed by hand")
    results.strategies.update(point.results)  # so that even a resume that fails at once writes complete results
    if point.finished:
        console.print("That run had finished; writing its outputs again.")
        return True
    results.resume_from = point
    name = config.strategies[point.strategy_index].name
    console.print(f"Resuming {escape(name)} after round {point.completed_round}.")
    logging.getLogger("fedpower").info("resuming %s after round %d from %s", name, point.completed_round, out_dir)
    if config.client_state.store != "disk":
        console.print("[yellow]warning: client_state.store is 'memory', so the clients' error-feedback residuals and "
                      "warm starts died with the interrupted run; they restart from zero and the metrics will differ "
                      "from an uninterrupted run. Set client_state: {store: disk} for exact resumes.[/]")
    return False


class StopFlag:
    """First Ctrl-C asks the run to stop after the current round; a second one aborts."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.console: Console | None = None

    def __call__(self) -> bool:
        return self.event.is_set()

    def handler(self, signum: int, frame: Any) -> None:
        """SIGINT handler."""
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        if self.console is not None:
            self.console.print("[yellow]Stopping after the current round (Ctrl-C again to abort)…[/]")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 1 failed run, 2 bad config/usage)."""
    # Pipes and CI logs get a wide console so the comparison table is not squeezed to 80 columns.
    console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
    err_console = Console(stderr=True)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage
        return EXIT_OK if exc.code == 0 else EXIT_USAGE

    from fedpower.config import ConfigError, default_config_path, load_config

    config_path = Path(args.config) if args.config else default_config_path()
    try:
        if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise ConfigError(f"--resume {args.resume} writes into that folder; drop --out {args.out}")
        if args.resume:
            config = resume_config(Path(args.resume), args.config, args.overrides)
        else:
            config = load_config(config_path, args.overrides)
    except ConfigError as err:
        err_console.print(f"[bold red]config error:[/] {err}", highlight=False, markup=True)
        return EXIT_USAGE
    from fedpower.privacy import BudgetExceeded

    try:  # calibrates σ / checks budgets up front: an impossible budget is a config error, not a failed run
        privacy_lines = privacy_summary(config)
    except (BudgetExceeded, ValueError) as err:
        err_console.print(f"[bold red]config error:[/] {escape(str(err))}", highlight=False)
        return EXIT_USAGE

    if args.dry_run:
        console.print_json(json.dumps(config.to_dict(), default=str))
        for line in privacy_lines:
            console.print(f"privacy {escape(line)}", highlight=False, soft_wrap=True)
        try:
            summary = dense_summary(config)
        except Exception as err:  # noqa: BLE001 - data/model errors are user errors here
            err_console.print(f"[bold red]error:[/] {escape(str(err))}")
            return EXIT_USAGE
        for name, info in summary.items():
            console.print(f"{name}: {info['parameters']:,} parameters; dense fp32 update "
                          f"{info['dense_fp32_bytes_per_client']:,} B per client, {info['clients_per_round']} "
                          f"clients per round, {info['dense_uplink_bytes_per_round']:,} B uplink per round",
                          highlight=False)
            if "first_ranks" in info:
                ranks = ", ".join(f"{k} {v}" for k, v in info["first_ranks"].items())
                console.print(f"{name}: round-1 ranks for the byte budget: {ranks}", highlight=False)
        return EXIT_OK

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.resume or args.out or Path("results") / f"{config.experiment}-{stamp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.client_state.store == "disk" and not config.client_state.dir:
        config.client_state.dir = str((out_dir / "client_state").resolve())  # next to the results it belongs to
    experiment = config.to_dict()
    (out_dir / "config.resolved.json").write_text(json.dumps(experiment, indent=2, default=str))
    _setup_logging(out_dir, args.verbose)

    from fedpower.data import DataError
    from fedpower.models import ModelError
    from fedpower.report import comparison_table, environment_info, write_csv, write_plots, write_results
    from fedpower.results import RunResults

    try:  # load once up front: a bad data file, model name or byte budget is a usage error, not a failed run
        dense_summary(config)
    except (DataError, ModelError, ConfigError) as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}")
        return EXIT_USAGE

    results = RunResults(experiment=config.experiment, config=experiment, environment=environment_info())
    results.checkpoint_dir = str(out_dir)  # every finished round is checkpointed: the run can be resumed
    from fedpower.checkpoint import CheckpointError

    try:
        finished_before = bool(args.resume) and attach_resume_point(results, out_dir, config, console)
    except (CheckpointError, ConfigError) as err:
        err_console.print(f"[bold red]cannot resume:[/] {escape(str(err))}", highlight=False)
        return EXIT_USAGE
    names = [s.name for s in config.strategies]
    rounds = {s.name: s.train.rounds for s in config.resolved()}
    stop = StopFlag()
    stop.console = console
    previous = signal.signal(signal.SIGINT, stop.handler)
    for line in privacy_lines:
        console.print(f"privacy {escape(line)}", highlight=False, soft_wrap=True)
        logging.getLogger("fedpower").info("privacy %s", line)
    progress = LiveProgress(console, names, rounds)
    failed: BaseException | None = None
    from strategies.simulation import run_simulation_experiment

    try:
        with progress.live:
            if not finished_before:
                run_simulation_experiment(config, results, observer=progress, verbose=args.verbose,
                                          should_stop=stop)
    except KeyboardInterrupt:
        console.print("[yellow]Aborted; writing the results so far.[/]")
    except Exception as err:  # noqa: BLE001 - report, keep partial results, exit 1
        failed = err
        logging.getLogger("fedpower").exception("run failed")
    finally:
        signal.signal(signal.SIGINT, previous)

    write_results(results, out_dir)
    write_csv(results, out_dir)
    if not args.no_plots and any(s.rounds for s in results.strategies.values()):
        write_plots(results, out_dir)
    console.print(comparison_table(results))
    console.print(f"Results in [bold]{out_dir}[/] (results.json, metrics.csv, ledger.csv, plots, run.log)")
    if failed is not None:
        err_console.print(f"[bold red]run failed:[/] {failed} (details in {out_dir / 'run.log'})")
        return EXIT_FAILED
    incomplete = [s.name for s in results.strategies.values() if not s.completed]
    if len(results.strategies) < len(names) or incomplete:
        console.print("[yellow]Run stopped early; partial results were written.[/]")
    return EXIT_OK
