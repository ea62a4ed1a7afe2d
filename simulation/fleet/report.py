"""The fleet's part of the human report: PNG plots and ``fleet.md`` / ``fleet.html``.

Plots: adoption of each release over simulated time, bundle sizes per release (the
delta most devices download vs the full bundle), and peak memory vs budget per tier.
Accuracy, loss and ε per round come from the training summary (``simulation.report``
draws them); this module only adds the OTA figures, and the rollout table both reports
show (``rollout_table``), so both halves can be composed.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulation.fleet.publisher import ReleaseRole

if TYPE_CHECKING:
    from simulation.fleet.fleet import Fleet
    from simulation.fleet.summary import FleetOutcome, RolloutSummary, TierSummary

__all__ = [
    "PLOTS",
    "ROLLOUT_COLUMNS",
    "TABLE_KEYS",
    "TextTable",
    "format_value",
    "release_kind",
    "rollout_table",
    "write_fleet_report",
]

logger = logging.getLogger(__name__)
PLOTS = ("adoption.png", "bundle_sizes.png", "peak_memory.png")
# The fleet's headline numbers, in table order (also the end of `fedota simulate`'s table).
TABLE_KEYS = (
    "devices",
    "updated",
    "failed",
    "rolled_back",
    "mixed_state",
    "budget_violations",
    "apply_ms_p50",
    "peak_memory_bytes_max",
    "bytes_downloaded",
    "bytes_if_full_model",
    "healthy_on_latest",
    "healthy_not_on_latest",
)
# The rollout table of fleet.md, report.md and report.html (``rollout_table``).
ROLLOUT_COLUMNS = (
    "release",
    "kind",
    "stages reached",
    "state",
    "paused",
    "auto-paused",
    "stopped by",
    "golden loss reported (new / replaced)",
    "rolled back by",
    "bundle bytes",
)
_STOPPED_BY = {"health_check": "health check", "quality": "quality gate", "operator": "operator"}


def release_kind(kind: str) -> str:
    """A release's kind as a person should read it: the bad one is planted."""
    return "planted bad release (fault injection)" if kind == ReleaseRole.BAD else kind


def format_value(value: Any) -> str:
    """A number or label for a table cell (``–`` for a missing value)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return "–" if value is None else str(value)


@dataclass(frozen=True)
class TextTable:
    """A table of text cells, written as Markdown or HTML."""

    heads: tuple[str, ...]  # empty: a table without a header row (HTML only)
    rows: tuple[tuple[str, ...], ...]

    def markdown(self) -> list[str]:
        """The table's lines (header, separator, rows)."""
        lines = ["| " + " | ".join(self.heads) + " |", "|" + "---|" * len(self.heads)]
        return lines + ["| " + " | ".join(row) + " |" for row in self.rows]

    def html(self) -> str:
        """One ``<table>`` element."""

        def cells(row: Sequence[str], tag: str) -> str:
            return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row) + "</tr>"

        head = cells(self.heads, "th") if self.heads else ""
        body = "".join(cells(row, "td") for row in self.rows)
        return f"<table>{head}{body}</table>"


def _yes_no(value: object) -> str:
    return "yes" if value else "no"


def _losses(new: Any, old: Any) -> str:
    return "" if new is None else f"{format_value(new)} / {format_value(old)}"


def rollout_table(rollouts: Sequence[Mapping[str, Any]]) -> TextTable:
    """Every release and its rollout, from ``summary.json``'s ``rollouts`` (JSON form)."""
    rows = tuple(
        (
            f"v{r['version']}" + (f" (rank {r['lora_rank']})" if r.get("lora_rank") else ""),
            release_kind(str(r["kind"])),
            f"{r['stages_reached']}/{len(r['stages'])} ({r['percent_reached']}%)",
            str(r["state"]),
            _yes_no(r.get("paused")),
            _yes_no(r.get("auto_paused")),
            _STOPPED_BY.get(str(r.get("stopped_by")), ""),
            _losses(r.get("reported_golden_loss"), r.get("reported_previous_golden_loss")),
            f"v{r['rolled_back_by']}" if r.get("rolled_back_by") else "",
            format_value(r.get("bundle_bytes")),
        )
        for r in rollouts
    )
    return TextTable(ROLLOUT_COLUMNS, rows)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _adoption(path: Path, installs: list[tuple[float, int, int]], devices: int) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    current: dict[int, int] = {}
    counts: dict[int, list[tuple[float, int]]] = {}
    for t, device, version in sorted(installs):
        old = current.get(device)
        current[device] = version
        for v, delta in ((old, -1), (version, 1)):
            if v is None:
                continue
            series = counts.setdefault(v, [(0.0, 0)])
            series.append((t, series[-1][1] + delta))
    for version, series in sorted(counts.items()):
        xs = [x / 60 for x, _ in series]
        ys = [100 * y / max(1, devices) for _, y in series]
        ax.step(xs, ys, where="post", label=f"v{version}")
    ax.set_xlabel("simulated time (min)")
    ax.set_ylabel("devices on version (%)")
    ax.set_title("Adoption of each release")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bundles(path: Path, rollouts: Sequence[RolloutSummary]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    short = {ReleaseRole.BAD: "planted bad"}
    labels = [
        f"v{r.version}"
        + (f" r{r.lora_rank}" if r.lora_rank else "")
        + f"\n{short.get(r.kind, r.kind)}"
        for r in rollouts
    ]
    xs = list(range(len(rollouts)))
    ax.bar([x - 0.2 for x in xs], [r.bundle_bytes / 1024 for r in rollouts], 0.4, label="primary")
    ax.bar([x + 0.2 for x in xs], [r.full_bundle_bytes / 1024 for r in rollouts], 0.4, label="full")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("KiB")
    ax.set_title("Bundle sizes per release")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory(path: Path, tiers: Mapping[str, TierSummary], evals: list[dict[str, Any]]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(tiers)
    mib = 2**20
    for x, name in enumerate(names):
        peaks = [e["peak_bytes"] / mib for e in evals if e["tier"] == name]
        top = tiers[name].peak_memory_bytes_max
        if not peaks and top is not None:
            peaks = [top / mib]
        ax.scatter([x] * len(peaks), peaks, s=10, alpha=0.5, color="tab:blue")
        ax.hlines(tiers[name].budget_bytes / mib, x - 0.3, x + 0.3, colors="tab:red")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("MiB added by the runtime")
    ax.set_yscale("log")
    ax.set_title("Peak memory (dots) vs budget (red) per tier")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_plots(out_dir: Path, fleet: Fleet, outcome: FleetOutcome) -> list[str]:
    """The fleet's PNGs; the names of those written."""
    _adoption(out_dir / PLOTS[0], fleet.stats.installs, len(fleet.devices))
    if outcome.rollouts:
        _bundles(out_dir / PLOTS[1], outcome.rollouts)
    _memory(out_dir / PLOTS[2], outcome.fleet.tiers, fleet.stats.evals)
    return [p for p in PLOTS if (out_dir / p).exists()]


def _headline_table(outcome: FleetOutcome) -> TextTable:
    fleet = outcome.fleet.to_dict()
    return TextTable(("metric", "value"), tuple((k, json.dumps(fleet[k])) for k in TABLE_KEYS))


def _runtime_table(outcome: FleetOutcome) -> TextTable:
    heads = (
        "runtime",
        "devices",
        "updates",
        "rollbacks",
        "rejections",
        "apply p50 ms",
        "peak MiB",
        "budget violations",
        "held-out loss",
    )
    rows = tuple(
        (
            name,
            str(r.devices),
            str(r.updates),
            str(r.rollbacks),
            str(r.rejections),
            "" if r.apply_ms_p50 is None else f"{r.apply_ms_p50:.0f}",
            "" if r.peak_memory_bytes_max is None else f"{r.peak_memory_bytes_max / 2**20:.1f}",
            str(r.budget_violations),
            "" if r.heldout_loss_mean is None else f"{r.heldout_loss_mean:.4f}",
        )
        for name, r in outcome.fleet.runtimes.items()
    )
    return TextTable(heads, rows)


def write_fleet_report(out_dir: Path, fleet: Fleet, outcome: FleetOutcome) -> Path:
    """Write the plots and ``fleet.md`` / ``fleet.html`` into ``out_dir``.

    Args:
        out_dir: Where the report goes.
        fleet: The fleet of the run (its install and evaluation records are plotted).
        outcome: The fleet's finished summary (``simulation.ota_rollout.finish_rollouts``).

    Returns:
        The path of ``fleet.md``.

    Raises:
        OSError: ``out_dir`` is not writable.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _write_plots(out_dir, fleet, outcome)
    headline = _headline_table(outcome)
    rollouts = rollout_table([r.to_dict() for r in outcome.rollouts])
    lines = ["# Fleet", "", *headline.markdown(), "", *_runtime_table(outcome).markdown()]
    lines += ["", *rollouts.markdown(), "", *[f"![{p}]({p})" for p in plots]]
    md = out_dir / "fleet.md"
    md.write_text("\n".join(lines) + "\n")
    body = "".join(f"<tr><td>{k}</td><td>{html.escape(v)}</td></tr>" for k, v in headline.rows)
    imgs = "".join(f'<img src="{p}" alt="{p}">' for p in plots)
    (out_dir / "fleet.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>fedota fleet</title><h1>Fleet</h1>"
        f"<table>{body}</table>{imgs}\n"
    )
    logger.info("fleet report written to %s", md)
    return md
