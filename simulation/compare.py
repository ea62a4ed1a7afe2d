"""``fedota runs compare RUN_DIR...``: finished ``fedota simulate`` runs side by side.

Reads only each run's ``summary.json`` (docs/summary-schema.md), so it compares any
finished run, resumed or not, with or without a fleet. Prints one table: the headline
metrics of each run, then the options in which the runs differ (the recorded
``options`` of ``OUT/config.toml``, or the ``config`` part of a summary that has no
``options``). Plots the eval accuracy of every round of every run into one PNG.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from simulation.errors import SimulationInputError

__all__ = [
    "RunRecord",
    "config_differences",
    "headline_rows",
    "load_run",
    "plot_accuracy",
    "register",
    "runs_app",
]

SUMMARY = "summary.json"
_REQUIRED = ("schema_version", "config", "baseline", "final", "rounds", "privacy", "elapsed_s")
_SCHEMA_VERSION = 1  # simulation.run_summary.SCHEMA_VERSION, which this reads
_SAME_FOR_EVERY_RUN = frozenset({"out"})  # differs by nature: the column says it
Row = tuple[str, list[str]]


@dataclass(frozen=True)
class RunRecord:
    """One finished run: its directory (as the user named it) and its ``summary.json``."""

    path: Path
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        """The run's name in the table and the plot: the path as given."""
        return str(self.path)


def load_run(path: Path) -> RunRecord:
    """Read ``path/summary.json`` of a finished run.

    Raises:
        SimulationInputError: ``path`` is not a directory, holds no ``summary.json``
            (the run has not finished), or the file is not a fedota summary.
    """
    if not path.is_dir():
        raise SimulationInputError(
            f"{path}: no such directory; pass the --out directory of a `fedota simulate` run"
        )
    file = path / SUMMARY
    if not file.is_file():
        raise SimulationInputError(
            f"{path}: no {SUMMARY} (not a `fedota simulate --out` directory, or its run "
            "has not finished: `fedota simulate --no-ota --resume --out` finishes it)"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SimulationInputError(f"{file}: not readable JSON ({e})") from e
    missing = [k for k in _REQUIRED if not isinstance(data, dict) or k not in data]
    if missing:
        raise SimulationInputError(
            f"{file}: not a fedota summary (no {', '.join(missing)}); see docs/summary-schema.md"
        )
    if data["schema_version"] != _SCHEMA_VERSION:
        raise SimulationInputError(
            f"{file}: schema_version {data['schema_version']}, but this fedota reads "
            f"{_SCHEMA_VERSION}; compare it with the fedota version that wrote it"
        )
    return RunRecord(path, data)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _gain(final: float | None, base: float | None) -> str:
    if final is None or base is None:
        return "–"
    return f"{final - base:+.4f}"


def _epsilon(summary: dict[str, Any], level: str) -> str:
    part = summary["privacy"].get(level) or {}
    return _fmt(part.get("epsilon"), 3)


def headline_rows(runs: Sequence[RunRecord]) -> list[Row]:
    """The table's headline rows: a label, then one cell per run."""
    columns = [_headline(run.summary) for run in runs]
    return [(label, [column[label] for column in columns]) for label in columns[0]]


def _headline(s: dict[str, Any]) -> dict[str, str]:
    """One run's headline cells, by row label (in table order)."""
    cfg, privacy = s["config"], s["privacy"]
    upload = sum(int(r.get("upload_bytes", 0)) for r in s["rounds"])
    return {
        "final eval accuracy": _fmt(s["final"]["eval_accuracy"]),
        "accuracy gain over base": _gain(*_pair(s, "eval_accuracy")),
        "final eval loss": _fmt(s["final"]["eval_loss"]),
        "loss change over base": _gain(*_pair(s, "eval_loss")),
        "ε record-level (per device)": _epsilon(s, "record_level"),
        "ε user-level": _epsilon(s, "user_level"),
        "privacy mode, aggregation": f"{privacy['mode']}, {cfg.get('aggregation') or '–'}",
        "rounds": _fmt(len(s["rounds"])),
        "clients (per round)": (
            f"{_fmt(cfg.get('clients'))} ({_fmt(cfg.get('clients_per_round'))})"
        ),
        "upload bytes (all rounds)": _fmt(upload),
        "elapsed": f"{float(s['elapsed_s']):.1f} s",
    }


def _pair(summary: dict[str, Any], key: str) -> tuple[float | None, float | None]:
    return summary["final"].get(key), summary["baseline"].get(key)


def config_differences(runs: Sequence[RunRecord]) -> list[Row]:
    """The settings in which the runs differ, one row each (none for a single run).

    The recorded command-line ``options`` when every run has them, else the ``config``
    part that every summary has.
    """
    if all(isinstance(r.summary.get("options"), dict) for r in runs):
        settings = [r.summary["options"] for r in runs]
    else:
        settings = [r.summary["config"] for r in runs]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    rows: list[Row] = []
    for key in keys:
        if key in _SAME_FOR_EVERY_RUN:
            continue
        values = [s.get(key) for s in settings]
        if any(v != values[0] for v in values[1:]):
            rows.append((key, [_fmt(v) if not isinstance(v, float) else f"{v:g}" for v in values]))
    return rows


def plot_accuracy(runs: Sequence[RunRecord], path: Path) -> Path:
    """Plot eval accuracy per round (round 0 = the base) of every run into ``path``.

    Raises:
        OSError: ``path`` cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run in runs:
        points = [run.summary["baseline"], *run.summary["rounds"]]
        xs = [int(p["round"]) for p in points]
        ys = [_nan(p.get("eval_accuracy")) for p in points]
        ax.plot(xs, ys, marker="o", label=run.label)
    ax.set(xlabel="round", ylabel="eval accuracy", title="eval accuracy per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


runs_app = typer.Typer(help="Compare finished `fedota simulate` runs.", no_args_is_help=True)


@runs_app.command("compare")
def compare(
    run_dirs: list[Path] = typer.Argument(
        ..., help="The --out directories of finished `fedota simulate` runs."
    ),
    plot: Path = typer.Option(
        Path("compare.png"), "--plot", help="Where to write the accuracy-per-round plot."
    ),
) -> None:
    """Print the runs' headline metrics and differing options side by side, and plot
    their eval accuracy per round."""
    from rich.console import Console
    from rich.table import Table

    runs = [load_run(p) for p in run_dirs]  # every bad directory refused before output
    table = Table(title="fedota runs compare")
    table.add_column("")
    for run in runs:
        table.add_column(run.label, justify="right", overflow="fold")
    for label, cells in headline_rows(runs):
        table.add_row(label, *cells)
    differences = config_differences(runs)
    table.add_section()
    if differences:
        for key, cells in differences:
            table.add_row(f"option {key}", *cells)
    else:
        table.add_row("options that differ", *(["none"] * len(runs)))
    Console().print(table)
    typer.echo(f"accuracy per round plotted in {plot_accuracy(runs, plot)}")


def register(app: typer.Typer) -> None:
    """Mount ``fedota runs`` on the root app."""
    app.add_typer(runs_app, name="runs")
