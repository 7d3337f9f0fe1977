"""The ServerApp that ``flwr run .`` starts (pyproject ``[tool.flwr.app.components] serverapp``).

It reads the YAML experiment named by the run config, runs every strategy of it with the same code
as ``run.py`` (:func:`strategies.server.run_strategies`) and writes the same outputs
(results.json, metrics.csv, ledger.csv, plots) through :mod:`fedpower.report`, plus
``client_metrics.json`` (per round, per client: train loss, residual norms in and out). results.json
is rewritten after every round, so a run that is stopped or crashes still leaves what it did.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpower.app_config import experiment_from_run_config, output_dir
from fedpower.report import json_safe, environment_info, write_csv, write_plots, write_results
from fedpower.results import RunResults
from strategies.server import run_strategies

log = logging.getLogger("fedpower.server")


class ResultsWriter:
    """Run observer that keeps results.json current after every round (and logs progress for ``flwr log``)."""

    def __init__(self, results: RunResults, out_dir: Path) -> None:
        """Write into ``out_dir`` (created now)."""
        self.results = results
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)

    def strategy_started(self, name: str, rounds: int) -> None:
        """A strategy begins."""
        log.info("fedpower: strategy %s starts (%d rounds)", name, rounds)

    def round_finished(self, name: str, row: dict[str, Any]) -> None:
        """Rewrite results.json and client_metrics.json with the round just finished."""
        self.write(final=False)

    def strategy_finished(self, name: str, final: dict[str, Any]) -> None:
        """A strategy ended."""
        log.info("fedpower: strategy %s finished: accuracy %.4f, uplink %d B", name, final["accuracy"],
                 final["uplink_bytes_total"])
        self.write(final=False)

    def write(self, final: bool, plots: bool = False) -> None:
        """results.json + client_metrics.json always; CSVs and plots at the end."""
        write_results(self.results, self.out_dir)
        metrics = {name: {str(r): rows for r, rows in s.client_metrics.items()}
                   for name, s in self.results.strategies.items()}
        path = self.out_dir / "client_metrics.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(json_safe(metrics), indent=1))
        tmp.replace(path)
        if final:
            write_csv(self.results, self.out_dir)
            if plots and any(s.rounds for s in self.results.strategies.values()):
                try:
                    write_plots(self.results, self.out_dir)
                except ImportError as err:  # a light SuperLink install without matplotlib
                    log.warning("fedpower: no plots (%s); install fedpower[sim] on the SuperLink for them", err)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment named by the run config against the connected SuperNodes."""
    experiment = experiment_from_run_config(context.run_config)
    out_dir = output_dir(context.run_config, experiment, context.run_id)
    results = RunResults(experiment=experiment.experiment, config=experiment.to_dict(), environment=environment_info())
    writer = ResultsWriter(results, out_dir)
    log.info("fedpower: experiment %s, %d strategies, waiting for %d SuperNodes; results in %s",
             experiment.experiment, len(experiment.strategies), experiment.data.num_clients, out_dir)
    try:
        run_strategies(grid, experiment, results, observer=writer)
    finally:
        writer.write(final=True, plots=bool(context.run_config.get("plots", False)))
        log.info("fedpower: results written to %s", out_dir)
