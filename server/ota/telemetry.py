"""Device telemetry: idempotent outcome events, device state, rollout evaluation.

An event is stored once per ``(device, event_id)`` (``INSERT ... ON CONFLICT DO
NOTHING``), so a retried delivery has no second effect. Events carry the device's own
monotonic ``seq``: state is only ever moved by an event newer than the one that last
moved it, so out-of-order delivery converges to what the device last said.

Outcomes (ADR 0007): ``installed``; ``failed`` marks the version failed for that device
(it is not offered again until an operator clears it) and counts toward the rollout's
failure rate; ``retry`` (a device-local or transport problem: disk full, a payload that
did not match its signed hash) is stored for the record but changes neither: the
release stays offered and the device tries again after its own backoff. An outcome may
carry the golden-prompt losses the device measured for the new and the replaced adapter;
they count for the rollout's quality gate (ADR 0014).
"""

from __future__ import annotations

import logging

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from protocol import EventType
from server.ota import audit
from server.ota.database import Database
from server.ota.domain import TelemetryEvent
from server.ota.errors import NotFoundError
from server.ota.models import DeviceRow, DeviceVersionRow, TelemetryEventRow, utcnow
from server.ota.rollouts import record_outcome

logger = logging.getLogger(__name__)
EVENT_TYPES = tuple(EventType)


def record_event(db: Database, device_id: str, event: TelemetryEvent) -> bool:
    """Store one event and apply its effects, exactly once.

    Returns:
        True if the event was new, False for a duplicate delivery.

    Raises:
        NotFoundError: no such device.
    """
    now = utcnow()
    with db.write() as session:
        # Lock the device first (then rollouts): one lock order everywhere, no deadlocks.
        device = session.get(DeviceRow, device_id, with_for_update=True, populate_existing=True)
        if device is None:
            raise NotFoundError(f"no device {device_id}")
        insert = pg_insert if db.is_postgres else sqlite_insert
        result = session.execute(
            insert(TelemetryEventRow)
            .values(
                device_id=device_id,
                event_id=event.event_id,
                seq=event.seq,
                type=event.type,
                version=event.version,
                installed_version=event.installed_version,
                detail=event.detail,
                received_at=now,
            )
            .on_conflict_do_nothing()
            .returning(TelemetryEventRow.event_id)
        )
        if result.first() is None:  # a duplicate delivery: no second effect
            return False
        device.last_seen_at = now  # it authenticated just now (under the row lock)
        if event.seq > device.last_event_seq:
            device.last_event_seq = event.seq
            device.installed_version = event.installed_version
            device.last_outcome, device.last_outcome_version = event.type, event.version
            device.last_outcome_detail, device.last_outcome_at = event.detail, now
        if event.type == "retry":  # not the release's fault: no failure, no rollout count
            return True
        status = "installed" if event.type == EventType.INSTALLED else "failed"
        row = session.get(DeviceVersionRow, (device_id, event.version))
        if row is None:
            session.add(
                DeviceVersionRow(
                    device_id=device_id,
                    version=event.version,
                    status=status,
                    seq=event.seq,
                    updated_at=now,
                )
            )
        elif event.seq > row.seq:
            row.status, row.seq, row.updated_at = status, event.seq, now
        session.flush()
        record_outcome(
            session,
            device_id=device_id,
            base_fingerprint=device.base_fingerprint,
            version=event.version,
            outcome=status,
            seq=event.seq,
            quality=(event.golden_loss, event.previous_golden_loss),
        )
    return True


def clear_failure(db: Database, device_id: str, version: int, *, actor: str) -> bool:
    """Operator action: allow ``version`` to be offered to this device again (audited).

    Returns:
        Whether a failure record was cleared.
    """
    with db.write() as session:
        result = session.execute(
            delete(DeviceVersionRow).where(
                DeviceVersionRow.device_id == device_id,
                DeviceVersionRow.version == version,
                DeviceVersionRow.status == "failed",
            )
        )
        cleared = bool(result.rowcount)  # type: ignore[attr-defined]
        if cleared:
            audit.record(
                session,
                actor=actor,
                action=audit.AuditAction.DEVICE_CLEAR_FAILURE,
                target=f"device:{device_id}",
                version=version,
            )
        return cleared
