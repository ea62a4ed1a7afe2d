"""Server-rendered charts: plain data for an inline SVG template (no script, no library).

The adoption chart draws, per version, how many devices had reported installing it at
each time step (``fleet_stats.adoption``), on one shared y axis.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.ota.fleet_stats import Adoption

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 120, 16, 36
COLOURS = ("#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#4b5563")


@dataclass(frozen=True)
class Series:
    """One version's line: SVG ``points``, its colour, and where its label sits."""

    version: int
    points: str
    colour: str
    last: int
    label_y: float


@dataclass(frozen=True)
class Chart:
    """Everything the SVG template needs."""

    width: int
    height: int
    series: tuple[Series, ...]
    y_ticks: tuple[tuple[float, int], ...]
    x_labels: tuple[tuple[float, str], ...]
    plot: tuple[int, int, int, int]  # left, top, right, bottom


def adoption_chart(adoption: Adoption) -> Chart | None:
    """The adoption chart, or None before any device reported an install."""
    if not adoption.times or not adoption.by_version:
        return None
    top = max(max(values) for values in adoption.by_version.values()) or 1
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM
    steps = len(adoption.times)

    def x(i: int) -> float:
        return LEFT + (right - LEFT) * (i / max(steps - 1, 1))

    def y(v: float) -> float:
        return bottom - (bottom - TOP) * (v / top)

    series = tuple(
        Series(
            version=version,
            points=" ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values)),
            colour=COLOURS[n % len(COLOURS)],
            last=values[-1],
            label_y=y(values[-1]),
        )
        for n, (version, values) in enumerate(sorted(adoption.by_version.items()))
    )
    ticks = tuple((y(top * f / 4), round(top * f / 4)) for f in range(5))
    picks = sorted({0, steps // 2, steps - 1})
    span_s = (adoption.times[-1] - adoption.times[0]).total_seconds()
    style = "%H:%M:%S" if span_s < 3600 else "%m-%d %H:%M"
    labels = tuple((x(i), adoption.times[i].strftime(style)) for i in picks)
    return Chart(WIDTH, HEIGHT, series, ticks, labels, (LEFT, TOP, right, bottom))
