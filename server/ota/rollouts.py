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
later one sees ``paused``. With a ``quality_tolerance`` a stage also pauses itself
(reason ``quality``) when the golden-prompt loss its devices measured for the new adapter
is worse than for the adapter it replaces beyond that tolerance; creating a rollout
checks the operator's privacy release gate (ADR 0014). Every transition is written to
``rollout_events`` in the same transaction as the state change, so a restart neither
loses nor repeats one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import logging
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session, aliased

from protocol import EventType, PrivacyPolicy, ReleaseKind
from server.ota import audit
from server.ota.database import Database
from server.ota.domain import (
    BundleTarget,
    RolloutSpec,
    RolloutState,
    RolloutView,
    StageStats,
    bucket_of,
    release_gate_violation,
    stage_of,
)
from server.ota.errors import ConflictError, NotFoundError, ReleaseGateError, RequestError
from server.ota.models import (
    DeviceRow,
    DeviceVersionRow,
    ReleaseRow,
    RolloutEventRow,
    RolloutReportRow,
    RolloutRow,
    TargetBaseRow,
    as_utc,
    bump_generation,
    utcnow,
)
from server.ota.releases import current_targets

logger = logging.getLogger(__name__)
_PG_ROLLOUT_LOCK = 0x0F0DA7B
_AUTO_PAUSES = ("threshold", "quality")  # resuming after one of these starts the next stage


def _salt(spec: RolloutSpec, seed: int | None) -> str:
    if seed is None:
        return secrets.token_hex(16)
    key = f"fedota-rollout:{seed}:{spec.base_fingerprint}:{spec.to_version}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def create_rollout(
    db: Database,
    spec: RolloutSpec,
    *,
    actor: str,
    policy: PrivacyPolicy | None = None,
    salt_seed: int | None = None,
) -> RolloutView:
    """Start a rollout at its first stage (stages that hold no device pass at once).

    Devices are spread over the stages by a hash of a per-rollout salt: random, or with
    ``salt_seed`` (``OtaSettings.simulation_seed``) derived from the seed, the base and
    the version, so a simulation stages the same devices on every run.

    Raises:
        RequestError: stages not strictly increasing within 1..100.
        ReleaseGateError: a bundle of the version spent more privacy than ``policy``
            (the operator's release gate) allows, or records no spend it bounds.
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
        _check_gate(policy, targets)
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
            salt=_salt(spec, salt_seed),
            stages=list(stages),
            max_failure_rate=spec.max_failure_rate,
            min_reports=spec.min_reports,
            min_reports_fraction=spec.min_reports_fraction,
            quality_tolerance=spec.quality_tolerance,
            stage_index=0,
            state=RolloutState.ACTIVE,
            pause_reason=None,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
        _event(session, row, "create", f"stages={list(stages)}", actor=actor)
        _evaluate(session, row)
        return _view(session, row)


def _check_gate(policy: PrivacyPolicy | None, targets: list[BundleTarget]) -> None:
    """The operator's privacy gate on every bundle the rollout would offer (ADR 0014)."""
    if policy is None or not policy.is_set:
        return
    for target in targets:
        why = release_gate_violation(policy, target)
        if why is not None:
            raise ReleaseGateError(
                f"{why} ({target.path}); refusing to roll it out: release an adapter "
                "trained within the budget, or change the server's policy"
            )


def _event(
    session: Session, row: RolloutRow, action: str, detail: str = "", *, actor: str | None = None
) -> None:
    """Record one transition: a ``rollout_events`` row and its audit entry, in the
    transaction that makes it. ``actor`` None: the server's own rule (the pause reason
    for an automatic pause, else ``system:stage-complete``)."""
    bump_generation(session)  # every transition changes what checks answer
    if actor is None:
        rule = row.pause_reason if action == "auto_pause" else None
        actor = audit.system_actor(rule) if rule else audit.SYSTEM_STAGE_DONE
    session.add(
        RolloutEventRow(
            rollout_id=row.id,
            action=action,
            stage_index=row.stage_index,
            detail=detail[:500],
            created_at=utcnow(),
            actor=actor,
        )
    )
    audit.record(
        session,
        actor=actor,
        action=audit.AuditAction(f"rollout.{action}"),
        target=f"rollout:{row.id}",
        stage_index=row.stage_index,
        to_version=row.to_version,
        detail=detail[:500],
    )
    logger.info(
        "rollout %d: %s at stage %d %s by %s", row.id, action, row.stage_index, detail, actor
    )


def _locked(session: Session, rollout_id: int) -> RolloutRow:
    row = session.get(RolloutRow, rollout_id, with_for_update=True, populate_existing=True)
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id}")
    return row


def pause_rollout(db: Database, rollout_id: int, *, actor: str) -> RolloutView:
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
            _event(session, row, "pause", "operator", actor=actor)
        return _view(session, row)


def resume_rollout(db: Database, rollout_id: int, *, actor: str) -> RolloutView:
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
            stage, by_operator = row.stage_index, row.pause_reason == "operator"
            if row.pause_reason in _AUTO_PAUSES and row.stage_index + 1 < len(row.stages):
                row.stage_index += 1
            row.state, row.pause_reason, row.updated_at = RolloutState.ACTIVE, None, utcnow()
            _event(session, row, "resume", actor=actor)
            if by_operator or row.stage_index != stage:  # never re-judge accepted failures
                _evaluate(session, row)  # reports that came while paused; an empty stage
        return _view(session, row)


def advance_rollout(db: Database, rollout_id: int, *, actor: str) -> RolloutView:
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
        _event(session, row, "advance", "operator", actor=actor)
        _evaluate(session, row)
        return _view(session, row)


def cancel_rollout(db: Database, rollout_id: int, *, actor: str) -> RolloutView:
    """Stop offering this version for good (devices keep what they installed).

    Raises:
        NotFoundError: no such rollout.
    """
    with db.write() as session:
        row = _locked(session, rollout_id)
        if row.state != RolloutState.CANCELLED:
            row.state, row.updated_at = RolloutState.CANCELLED, utcnow()
            _event(session, row, "cancel", actor=actor)
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


def _stage_quality(
    session: Session, rollout_id: int
) -> dict[int, tuple[int, float | None, float | None]]:
    """Per stage: (reports carrying both losses, mean new loss, mean replaced loss)."""
    rows = session.execute(
        select(
            RolloutReportRow.stage_index,
            func.count(),
            func.avg(RolloutReportRow.golden_loss),
            func.avg(RolloutReportRow.previous_golden_loss),
        )
        .where(
            RolloutReportRow.rollout_id == rollout_id,
            RolloutReportRow.golden_loss.is_not(None),
            RolloutReportRow.previous_golden_loss.is_not(None),
        )
        .group_by(RolloutReportRow.stage_index)
    )
    return {
        int(stage): (
            int(n),
            None if new is None else float(new),
            None if old is None else float(old),
        )
        for stage, n, new, old in rows
    }


def _stage_counts(session: Session, rollout_id: int) -> dict[tuple[int, str], int]:
    rows = session.execute(
        select(RolloutReportRow.stage_index, RolloutReportRow.outcome, func.count())
        .where(RolloutReportRow.rollout_id == rollout_id)
        .group_by(RolloutReportRow.stage_index, RolloutReportRow.outcome)
    )
    return {(stage, outcome): count for stage, outcome, count in rows}


def _view(session: Session, row: RolloutRow) -> RolloutView:
    counts = _stage_counts(session, row.id)
    quality = _stage_quality(session, row.id)
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
                quality_reports=quality.get(i, (0, None, None))[0],
                golden_loss=quality.get(i, (0, None, None))[1],
                previous_golden_loss=quality.get(i, (0, None, None))[2],
            )
            for i, percent in enumerate(row.stages)
        ),
        quality_tolerance=row.quality_tolerance,
        min_reports_fraction=row.min_reports_fraction,
        progress=progress_of(session, row),
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
    session: Session,
    *,
    device_id: str,
    base_fingerprint: str,
    version: int,
    outcome: str,
    seq: int,
    quality: tuple[float | None, float | None] = (None, None),
) -> None:
    """Count a device's outcome — and the golden-prompt losses it measured for the new
    and the replaced adapter, ``quality`` — for the rollouts to ``version`` it was
    covered by, then evaluate them. Runs inside the caller's serialized write
    transaction."""
    golden_loss, previous_golden_loss = quality
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
                    golden_loss=golden_loss,
                    previous_golden_loss=previous_golden_loss,
                )
            )
        elif seq > report.seq:
            report.outcome, report.seq = outcome, seq
            report.golden_loss, report.previous_golden_loss = golden_loss, previous_golden_loss
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
    if total < reports_needed(session, row, total):
        return
    rate = failed / total if total else 0.0
    worse = _quality_regression(session, row)
    if rate > row.max_failure_rate:
        row.state, row.pause_reason, row.updated_at = RolloutState.PAUSED, "threshold", utcnow()
        _event(
            session,
            row,
            "auto_pause",
            f"failure rate {rate:.3f} over {total} reports > {row.max_failure_rate}",
        )
    elif worse is not None:
        row.state, row.pause_reason, row.updated_at = RolloutState.PAUSED, "quality", utcnow()
        _event(session, row, "auto_pause", worse)
    elif row.stage_index + 1 < len(row.stages):
        row.stage_index += 1
        row.updated_at = utcnow()
        why = f"failure rate {rate:.3f} over {total} reports" if total else "no device in stage"
        _event(session, row, "advance", why)
        _evaluate(session, row)  # the next stage may hold no device: it passes at once


def _quality_regression(session: Session, row: RolloutRow) -> str | None:
    """Why the current stage's reported quality is worse than the replaced adapter's
    beyond the rollout's tolerance, or None (no gate, no paired reports, or within it).

    Quality is the golden-prompt loss each device's health check measured for the new
    adapter, against the loss it measured for the adapter it replaces (lower is better):
    the stage passes iff ``mean(new) <= mean(replaced) * (1 + quality_tolerance)`` over
    the reports that carry both (ADR 0014).
    """
    tolerance = row.quality_tolerance
    if tolerance is None:
        return None
    n, new, old = _stage_quality(session, row.id).get(row.stage_index, (0, None, None))
    if n == 0 or new is None or old is None:
        return None
    limit = old * (1 + tolerance)
    if new <= limit:
        return None
    return (
        f"quality: mean golden loss {new:.4f} of v{row.to_version} over {n} reports > "
        f"{limit:.4f} = previous {old:.4f} x (1 + quality_tolerance {tolerance:g})"
    )


# Above this many candidate devices a stage's size is its share of them (see below).
EXACT_STAGE_COUNT_LIMIT = 20_000


def reports_needed(session: Session, row: RolloutRow, reported: int) -> int:
    """Outcomes the current stage needs before it is judged: ``min_reports``, scaled
    down to ``ceil(min_reports_fraction x devices the stage targets)`` (at least 1) when
    the stage is smaller — so a small fleet never stalls — and 0 for a stage that
    targets no device (it passes at once). ``reported``: outcomes it has so far (once
    they reach ``min_reports``, scaling cannot matter and nothing is counted)."""
    if reported >= row.min_reports:
        return row.min_reports
    devices = stage_devices(session, row, row.stage_index)
    if devices == 0:
        return 0
    return max(1, min(row.min_reports, math.ceil(row.min_reports_fraction * devices)))


def stage_devices(session: Session, row: RolloutRow, stage: int) -> int:
    """Devices stage ``stage`` targets: live devices on a base the rollout reaches whose
    bucket the stage owns, and which either reported an outcome for this rollout or can
    still be offered its version (below it, and not failed on it).

    Exact — one bucket hash per candidate — up to ``EXACT_STAGE_COUNT_LIMIT``
    candidates; above that, the stage's percentage share of them, rounded up (the
    difference is then far below any ``min_reports`` worth scaling).
    """
    targets = current_targets(session, row.base_fingerprint, row.to_version)
    bases = {row.base_fingerprint, *(base for target in targets for base in target.bases)}
    targeted = _targeted(row, bases)
    total = session.scalar(select(func.count()).select_from(DeviceRow).where(targeted)) or 0
    stages = tuple(row.stages)
    if total > EXACT_STAGE_COUNT_LIMIT:
        share = stages[stage] - (stages[stage - 1] if stage else 0)
        return math.ceil(total * share / 100)
    ids = session.scalars(select(DeviceRow.id).where(targeted))
    return sum(1 for i in ids if stage_of(stages, bucket_of(row.salt, i)) == stage)


def _targeted(row: RolloutRow, bases: set[str]) -> ColumnElement[bool]:
    reported = (
        select(RolloutReportRow.device_id)
        .where(RolloutReportRow.rollout_id == row.id, RolloutReportRow.device_id == DeviceRow.id)
        .exists()
    )
    failed = (
        select(DeviceVersionRow.device_id)
        .where(
            DeviceVersionRow.device_id == DeviceRow.id,
            DeviceVersionRow.version == row.to_version,
            DeviceVersionRow.status == "failed",
        )
        .exists()
    )
    below = or_(DeviceRow.installed_version.is_(None), DeviceRow.installed_version < row.to_version)
    return and_(
        DeviceRow.base_fingerprint.in_(bases),
        DeviceRow.revoked_at.is_(None),
        or_(reported, and_(below, ~failed)),
    )


def progress_of(session: Session, row: RolloutRow) -> str:
    """Why the rollout stands where it does, in one line: ``waiting: 3/5 reports``,
    ``paused by an operator ...``, ``paused automatically: <rule's detail> ...``."""
    if row.state == RolloutState.CANCELLED:
        return "cancelled: offers nothing; create a new rollout"
    if row.state == RolloutState.PAUSED:
        return _pause_progress(session, row)
    counts = _stage_counts(session, row.id)
    failed = counts.get((row.stage_index, "failed"), 0)
    reported = failed + counts.get((row.stage_index, EventType.INSTALLED), 0)
    if row.stage_index + 1 >= len(row.stages):
        return f"last stage ({row.stages[-1]}%): {reported} reports, {failed} failed"
    return f"waiting: {reported}/{reports_needed(session, row, reported)} reports"


def _pause_progress(session: Session, row: RolloutRow) -> str:
    if row.pause_reason == "operator":
        return "paused by an operator; resume continues this stage"
    detail = session.scalar(
        select(RolloutEventRow.detail)
        .where(RolloutEventRow.rollout_id == row.id, RolloutEventRow.action == "auto_pause")
        .order_by(RolloutEventRow.id.desc())
        .limit(1)
    )
    return f"paused automatically: {detail or row.pause_reason}; resume starts the next stage"


@dataclass(frozen=True)
class RolloutEvent:
    """One transition of a rollout, as the audit trail shows it."""

    action: str
    stage_index: int
    detail: str
    actor: str
    at: dt.datetime


def rollout_event_log(db: Database, rollout_id: int) -> list[RolloutEvent]:
    """Every transition with its time and actor, oldest first."""
    with db.read() as session:
        rows = session.scalars(
            select(RolloutEventRow)
            .where(RolloutEventRow.rollout_id == rollout_id)
            .order_by(RolloutEventRow.id)
        )
        return [
            RolloutEvent(r.action, r.stage_index, r.detail, r.actor, as_utc(r.created_at))
            for r in rows
        ]
