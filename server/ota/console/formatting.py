"""Jinja filters of the console: short fingerprints, sizes, times, figures."""

from __future__ import annotations

import datetime as dt
from typing import Any

from jinja2 import Environment, Undefined

PROVENANCE_LABELS = {
    "round": "round",
    "num_clients": "clients",
    "aggregation": "aggregation",
    "clip_norm": "clip norm",
    "noise_multiplier": "noise multiplier",
    "record_epsilon": "record-level (per text) ε",
    "record_delta": "record-level δ",
    "user_epsilon": "user-level (per device) ε",
    "user_delta": "user-level δ",
    "epsilon": "ε (unit not recorded)",
    "delta": "δ (unit not recorded)",
}


def short_fp(value: str | None) -> str:
    """``sha256:0123456789ab…`` (the full value stays in a title attribute)."""
    if not value:
        return "—"
    return value[:19] + "…" if len(value) > 20 else value


def size(value: int | None) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    if value is None:
        return "—"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.2f} {unit}"
        amount /= 1024
    return f"{value} B"


def when(value: dt.datetime | None) -> str:
    """UTC time to the second."""
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def figure(value: Any) -> str:
    """A number as a person reads it: at most 4 significant digits; ``—`` for none."""
    if value is None or isinstance(value, Undefined):
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def percent(part: int, whole: int) -> float:
    """``part`` of ``whole`` in percent (0 for an empty whole)."""
    return 100.0 * part / whole if whole else 0.0


def install_filters(env: Environment) -> None:
    """Register the filters and globals the templates use."""
    env.filters.update(short_fp=short_fp, size=size, when=when, figure=figure)
    env.globals.update(percent=percent, provenance_labels=PROVENANCE_LABELS)
