"""``OUT/report.md`` and ``OUT/report.html``: the human report of ``fedota simulate``.

Built only from ``summary.json`` (so it can be regenerated from a finished run) plus the
fleet plots ``simulation.fleet.report`` already wrote next to it. Training plots:
accuracy and loss per round, ε per round. Fleet part: the final table, releases and
their rollouts, adoption over time, bundle sizes, peak memory against budget per tier.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from simulation.fleet.faults import planted_faults
from simulation.fleet.report import PLOTS as FLEET_PLOTS
from simulation.fleet.report import TABLE_KEYS as FLEET_TABLE_KEYS
from simulation.fleet.report import release_kind

__all__ = ["TRAINING_PLOTS", "final_table", "write_run_report"]

logger = logging.getLogger(__name__)
TRAINING_PLOTS = ("accuracy_loss.png", "epsilon.png")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return "–" if value is None else str(value)


def final_table(summary: dict[str, Any]) -> list[tuple[str, str]]:
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
        paused = [f"v{r['version']}" for r in rollouts if r.get("auto_paused")]
        rows.append(("releases (auto-paused)", f"{len(rollouts)} ({', '.join(paused) or 'none'})"))
        rows.append(("planted faults", _planted(summary)))
    return rows


def _planted(summary: dict[str, Any]) -> str:
    """Every fault the run injected on purpose, labelled as such (``"none"`` if off)."""
    bad = [int(r["version"]) for r in summary.get("rollouts", []) if r["kind"] == "bad"]
    return planted_faults(bad, summary.get("fleet", {}).get("faults", {}))


def _runtime_row(r: dict[str, Any]) -> str:
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


def _points(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [summary["baseline"], *summary["rounds"]]


def _accuracy_loss(path: Path, summary: dict[str, Any]) -> None:
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


def _epsilon(path: Path, summary: dict[str, Any]) -> bool:
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


def _rollout_rows(summary: dict[str, Any]) -> list[list[str]]:
    return [
        [
            f"v{r['version']}",
            release_kind(str(r["kind"])),
            f"{r['stages_reached']}/{len(r['stages'])} ({r['percent_reached']}%)",
            str(r["state"]),
            "yes" if r.get("auto_paused") else "no",
            f"v{r['rolled_back_by']}" if r.get("rolled_back_by") else "",
            _fmt(r.get("bundle_bytes")),
        ]
        for r in summary.get("rollouts", [])
    ]


def write_run_report(out_dir: Path, summary: dict[str, Any]) -> Path:
    """Write the plots, ``report.md`` and ``report.html`` into ``out_dir``.

    Returns:
        The path of ``report.md``.

    Raises:
        OSError: ``out_dir`` is not writable.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _accuracy_loss(out_dir / TRAINING_PLOTS[0], summary)
    plots = [TRAINING_PLOTS[0]]
    if _epsilon(out_dir / TRAINING_PLOTS[1], summary):
        plots.append(TRAINING_PLOTS[1])
    plots += [p for p in FLEET_PLOTS if (out_dir / p).exists()]
    table = final_table(summary)
    heads = [
        "release",
        "kind",
        "stages reached",
        "state",
        "auto-paused",
        "rolled back by",
        "bundle bytes",
    ]
    rollouts = _rollout_rows(summary)
    cfg = summary["config"]
    title = (
        f"fedota simulate — {cfg['clients']} clients, {cfg['rounds']} rounds, "
        f"{summary['privacy']['mode']} DP, {cfg['aggregation']}"
    )
    planted = _planted(summary) if summary.get("fleet") else "none"
    note = (
        f"Faults were injected on purpose: {planted}. The failed updates, "
        "rollbacks and the auto-paused release they cause are expected; they are not "
        "the training's doing."
        if planted != "none"
        else ""
    )
    md = [f"# {title}", "", *([f"> {note}", ""] if note else []), "| | |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in table]
    if rollouts:
        md += ["", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        md += ["| " + " | ".join(r) + " |" for r in rollouts]
    md += ["", *[f"![{p}]({p})" for p in plots], ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))

    def rows_html(rows: list[list[str]], tag: str = "td") -> str:
        return "".join(
            "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row) + "</tr>"
            for row in rows
        )

    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1>"
        + (f"<p><strong>{html.escape(note)}</strong></p>" if note else "")
        + f"<table>{rows_html([list(r) for r in table])}</table>"
        + (
            f"<h2>Releases</h2><table>{rows_html([heads], 'th')}{rows_html(rollouts)}</table>"
            if rollouts
            else ""
        )
        + "".join(f'<p><img src="{p}" alt="{p}"></p>' for p in plots)
        + "\n"
    )
    (out_dir / "report.html").write_text(page)
    logger.info("report written to %s", path)
    return path
