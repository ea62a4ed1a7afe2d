"""The fleet's part of the human report: PNG plots and ``fleet.md`` / ``fleet.html``.

Plots: adoption of each release over simulated time, bundle sizes per release (the
delta most devices download vs the full bundle), and peak memory vs budget per tier.
Accuracy, loss and ε per round come from the training summary (``simulation.report``);
this module only adds the OTA figures, so both halves can be composed by the CLI.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulation.e2e import OtaContext

__all__ = ["PLOTS", "TABLE_KEYS", "release_kind", "write_fleet_report"]

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


def release_kind(kind: str) -> str:
    """A release's kind as a person should read it: the bad one is planted."""
    return "planted bad release (fault injection)" if kind == "bad" else kind


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


def _bundles(path: Path, rollouts: list[dict[str, Any]]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    short = {"bad": "planted bad"}
    labels = [f"v{r['version']}\n{short.get(r['kind'], r['kind'])}" for r in rollouts]
    xs = list(range(len(rollouts)))
    ax.bar(
        [x - 0.2 for x in xs], [r["bundle_bytes"] / 1024 for r in rollouts], 0.4, label="primary"
    )
    ax.bar(
        [x + 0.2 for x in xs], [r["full_bundle_bytes"] / 1024 for r in rollouts], 0.4, label="full"
    )
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("KiB")
    ax.set_title("Bundle sizes per release")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory(path: Path, tiers: dict[str, dict[str, Any]], evals: list[dict[str, Any]]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(tiers)
    mib = 2**20
    for x, name in enumerate(names):
        peaks = [e["peak_bytes"] / mib for e in evals if e["tier"] == name]
        top = tiers[name].get("peak_memory_bytes_max")
        if not peaks and top is not None:
            peaks = [top / mib]
        ax.scatter([x] * len(peaks), peaks, s=10, alpha=0.5, color="tab:blue")
        ax.hlines(tiers[name]["budget_bytes"] / mib, x - 0.3, x + 0.3, colors="tab:red")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("MiB added by the runtime")
    ax.set_yscale("log")
    ax.set_title("Peak memory (dots) vs budget (red) per tier")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(summary: dict[str, Any]) -> list[tuple[str, str]]:
    fleet = summary["fleet"]
    keys = TABLE_KEYS
    return [(k, json.dumps(fleet.get(k))) for k in keys]


def write_fleet_report(out_dir: Path, ctx: OtaContext) -> Path:
    """Write the plots and ``fleet.md`` / ``fleet.html`` into ``out_dir``.

    Call after ``simulation.e2e.finish``.

    Returns:
        The path of ``fleet.md``.

    Raises:
        ValueError: ``finish`` was not called yet.
        OSError: ``out_dir`` is not writable.
    """
    if ctx.finished is None:
        raise ValueError("call simulation.e2e.finish(ctx) before writing the fleet report")
    summary = ctx.finished
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = ctx.fleet.stats
    _adoption(out_dir / PLOTS[0], stats.installs, len(ctx.fleet.devices))
    if summary["rollouts"]:
        _bundles(out_dir / PLOTS[1], summary["rollouts"])
    _memory(out_dir / PLOTS[2], summary["fleet"]["tiers"], stats.evals)
    rows = _table(summary)
    lines = ["# Fleet", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "| runtime | devices | updates | rollbacks | rejections | apply p50 ms "]
    lines[-1] += "| peak MiB | budget violations | held-out loss |"
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["fleet"]["runtimes"].items():
        peak = r["peak_memory_bytes_max"]
        loss, apply_ms = r["heldout_loss_mean"], r["apply_ms_p50"]
        lines.append(
            f"| {name} | {r['devices']} | {r['updates']} | {r['rollbacks']} | "
            f"{r['rejections']} | {'' if apply_ms is None else f'{apply_ms:.0f}'} | "
            f"{'' if peak is None else f'{peak / 2**20:.1f}'} | {r['budget_violations']} | "
            f"{'' if loss is None else f'{loss:.4f}'} |"
        )
    lines += ["", "| release | kind | stages reached | state | paused | rolled back by |"]
    lines += ["|---|---|---|---|---|---|"]
    for r in summary["rollouts"]:
        lines.append(
            f"| v{r['version']} | {release_kind(r['kind'])} | "
            f"{r['stages_reached']}/{len(r['stages'])} "
            f"({r['percent_reached']}%) | {r['state']} | {r['paused']} | "
            f"{r['rolled_back_by'] or ''} |"
        )
    lines += [""] + [f"![{p}]({p})" for p in PLOTS if (out_dir / p).exists()]
    md = out_dir / "fleet.md"
    md.write_text("\n".join(lines) + "\n")
    body = "".join(f"<tr><td>{k}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    imgs = "".join(f'<img src="{p}" alt="{p}">' for p in PLOTS if (out_dir / p).exists())
    (out_dir / "fleet.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>fedota fleet</title><h1>Fleet</h1>"
        f"<table>{body}</table>{imgs}\n"
    )
    logger.info("fleet report written to %s", md)
    return md
