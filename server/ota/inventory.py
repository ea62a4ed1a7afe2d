"""The fleet inventory: which devices exist, what they run, how they last fared.

A device's **state** is derived from two things the server stores for it:

* ``last_seen_at`` — the last time it authenticated (an update check or an event);
* ``last_outcome`` — the type of the telemetry event that last moved its state (the
  newest by the device's own ``seq``: ``installed``, ``failed`` or ``retry``), with that
  event's version and detail (its reason).

``stale``: not seen for ``stale_after_s`` (whatever it last reported); otherwise
``failed`` if its last outcome is ``failed``, ``retrying`` if it is ``retry``, and
``ok`` if it is ``installed`` or it has reported nothing yet. Revoked devices are
listed too, marked ``revoked``.

Pages are keyset pages ordered by device id (:mod:`server.ota.paging`); every filter
has a ``(column, id)`` index, so a filtered page is one index range scan.
``last_seen_at`` is not written by the update check itself (the hot path, ADR 0009,
stays free of writes): :class:`SeenTracker` collects ids in memory and writes them in
one batch every few seconds.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from protocol import EventType
from server.ota.database import Database
from server.ota.errors import NotFoundError
from server.ota.models import DeviceRow, RolloutReportRow, TelemetryEventRow, as_utc, utcnow
from server.ota.paging import Page, check_limit, decode_cursor, page_of

logger = logging.getLogger(__name__)


class DeviceState(StrEnum):
    """How a device fares (see module doc for the exact rules)."""

    OK = "ok"
    FAILED = "failed"
    RETRYING = "retrying"
    STALE = "stale"


_OUTCOME_STATE: dict[str, DeviceState] = {
    EventType.FAILED: DeviceState.FAILED,
    EventType.RETRY: DeviceState.RETRYING,
}


@dataclass(frozen=True)
class DeviceFilter:
    """Which devices to list (None: any). ``rollout_id``: devices whose outcome counted
    for that rollout."""

    base_fingerprint: str | None = None
    installed_version: int | None = None
    runtime: str | None = None
    rollout_id: int | None = None
    state: DeviceState | None = None


@dataclass(frozen=True)
class DeviceSummary:
    """One inventory row."""

    id: str
    base_fingerprint: str
    installed_version: int | None
    runtime: str
    memory_budget_bytes: int
    state: DeviceState
    revoked: bool
    created_at: dt.datetime
    last_seen_at: dt.datetime
    last_outcome: str | None
    last_outcome_version: int | None
    last_outcome_reason: str
    last_outcome_at: dt.datetime | None


@dataclass(frozen=True)
class HistoryEntry:
    """One telemetry event a device reported."""

    event_id: str
    seq: int
    type: str
    version: int | None
    installed_version: int | None
    detail: str
    received_at: dt.datetime


def state_of(row: Any, stale_before: dt.datetime) -> DeviceState:
    """The state of a device row at the instant ``stale_before + stale_after_s``."""
    if _seen(row) < stale_before:
        return DeviceState.STALE
    return _OUTCOME_STATE.get(row.last_outcome or "", DeviceState.OK)


def _seen(row: Any) -> dt.datetime:
    # NULL only in a row another tool wrote on SQLite (PostgreSQL has a default): enrolled
    return as_utc(row.last_seen_at or row.created_at)


def _state_condition(state: DeviceState, stale_before: dt.datetime) -> ColumnElement[bool]:
    if state == DeviceState.STALE:
        return DeviceRow.last_seen_at < stale_before
    fresh = DeviceRow.last_seen_at >= stale_before
    if state == DeviceState.OK:
        outcome = or_(
            DeviceRow.last_outcome.is_(None), DeviceRow.last_outcome == EventType.INSTALLED
        )
    else:
        failed = state == DeviceState.FAILED
        outcome = DeviceRow.last_outcome == (EventType.FAILED if failed else EventType.RETRY)
    return and_(fresh, outcome)


def _filtered(where: DeviceFilter, stale_before: dt.datetime) -> Select[DeviceRow]:
    query = select(DeviceRow)
    if where.base_fingerprint is not None:
        query = query.where(DeviceRow.base_fingerprint == where.base_fingerprint)
    if where.installed_version is not None:
        query = query.where(DeviceRow.installed_version == where.installed_version)
    if where.runtime is not None:
        query = query.where(DeviceRow.runtime == where.runtime)
    if where.state is not None:
        query = query.where(_state_condition(where.state, stale_before))
    if where.rollout_id is not None:
        query = query.join(RolloutReportRow, RolloutReportRow.device_id == DeviceRow.id).where(
            RolloutReportRow.rollout_id == where.rollout_id
        )
    return query


def list_devices(
    db: Database,
    where: DeviceFilter,
    *,
    stale_after_s: float,
    cursor: str | None = None,
    limit: int = 50,
    now: dt.datetime | None = None,
) -> Page[DeviceSummary]:
    """Devices matching ``where``, by id, one keyset page at a time.

    Raises:
        RequestError: a cursor this server did not issue, or a bad ``limit``.
    """
    stale_before = (now or utcnow()) - dt.timedelta(seconds=stale_after_s)
    after = decode_cursor("devices", cursor, (str,))
    start = None if after is None else str(after[0])
    query = page_query(where, stale_before=stale_before, after=start, limit=limit)
    with db.read() as session:
        items = [summary_of(row, stale_before) for row in session.scalars(query)]
    return page_of(items, limit, "devices", lambda d: [d.id])


def page_query(
    where: DeviceFilter, *, stale_before: dt.datetime, after: str | None, limit: int
) -> Select[DeviceRow]:
    """The ``SELECT`` of one page: ``limit + 1`` matching rows past device id ``after``.

    Raises:
        RequestError: a bad ``limit``.
    """
    query = _filtered(where, stale_before)
    if after is not None:
        query = query.where(DeviceRow.id > after)
    return query.order_by(DeviceRow.id).limit(check_limit(limit) + 1)


def get_device(
    db: Database, device_id: str, *, stale_after_s: float, now: dt.datetime | None = None
) -> DeviceSummary:
    """One device's inventory row.

    Raises:
        NotFoundError: no such device.
    """
    stale_before = (now or utcnow()) - dt.timedelta(seconds=stale_after_s)
    with db.read() as session:
        return summary_of(_device_row(session, device_id), stale_before)


def _device_row(session: Session, device_id: str) -> DeviceRow:
    row = session.get(DeviceRow, device_id)
    if row is None:
        raise NotFoundError(f"no device {device_id}")
    return row


def summary_of(row: DeviceRow, stale_before: dt.datetime) -> DeviceSummary:
    """A device row as an inventory row."""
    return DeviceSummary(
        id=row.id,
        base_fingerprint=row.base_fingerprint,
        installed_version=row.installed_version,
        runtime=row.runtime,
        memory_budget_bytes=row.memory_budget_bytes,
        state=state_of(row, stale_before),
        revoked=row.revoked_at is not None,
        created_at=as_utc(row.created_at),
        last_seen_at=_seen(row),
        last_outcome=row.last_outcome,
        last_outcome_version=row.last_outcome_version,
        last_outcome_reason=row.last_outcome_detail,
        last_outcome_at=as_utc(row.last_outcome_at) if row.last_outcome_at else None,
    )


def device_history(
    db: Database, device_id: str, *, cursor: str | None = None, limit: int = 50
) -> Page[HistoryEntry]:
    """A device's telemetry events, newest (highest ``seq``) first, one page at a time.

    Raises:
        NotFoundError: no such device.
        RequestError: a cursor this server did not issue, or a bad ``limit``.
    """
    after = decode_cursor("history", cursor, (int, str))
    event = TelemetryEventRow
    query = select(event).where(event.device_id == device_id)
    if after is not None:
        seq, event_id = after
        query = query.where(or_(event.seq < seq, and_(event.seq == seq, event.event_id < event_id)))
    query = query.order_by(event.seq.desc(), event.event_id.desc()).limit(check_limit(limit) + 1)
    with db.read() as session:
        _device_row(session, device_id)
        items = [_history_entry(row) for row in session.scalars(query)]
    return page_of(items, limit, "history", lambda e: [e.seq, e.event_id])


def _history_entry(row: TelemetryEventRow) -> HistoryEntry:
    return HistoryEntry(
        event_id=row.event_id,
        seq=row.seq,
        type=row.type,
        version=row.version,
        installed_version=row.installed_version,
        detail=row.detail,
        received_at=as_utc(row.received_at),
    )


_DEVICES_TABLE: Table = DeviceRow.__table__  # type: ignore[assignment]
_DEVICES = _DEVICES_TABLE.c
_MARK_SEEN = (
    update(_DEVICES_TABLE)
    .where(_DEVICES.id == bindparam("b_id"), _DEVICES.last_seen_at < bindparam("b_at"))
    .values(last_seen_at=bindparam("b_at"))
)


class SeenTracker:
    """When devices were last seen, collected in memory and written in batches.

    :meth:`mark` costs a dictionary store (it runs on the update check); :meth:`flush`
    writes everything marked since the last flush in one transaction, in id order (the
    order every other multi-device writer would take its locks in). A failed flush puts
    its marks back for the next one. A crash loses at most one flush interval.
    """

    def __init__(self, db: Database, *, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self._db = db
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, dt.datetime] = {}

    def mark(self, device_id: str) -> None:
        """Remember that ``device_id`` was seen now."""
        at = self._clock()
        with self._lock:
            self._pending[device_id] = at

    def flush(self) -> int:
        """Write the pending marks; returns how many devices were written."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        params = [{"b_id": i, "b_at": at} for i, at in sorted(pending.items())]
        try:
            with self._db.write() as session:
                session.connection().execute(_MARK_SEEN, params)
        except Exception:
            with self._lock:
                for device_id, at in pending.items():
                    self._pending[device_id] = max(at, self._pending.get(device_id, at))
            raise
        return len(params)
