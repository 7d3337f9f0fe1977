"""Outputs of a run: results.json, metrics.csv, ledger.csv, plots and the comparison table."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable

from rich.table import Table

from fedpower.ledger import Transfer
from fedpower.results import RunResults

ROUND_COLUMNS = ["strategy", "round", "accuracy", "loss", "train_loss", "uplink_bytes", "downlink_bytes",
                 "cumulative_uplink_bytes", "cumulative_downlink_bytes", "epsilon", "seconds", "clients", "accepted",
                 "rejected", "failures", "dropouts", "late", "kept_old_model", "kept_reason", "discarded_after_commit",
                 "largest_norm_ratio",
                 "sim_seconds", "cumulative_sim_seconds"]


def environment_info() -> dict[str, Any]:
    """Versions and machine facts that make a result reproducible."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "machine": platform.machine(), "cpus": os.cpu_count()}
    for module in ("torch", "flwr", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional module is just not reported
            info[module] = None
    return info


def json_safe(value: Any) -> Any:
    """NaN/Inf are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(results: RunResults, out_dir: Path) -> Path:
    """results.json (DESIGN.md §5 schema)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    _atomic_write(path, json.dumps(json_safe(results.to_dict()), indent=2))
    return path


def metric_rows(results: RunResults) -> Iterable[dict[str, Any]]:
    """Tidy rows: one per strategy and round, with cumulative bytes (and simulated link time, if configured)."""
    network = results.network()
    for strategy in results.strategies.values():
        up = down = 0
        elapsed = 0.0
        times = network["strategies"][strategy.name]["round_seconds"] if network else {}
        for row in strategy.rounds:
            up += row["uplink_bytes"]
            down += row["downlink_bytes"]
            extra: dict[str, Any] = {}
            if network:
                extra["sim_seconds"] = times.get(str(row["round"]), 0.0)
                elapsed += extra["sim_seconds"]
                extra["cumulative_sim_seconds"] = elapsed
            yield {"strategy": strategy.name, **row, "cumulative_uplink_bytes": up, "cumulative_downlink_bytes": down,
                   **extra}


def write_csv(results: RunResults, out_dir: Path) -> list[Path]:
    """metrics.csv (tidy, one row per strategy × round) and ledger.csv (one row per message)."""
    metrics_path = out_dir / "metrics.csv"
    with metrics_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ROUND_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in metric_rows(results):
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    ledger_path = out_dir / "ledger.csv"
    with ledger_path.open("w", newline="") as fh:
        fields = ["strategy", *(f.name for f in dataclasses.fields(Transfer))]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for strategy in results.strategies.values():
            for row in strategy.ledger.to_rows():
                writer.writerow({"strategy": strategy.name, **row})
    return [metrics_path, ledger_path]


def write_plots(results: RunResults, out_dir: Path) -> list[Path]:
    """accuracy_vs_round.png, accuracy_vs_uplink.png (log x) and bytes_per_round.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(metric_rows(results))
    names = list(results.strategies)
    paths = []

    def series(name: str, key: str) -> list[Any]:
        return [r[key] for r in rows if r["strategy"] == name]

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        ax.plot(series(name, "round"), [100 * (a if a is not None else math.nan) for a in series(name, "accuracy")],
                label=name)
    ax.set(xlabel="round", ylabel="test accuracy (%)", title=f"{results.experiment}: accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "accuracy_vs_round.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        ax.plot(series(name, "cumulative_uplink_bytes"),
                [100 * (a if a is not None else math.nan) for a in series(name, "accuracy")], label=name, marker=".")
    ax.set_xscale("log")
    ax.set(xlabel="cumulative uplink bytes (wire, log scale)", ylabel="test accuracy (%)",
           title="accuracy vs uplink bytes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "accuracy_vs_uplink.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(names):
        color = f"C{i}"
        ax.plot(series(name, "round"), series(name, "uplink_bytes"), color=color, label=f"{name} up")
        ax.plot(series(name, "round"), series(name, "downlink_bytes"), color=color, linestyle="--",
                label=f"{name} down")
    ax.set_yscale("log")
    ax.set(xlabel="round", ylabel="bytes per round (wire)", title="bytes per round, up (solid) / down (dashed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    paths.append(_save(fig, out_dir / "bytes_per_round.png"))

    network = results.network()
    if network is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            ax.plot(series(name, "cumulative_sim_seconds"),
                    [100 * (a if a is not None else math.nan) for a in series(name, "accuracy")], label=name,
                    marker=".")
        target = network["target_accuracy"]
        if target is not None:
            ax.axhline(100 * target, color="grey", linestyle=":", label=f"target {100 * target:.1f} %")
        ax.set_xscale("log")
        ax.set(xlabel="simulated communication time (s, log scale)", ylabel="test accuracy (%)",
               title=f"accuracy vs time on {describe_network(results.config['network'])}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / "accuracy_vs_time.png"))
    return paths


def describe_network(network: dict[str, Any]) -> str:
    """'4g' or '70 % 4g + 30 % nb-iot', for titles and tables."""
    if network.get("mix"):
        return " + ".join(f"{100 * f:.0f} % {name}" for name, f in network["mix"].items())
    return str(network.get("profile"))


def human_seconds(seconds: float | None) -> str:
    """3725 → '1.03 h'; None → '-'."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _save(fig: Any, path: Path) -> Path:
    """Save and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def human_bytes(n: float | None) -> str:
    """1234567 → '1.23 MB'."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _pct(value: float | None) -> str:
    """0.8123 → '81.23'."""
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def comparison_table(results: RunResults) -> Table:
    """The final rich table: one row per strategy (with simulated link times when the config has ``network``)."""
    table = Table(title=f"{results.experiment}: comparison", header_style="bold")
    network = results.network()
    columns = ["strategy", "final acc %", "best acc %", "uplink", "downlink", "up saving", "down saving", "ε",
               "rejected", "failed", "kept", "wall s"]
    if network is not None:
        target = network["target_accuracy"]
        columns += ["link time", f"time to {_pct(target)} %"]
    for col in columns:
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for strategy in results.strategies.values():
        final = strategy.final()
        ratio_up, ratio_down = final["uplink_ratio_vs_dense"], final["downlink_ratio_vs_dense"]
        name = strategy.name + ("" if strategy.completed else " (stopped)")
        table.add_row(
            name, _pct(final["accuracy"]), _pct(final["best_accuracy"]), human_bytes(final["uplink_bytes_total"]),
            human_bytes(final["downlink_bytes_total"]),
            f"{ratio_up:.1f}×" if ratio_up else "-", f"{ratio_down:.2f}×" if ratio_down else "-",
            "-" if final["epsilon"] is None else f"{final['epsilon']:.2f}",
            str(final["rejected_payloads"]), str(final["client_failures"]), str(final["rounds_kept_old_model"]),
            f"{final['wall_seconds']:.1f}", *(_network_cells(network, strategy.name) if network else ()))
    captions = []
    if network is not None:
        captions.append(f"link time: simulated on {describe_network(results.config['network'])} from the wire bytes")
    privacy = results.privacy()
    if privacy is not None and len(privacy["strategies"]) > 1:  # one strategy's ε alone would understate it
        epsilon = privacy["epsilon"]
        captions.append(f"ε of all {len(privacy['strategies'])} DP strategies together (they train on the same "
                        f"clients): {'∞' if not math.isfinite(epsilon) else f'{epsilon:.2f}'} at δ={privacy['delta']:g}")
    if captions:
        table.caption = "\n".join(captions)
    return table


def _network_cells(network: dict[str, Any], name: str) -> tuple[str, str]:
    """(total simulated link time, time to the target accuracy) of one strategy."""
    entry = network["strategies"][name]
    reached = entry["to_target"]
    to_target = "not reached" if reached["seconds"] is None else f"{human_seconds(reached['seconds'])} (r{reached['round']})"
    return human_seconds(entry["total_seconds"]), to_target


def markdown_table(results: RunResults) -> str:
    """The comparison as a Markdown table (for README/BENCHMARKS)."""
    lines = ["| strategy | final acc % | best acc % | uplink (wire) | uplink reduction | downlink (wire) | wall s |",
             "|---|---|---|---|---|---|---|"]
    for strategy in results.strategies.values():
        f = strategy.final()
        ratio = f["uplink_ratio_vs_dense"]
        lines.append(f"| {strategy.name} | {_pct(f['accuracy'])} | {_pct(f['best_accuracy'])} | "
                     f"{human_bytes(f['uplink_bytes_total'])} | {f'{ratio:.1f}×' if ratio else '-'} | "
                     f"{human_bytes(f['downlink_bytes_total'])} | {f['wall_seconds']:.1f} |")
    return "\n".join(lines)
