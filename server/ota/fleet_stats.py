"""Fleet statistics read from the database: devices by state, version, base and tier,
adoption over time, and the outcomes each stage of a live rollout collected.

Shared by ``/metrics`` (gauges computed at scrape time, so every worker reports the
same durable numbers) and the operator console. Each answer is a handful of
``GROUP BY`` queries whose result size does not grow with the fleet, so they stay cheap
at 100,000 devices.

A device's *state* is the inventory's (:func:`server.ota.inventory.state_of`: ``stale``
when not seen for ``stale_after_s``, else ``failed`` or ``retrying`` after its last
outcome, else ``ok``), with ``revoked`` first (the inventory flags those apart); the
same rules as one SQL ``CASE`` so they can be counted. Its *tier* is the band its
reported memory budget falls in.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Integer, case, cast, func, select
from sqlalchemy.orm import Session

from protocol import EventType
from server.ota.database import Database
from server.ota.domain import RolloutState
from server.ota.models import (
    DeviceRow,
    DeviceVersionRow,
    RolloutReportRow,
    RolloutRow,
    as_utc,
    utcnow,
)

DEVICE_STATES = ("ok", "failed", "retrying", "stale", "revoked")
_MIB = 2**20
TIER_BANDS = ((64 * _MIB, "<= 64 MiB"), (256 * _MIB, "<= 256 MiB"), (1024 * _MIB, "<= 1 GiB"))
TIERS = (*(label for _, label in TIER_BANDS), "> 1 GiB")


def device_state(stale_after_s: float, now: dt.datetime | None = None) -> ColumnElement[str]:
    """SQL expression over ``devices``: the device's state (see the module docstring)."""
    stale_before = (now or utcnow()) - dt.timedelta(seconds=stale_after_s)
    return case(
        (DeviceRow.revoked_at.is_not(None), "revoked"),
        (DeviceRow.last_seen_at < stale_before, "stale"),
        (DeviceRow.last_outcome == EventType.FAILED, "failed"),
        (DeviceRow.last_outcome == EventType.RETRY, "retrying"),
        else_="ok",
    )


def tier_of(memory_budget_bytes: int) -> str:
    """The tier of a memory budget (as :func:`device_tier` computes it in SQL)."""
    for limit, label in TIER_BANDS:
        if memory_budget_bytes <= limit:
            return label
    return TIERS[-1]


def device_tier() -> ColumnElement[str]:
    """SQL expression over ``devices``: the band of its memory budget (:data:`TIERS`)."""
    whens = [(DeviceRow.memory_budget_bytes <= limit, label) for limit, label in TIER_BANDS]
    return case(*whens, else_=TIERS[-1])


@dataclass(frozen=True)
class FleetBreakdown:
    """Device counts by (base, installed version), by tier and by state."""

    by_version: tuple[tuple[str, int | None, int], ...]
    by_tier: dict[str, int]
    by_state: dict[str, int]

    @property
    def total(self) -> int:
        """Every enrolled device, revoked ones included."""
        return sum(self.by_state.values())


def device_state_counts(db: Database, *, stale_after_s: float) -> dict[str, int]:
    """Devices per state, every state present (zero when none)."""
    with db.read() as session:
        return _count_by(session, device_state(stale_after_s), DEVICE_STATES)


def fleet_breakdown(db: Database, *, stale_after_s: float) -> FleetBreakdown:
    """Live devices by (base, version) and by tier; all devices by state."""
    with db.read() as session:
        rows = session.execute(
            select(DeviceRow.base_fingerprint, DeviceRow.installed_version, func.count())
            .where(DeviceRow.revoked_at.is_(None))
            .group_by(DeviceRow.base_fingerprint, DeviceRow.installed_version)
            .order_by(DeviceRow.base_fingerprint, DeviceRow.installed_version)
        ).all()
        live = DeviceRow.revoked_at.is_(None)
        return FleetBreakdown(
            by_version=tuple((str(b), v, int(n)) for b, v, n in rows),
            by_tier=_count_by(session, device_tier(), TIERS, live),
            by_state=_count_by(session, device_state(stale_after_s), DEVICE_STATES),
        )


def _count_by(
    session: Session,
    key: ColumnElement[str],
    names: tuple[str, ...],
    *where: ColumnElement[bool],
) -> dict[str, int]:
    label = key.label("key")
    query = select(label, func.count()).select_from(DeviceRow).where(*where).group_by(label)
    counts = {str(k): int(n) for k, n in session.execute(query)}
    return {name: counts.get(name, 0) for name in names}


@dataclass(frozen=True)
class Adoption:
    """Devices that have reported installing each version, cumulative, at ``times``."""

    times: tuple[dt.datetime, ...]
    by_version: dict[int, tuple[int, ...]]


def adoption(db: Database, *, points: int = 24) -> Adoption:
    """Cumulative installs per version over ``points`` equal time steps, from the first
    install any device reported to the last (one grouped query, any fleet size)."""
    installed = DeviceVersionRow.status == "installed"
    with db.read() as session:
        first, last = session.execute(
            select(
                func.min(DeviceVersionRow.updated_at), func.max(DeviceVersionRow.updated_at)
            ).where(installed)
        ).one()
        if first is None or last is None:
            return Adoption(times=(), by_version={})
        start, end = as_utc(first), as_utc(last)
        step_s = max((end - start).total_seconds() / points, 1e-3)
        offset = _epoch_s(db, DeviceVersionRow.updated_at) - start.timestamp()
        bucket = cast(func.floor(offset / step_s), Integer).label("bucket")
        rows = session.execute(
            select(DeviceVersionRow.version, bucket, func.count())
            .where(installed)
            .group_by(DeviceVersionRow.version, bucket)
        ).all()
    per: dict[int, list[int]] = defaultdict(lambda: [0] * points)
    for version, index, count in rows:
        per[int(version)][min(max(int(index), 0), points - 1)] += int(count)
    times = tuple(start + dt.timedelta(seconds=step_s * (i + 1)) for i in range(points))
    return Adoption(times=times, by_version={v: _cumulative(c) for v, c in sorted(per.items())})


def _epoch_s(db: Database, column: Any) -> ColumnElement[Any]:
    """Seconds since the epoch of a timestamp column, in the engine's dialect."""
    if db.is_postgres:
        return func.extract("epoch", column)
    return cast(func.strftime("%s", column), Integer)  # SQLite stores naive UTC text


def _cumulative(counts: list[int]) -> tuple[int, ...]:
    total, out = 0, []
    for count in counts:
        total += count
        out.append(total)
    return tuple(out)


@dataclass(frozen=True)
class StageReports:
    """What the devices one stage of one live rollout reported."""

    rollout_id: int
    to_version: int
    stage: int
    installed: int
    failed: int
    quality_reports: int = 0  # reports that carry both golden-prompt losses
    golden_loss: float | None = None  # their mean loss of the new adapter
    previous_golden_loss: float | None = None  # ... and of the adapter it replaced

    @property
    def failure_rate(self) -> float:
        """Failed over all outcomes (0 before the first report)."""
        total = self.installed + self.failed
        return self.failed / total if total else 0.0


def live_stage_reports(db: Database) -> list[StageReports]:
    """Outcomes per stage of every rollout not cancelled (every stage, reported or not)."""
    with db.read() as session:
        rollouts = session.execute(
            select(RolloutRow.id, RolloutRow.to_version, RolloutRow.stages)
            .where(RolloutRow.state != RolloutState.CANCELLED)
            .order_by(RolloutRow.id)
        ).all()
        counts = session.execute(
            select(
                RolloutReportRow.rollout_id,
                RolloutReportRow.stage_index,
                RolloutReportRow.outcome,
                func.count(),
            )
            .join(RolloutRow, RolloutRow.id == RolloutReportRow.rollout_id)
            .where(RolloutRow.state != RolloutState.CANCELLED)
            .group_by(
                RolloutReportRow.rollout_id, RolloutReportRow.stage_index, RolloutReportRow.outcome
            )
        ).all()
        quality = _live_quality(session)
    seen = {(int(r), int(s), str(o)): int(n) for r, s, o, n in counts}
    return [
        StageReports(
            rollout_id=int(rollout_id),
            to_version=int(version),
            stage=index,
            installed=seen.get((rollout_id, index, "installed"), 0),
            failed=seen.get((rollout_id, index, "failed"), 0),
            **quality.get((rollout_id, index), {}),
        )
        for rollout_id, version, stages in rollouts
        for index in range(len(stages))
    ]


def _live_quality(session: Session) -> dict[tuple[int, int], dict[str, Any]]:
    """Per (rollout, stage) of live rollouts: the golden-prompt losses devices reported
    for the new and the replaced adapter (the quality gate's inputs; ADR 0014)."""
    report = RolloutReportRow
    rows = session.execute(
        select(
            report.rollout_id,
            report.stage_index,
            func.count(),
            func.avg(report.golden_loss),
            func.avg(report.previous_golden_loss),
        )
        .join(RolloutRow, RolloutRow.id == report.rollout_id)
        .where(
            RolloutRow.state != RolloutState.CANCELLED,
            report.golden_loss.is_not(None),
            report.previous_golden_loss.is_not(None),
        )
        .group_by(report.rollout_id, report.stage_index)
    )
    return {
        (int(r), int(s)): {
            "quality_reports": int(n),
            "golden_loss": float(new),
            "previous_golden_loss": float(old),
        }
        for r, s, n, new, old in rows
    }
