"""``OUT/report.md`` and ``OUT/report.html``: the human report of ``fedota simulate``.

Built only from ``summary.json`` (so it can be regenerated from a finished run) plus the
fleet plots ``simulation.fleet.report`` already wrote next to it. Training plots:
accuracy and loss per round, ε per round. Fleet part: the final table, releases and
their rollouts, adoption over time, bundle sizes, peak memory against budget per tier.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulation.fleet import PLOTS as FLEET_PLOTS
from simulation.fleet import TABLE_KEYS as FLEET_TABLE_KEYS
from simulation.fleet import ReleaseRole, TextTable, planted_faults, rollout_table
from simulation.fleet import format_value as _fmt

__all__ = ["TRAINING_PLOTS", "SummaryJson", "final_table", "write_run_report"]

logger = logging.getLogger(__name__)
TRAINING_PLOTS = ("accuracy_loss.png", "epsilon.png")
# summary.json as read back (``Summary.to_dict()``): the report needs nothing else.
SummaryJson = Mapping[str, Any]


def final_table(summary: SummaryJson) -> list[tuple[str, str]]:
    """The short end-of-run table: accuracy, ε, then the fleet's headline numbers."""
    base, final, privacy = summary["baseline"], summary["final"], summary["privacy"]
    rows = [
        (
            "eval accuracy (round 0 → final)",
            f"{_fmt(base['eval_accuracy'])} → {_fmt(final['eval_accuracy'])}",
        ),
        ("eval loss (round 0 → final)", f"{_fmt(base['eval_loss'])} → {_fmt(final['eval_loss'])}"),
        (f"ε ({privacy['mode']})", _fmt(privacy["epsilon"])),
    ]
    fleet = summary.get("fleet")
    if fleet:
        rows += [(k, _fmt(fleet.get(k))) for k in FLEET_TABLE_KEYS]
        rows += [(f"phones on {name}", _runtime_row(r)) for name, r in fleet["runtimes"].items()]
        rollouts = summary.get("rollouts", [])
        paused = [_auto_paused(r) for r in rollouts if r.get("auto_paused")]
        rows.append(("releases (auto-paused)", f"{len(rollouts)} ({', '.join(paused) or 'none'})"))
        rows.append(("planted faults", _planted(summary)))
    return rows


def _auto_paused(rollout: Mapping[str, Any]) -> str:
    """``v2`` and, when the summary says, the gate that paused it: ``v2 by health check``."""
    gate = {"health_check": "health check", "quality": "quality gate"}.get(
        str(rollout.get("stopped_by"))
    )
    return f"v{rollout['version']}" + (f" by {gate}" if gate else "")


def _planted(summary: SummaryJson) -> str:
    """Every fault the run injected on purpose, labelled as such (``"none"`` if off)."""
    rollouts = summary.get("rollouts", [])
    bad = [int(r["version"]) for r in rollouts if r["kind"] == ReleaseRole.BAD]
    return planted_faults(bad, summary.get("fleet", {}).get("faults", {}))


def _runtime_row(r: Mapping[str, Any]) -> str:
    """One runtime's outcomes: devices, updates/rollbacks/rejections, apply, memory."""
    peak = r["peak_memory_bytes_max"]
    return (
        f"{r['devices']} devices: {r['updates']} updates, {r['rollbacks']} rollbacks, "
        f"{r['rejections']} rejections; apply p50 {_fmt(r['apply_ms_p50'])} ms; peak "
        f"{'–' if peak is None else f'{peak / 2**20:.1f} MiB'}; held-out loss "
        f"{_fmt(r['heldout_loss_mean'])}"
    )


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _points(summary: SummaryJson) -> list[Mapping[str, Any]]:
    return [summary["baseline"], *summary["rounds"]]


def _accuracy_loss(path: Path, summary: SummaryJson) -> None:
    plt = _plt()
    points = _points(summary)
    xs = [p["round"] for p in points]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(8, 3.2))
    acc.plot(xs, [p["eval_accuracy"] for p in points], marker="o", label="clients' held-out")
    acc.plot(
        xs,
        [p["heldout_clients"]["eval_accuracy"] for p in points],
        marker="s",
        label="held-out clients",
    )
    loss.plot(xs, [p["eval_loss"] for p in points], marker="o")
    loss.plot(xs, [p["heldout_clients"]["eval_loss"] for p in points], marker="s")
    acc.set(xlabel="round", ylabel="next-token accuracy", title="Accuracy per round")
    loss.set(xlabel="round", ylabel="loss", title="Loss per round")
    acc.legend(fontsize=7)
    for ax in (acc, loss):
        ax.set_xticks(xs)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _epsilon(path: Path, summary: SummaryJson) -> bool:
    rounds = summary["rounds"]
    eps = [r["epsilon"]["record_level"] or r["epsilon"]["user_level"] for r in rounds]
    if not any(e is not None for e in eps):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [e if e is not None else float("nan") for e in eps], marker="o")
    target = summary["config"].get("target_epsilon")
    if target:
        ax.axhline(target, color="tab:red", linestyle="--", label=f"target ε = {target:g}")
        ax.legend(fontsize=7)
    ax.set(xlabel="round", ylabel="ε so far", title=f"ε per round ({summary['privacy']['mode']})")
    ax.set_xticks(xs)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _write_plots(out_dir: Path, summary: SummaryJson) -> list[str]:
    """The training plots, then the fleet plots already next to them; their names."""
    _accuracy_loss(out_dir / TRAINING_PLOTS[0], summary)
    plots = [TRAINING_PLOTS[0]]
    if _epsilon(out_dir / TRAINING_PLOTS[1], summary):
        plots.append(TRAINING_PLOTS[1])
    return plots + [p for p in FLEET_PLOTS if (out_dir / p).exists()]


def _title(summary: SummaryJson) -> str:
    cfg = summary["config"]
    return (
        f"fedota simulate — {cfg['clients']} clients, {cfg['rounds']} rounds, "
        f"{summary['privacy']['mode']} DP, {cfg['aggregation']}"
    )


def _fault_note(summary: SummaryJson) -> str:
    """The warning a run with planted faults opens with (``""`` without)."""
    planted = _planted(summary) if summary.get("fleet") else "none"
    if planted == "none":
        return ""
    return (
        f"Faults were injected on purpose: {planted}. The failed updates, "
        "rollbacks and the auto-paused release they cause are expected; they are not "
        "the training's doing."
    )


def _markdown(
    title: str, note: str, table: TextTable, rollouts: TextTable, plots: list[str]
) -> str:
    md = [f"# {title}", "", *([f"> {note}", ""] if note else [])]
    md += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in table.rows]]
    if rollouts.rows:
        md += ["", *rollouts.markdown()]
    md += ["", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(md)


def _html(title: str, note: str, table: TextTable, rollouts: TextTable, plots: list[str]) -> str:
    return (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1>"
        + (f"<p><strong>{html.escape(note)}</strong></p>" if note else "")
        + table.html()
        + (f"<h2>Releases</h2>{rollouts.html()}" if rollouts.rows else "")
        + "".join(f'<p><img src="{p}" alt="{p}"></p>' for p in plots)
        + "\n"
    )


def write_run_report(out_dir: Path, summary: SummaryJson) -> Path:
    """Write the plots, ``report.md`` and ``report.html`` into ``out_dir``.

    Args:
        out_dir: Where the report goes (the fleet's plots are already there).
        summary: ``summary.json`` as JSON values (``Summary.to_dict()``).

    Returns:
        The path of ``report.md``.

    Raises:
        OSError: ``out_dir`` is not writable.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _write_plots(out_dir, summary)
    table = TextTable((), tuple(final_table(summary)))  # key / value: no header row
    rollouts = rollout_table(summary.get("rollouts", []))
    title, note = _title(summary), _fault_note(summary)
    path = out_dir / "report.md"
    path.write_text(_markdown(title, note, table, rollouts, plots))
    (out_dir / "report.html").write_text(_html(title, note, table, rollouts, plots))
    logger.info("report written to %s", path)
    return path
