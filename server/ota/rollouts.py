"""Staged rollouts: who is offered which version, and when a rollout stops itself.

A rollout moves devices of one base fingerprint to ``to_version`` through percent
stages — and with them the devices of every base that the current release's bundles of
``to_version`` for that base name as well (their compatible bases, e.g. GGUF exports;
DESIGN decision 11): one release, one rollout, every base it applies to. Device ``d``
belongs to stage ``stage_of(stages, bucket_of(salt, d))`` — a deterministic function,
so assignments survive restarts and need no per-device rows.
Each stage owns the devices whose bucket it adds. After an outcome is recorded the
current stage is evaluated under a lock on the rollout row (``SELECT ... FOR UPDATE``
on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so N concurrent failure reports pause
the rollout once: the first evaluation to cross the threshold pauses it and every
later one sees ``paused``. Every transition is written to ``rollout_events`` in the same
transaction as the state change, so a restart neither loses nor repeats one.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session, aliased

from protocol import EventType, ReleaseKind
from server.ota.database import Database
from server.ota.domain import (
    RolloutSpec,
    RolloutState,
    RolloutView,
    StageStats,
    bucket_of,
    stage_of,
)
from server.ota.errors import ConflictError, NotFoundError, RequestError
from server.ota.models import (
    ReleaseRow,
    RolloutEventRow,
    RolloutReportRow,
    RolloutRow,
    TargetBaseRow,
    bump_generation,
    utcnow,
)
from server.ota.releases import current_targets

logger = logging.getLogger(__name__)
_PG_ROLLOUT_LOCK = 0x0F0DA7B


def create_rollout(db: Database, spec: RolloutSpec) -> RolloutView:
    """Start a rollout at its first stage.

    Raises:
        RequestError: stages not strictly increasing within 1..100.
        ConflictError: no full bundle for that version and base in the current release,
            or a newer-or-equal rollout exists for this base or a base its bundles name
            (roll back with a new release).
    """
    stages = spec.stages
    if not stages or any(b <= a for a, b in itertools.pairwise(stages)):
        raise RequestError(f"stages {list(stages)} must be strictly increasing percentages")
    with db.write() as session:
        db.serialize(session, _PG_ROLLOUT_LOCK)  # one creator at a time: versions only rise
        targets = current_targets(session, spec.base_fingerprint, spec.to_version)
        if not any(t.kind == ReleaseKind.FULL for t in targets):
            raise ConflictError(
                f"the current release has no full bundle of v{spec.to_version} for base "
                f"{spec.base_fingerprint}; publish one first"
            )
        reached = {spec.base_fingerprint, *(base for t in targets for base in t.bases)}
        newest = session.scalar(
            select(func.max(RolloutRow.to_version)).where(
                RolloutRow.base_fingerprint.in_(reached),
                RolloutRow.state != RolloutState.CANCELLED,
            )
        )
        if newest is not None and spec.to_version <= newest:
            raise ConflictError(
                f"a rollout to v{newest} exists for this base; versions only move forward — "
                "to roll back, publish the old adapter as a new, higher version"
            )
        now = utcnow()
        row = RolloutRow(
            base_fingerprint=spec.base_fingerprint,
            to_version=spec.to_version,
            salt=secrets.token_hex(16),
            stages=list(stages),
            max_failure_rate=spec.max_failure_rate,
            min_reports=spec.min_reports,
            stage_index=0,
            state=RolloutState.ACTIVE,
            pause_reason=None,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
        _event(session, row, "create", f"stages={list(stages)}")
        return _view(session, row)


def _event(session: Session, row: RolloutRow, action: str, detail: str = "") -> None:
    bump_generation(session)  # every transition changes what checks answer
    session.add(
        RolloutEventRow(
            rollout_id=row.id,
            action=action,
            stage_index=row.stage_index,
            detail=detail[:500],
            created_at=utcnow(),
        )
    )
    logger.info("rollout %d: %s at stage %d %s", row.id, action, row.stage_index, detail)


def _locked(session: Session, rollout_id: int) -> RolloutRow:
    row = session.get(RolloutRow, rollout_id, with_for_update=True, populate_existing=True)
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id}")
    return row


def pause_rollout(db: Database, rollout_id: int) -> RolloutView:
    """Operator pause: nobody new is offered the version until resume.

    Raises:
        NotFoundError: no such rollout.
        ConflictError: the rollout was cancelled.
    """
    with db.write() as session:
        row = _locked(session, rollout_id)
        if row.state == RolloutState.CANCELLED:
            raise ConflictError(f"rollout {rollout_id} was cancelled; create a new one")
        if row.state == RolloutState.ACTIVE:
            row.state, row.pause_reason, row.updated_at = RolloutState.PAUSED, "operator", utcnow()
            _event(session, row, "pause", "operator")
        return _view(session, row)


def resume_rollout(db: Database, rollout_id: int) -> RolloutView:
    """Resume a paused rollout; after an automatic pause this starts the next stage.

    Raises:
        NotFoundError: no such rollout.
        ConflictError: the rollout was cancelled.
    """
    with db.write() as session:
        row = _locked(session, rollout_id)
        if row.state == RolloutState.CANCELLED:
            raise ConflictError(f"rollout {rollout_id} was cancelled; create a new one")
        if row.state == RolloutState.PAUSED:
            if row.pause_reason == "threshold" and row.stage_index + 1 < len(row.stages):
                row.stage_index += 1
            row.state, row.pause_reason, row.updated_at = RolloutState.ACTIVE, None, utcnow()
            _event(session, row, "resume")
        return _view(session, row)


def advance_rollout(db: Database, rollout_id: int) -> RolloutView:
    """Operator moves an active rollout to its next stage.

    Raises:
        NotFoundError: no such rollout.
        ConflictError: not active, or already at the last stage.
    """
    with db.write() as session:
        row = _locked(session, rollout_id)
        if row.state != RolloutState.ACTIVE or row.stage_index + 1 >= len(row.stages):
            raise ConflictError(
                f"rollout {rollout_id} is {row.state} at its stage "
                f"{row.stage_index + 1}/{len(row.stages)}; cannot advance"
            )
        row.stage_index += 1
        row.updated_at = utcnow()
        _event(session, row, "advance", "operator")
        return _view(session, row)


def cancel_rollout(db: Database, rollout_id: int) -> RolloutView:
    """Stop offering this version for good (devices keep what they installed).

    Raises:
        NotFoundError: no such rollout.
    """
    with db.write() as session:
        row = _locked(session, rollout_id)
        if row.state != RolloutState.CANCELLED:
            row.state, row.updated_at = RolloutState.CANCELLED, utcnow()
            _event(session, row, "cancel")
        return _view(session, row)


def get_rollout(db: Database, rollout_id: int) -> RolloutView:
    """One rollout with its per-stage outcomes.

    Raises:
        NotFoundError: no such rollout.
    """
    with db.read() as session:
        row = session.get(RolloutRow, rollout_id)
        if row is None:
            raise NotFoundError(f"no rollout {rollout_id}")
        return _view(session, row)


def list_rollouts(db: Database) -> list[RolloutView]:
    """Every rollout, newest first."""
    with db.read() as session:
        rows = session.scalars(select(RolloutRow).order_by(RolloutRow.id.desc())).all()
        return [_view(session, row) for row in rows]


def rollout_events(db: Database, rollout_id: int) -> list[tuple[str, int, str]]:
    """(action, stage index, detail) of every transition, oldest first."""
    with db.read() as session:
        rows = session.scalars(
            select(RolloutEventRow)
            .where(RolloutEventRow.rollout_id == rollout_id)
            .order_by(RolloutEventRow.id)
        )
        return [(r.action, r.stage_index, r.detail) for r in rows]


def _stage_counts(session: Session, rollout_id: int) -> dict[tuple[int, str], int]:
    rows = session.execute(
        select(RolloutReportRow.stage_index, RolloutReportRow.outcome, func.count())
        .where(RolloutReportRow.rollout_id == rollout_id)
        .group_by(RolloutReportRow.stage_index, RolloutReportRow.outcome)
    )
    return {(stage, outcome): count for stage, outcome, count in rows}


def _view(session: Session, row: RolloutRow) -> RolloutView:
    counts = _stage_counts(session, row.id)
    return RolloutView(
        id=row.id,
        base_fingerprint=row.base_fingerprint,
        to_version=row.to_version,
        stages=tuple(row.stages),
        stage_index=row.stage_index,
        state=row.state,
        pause_reason=row.pause_reason,
        max_failure_rate=row.max_failure_rate,
        min_reports=row.min_reports,
        stage_stats=tuple(
            StageStats(
                percent=percent,
                installed=counts.get((i, EventType.INSTALLED), 0),
                failed=counts.get((i, "failed"), 0),
            )
            for i, percent in enumerate(row.stages)
        ),
    )


def reaches(base_fingerprint: str) -> ColumnElement[bool]:
    """SQL condition on ``rollouts``: the rollout reaches devices holding this base — it
    names the base, or a current-release bundle of its version for its base also names
    this one (two probes of ``target_bases``: the lookup index, then the primary key)."""
    mine, named = aliased(TargetBaseRow), aliased(TargetBaseRow)
    latest = select(func.max(ReleaseRow.version)).scalar_subquery()
    shared = (
        select(mine.target_id)
        .join(named, named.target_id == mine.target_id)
        .where(
            mine.release_version == latest,
            mine.base_fingerprint == RolloutRow.base_fingerprint,
            mine.to_version == RolloutRow.to_version,
            named.base_fingerprint == base_fingerprint,
        )
        .exists()
    )
    return or_(RolloutRow.base_fingerprint == base_fingerprint, shared)


def assigned_version(session: Session, device_id: str, base_fingerprint: str) -> int | None:
    """The version the newest active rollout covering this device moves it to."""
    rows = session.execute(
        select(RolloutRow.to_version, RolloutRow.salt, RolloutRow.stages, RolloutRow.stage_index)
        .where(reaches(base_fingerprint), RolloutRow.state == RolloutState.ACTIVE)
        .order_by(RolloutRow.to_version.desc())
    )
    return assigned_in(rows, device_id)


def assigned_in(rows: Iterable[Any], device_id: str) -> int | None:
    """From active rollouts (to_version, salt, stages, stage_index), newest first: the
    version of the first whose current stage covers the device."""
    for to_version, salt, stages, stage_index in rows:
        if stage_of(tuple(stages), bucket_of(salt, device_id)) <= stage_index:
            return int(to_version)
    return None


def record_outcome(
    session: Session, *, device_id: str, base_fingerprint: str, version: int, outcome: str, seq: int
) -> None:
    """Count a device's outcome for the rollouts to ``version`` it was covered by, then
    evaluate them. Runs inside the caller's serialized write transaction."""
    ids = session.scalars(
        select(RolloutRow.id).where(
            reaches(base_fingerprint),
            RolloutRow.to_version == version,
            RolloutRow.state != RolloutState.CANCELLED,
        )
    ).all()
    for rollout_id in ids:
        row = _locked(session, rollout_id)
        stage = stage_of(tuple(row.stages), bucket_of(row.salt, device_id))
        if stage > row.stage_index:
            continue  # never offered by this rollout (installed some other way)
        report = session.get(RolloutReportRow, (rollout_id, device_id), with_for_update=True)
        if report is None:
            session.add(
                RolloutReportRow(
                    rollout_id=rollout_id,
                    device_id=device_id,
                    stage_index=stage,
                    outcome=outcome,
                    seq=seq,
                )
            )
        elif seq > report.seq:
            report.outcome, report.seq = outcome, seq
        else:
            continue  # an older event arriving late changes nothing
        session.flush()
        _evaluate(session, row)


def _evaluate(session: Session, row: RolloutRow) -> None:
    if row.state != RolloutState.ACTIVE:
        return
    counts = _stage_counts(session, row.id)
    failed = counts.get((row.stage_index, "failed"), 0)
    total = failed + counts.get((row.stage_index, EventType.INSTALLED), 0)
    if total < row.min_reports:
        return
    rate = failed / total
    if rate > row.max_failure_rate:
        row.state, row.pause_reason, row.updated_at = RolloutState.PAUSED, "threshold", utcnow()
        _event(
            session,
            row,
            "auto_pause",
            f"failure rate {rate:.3f} over {total} reports > {row.max_failure_rate}",
        )
    elif row.stage_index + 1 < len(row.stages):
        row.stage_index += 1
        row.updated_at = utcnow()
        _event(session, row, "advance", f"failure rate {rate:.3f} over {total} reports")
