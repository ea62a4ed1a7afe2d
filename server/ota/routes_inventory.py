"""Routes for operators: the fleet inventory (devices, their history) and the audit log.

Thin: each parses its query, calls one service function of :mod:`server.ota.inventory`
or :mod:`server.ota.audit` (the operator console calls the same functions), and shapes
the page. Pages are keyset pages behind an opaque ``cursor`` (:mod:`server.ota.paging`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from fastapi import APIRouter, Depends, Path, Query, Request

from server.ota import audit, inventory
from server.ota.auth import require_role
from server.ota.paging import MAX_CURSOR_CHARS, MAX_PAGE
from server.ota.schemas import (
    DEVICE_ID_PATTERN,
    FINGERPRINT_PATTERN,
    MAX_VERSION,
    AuditEntryOut,
    AuditPageOut,
    DeviceOut,
    DevicePageOut,
    HistoryEntryOut,
    HistoryPageOut,
)
from server.ota.services import services_of

router = APIRouter(
    prefix="/v1", tags=["operators"], dependencies=[Depends(require_role("operator"))]
)
Cursor = Query(default=None, max_length=MAX_CURSOR_CHARS, description="next_cursor of a page.")
Limit = Query(default=50, ge=1, le=MAX_PAGE)
DeviceId = Path(pattern=DEVICE_ID_PATTERN)
NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,80}$"


@router.get("/devices")
def list_devices(
    request: Request,
    base: str | None = Query(default=None, pattern=FINGERPRINT_PATTERN),
    version: int | None = Query(default=None, ge=0, le=MAX_VERSION, description="Installed."),
    runtime: str | None = Query(default=None, max_length=64),
    rollout: int | None = Query(default=None, ge=1, le=MAX_VERSION, description="Reported for."),
    state: inventory.DeviceState | None = None,
    cursor: str | None = Cursor,
    limit: int = Limit,
) -> DevicePageOut:
    """The fleet, by device id, filtered; each row with last-seen time, installed
    version, state and last outcome with its reason."""
    services = services_of(request)
    services.seen.flush()  # this worker's pending last-seen times, before reading them
    where = inventory.DeviceFilter(base, version, runtime, rollout, state)
    page = inventory.list_devices(
        services.db,
        where,
        stale_after_s=services.settings.stale_after_s,
        cursor=cursor,
        limit=limit,
    )
    return DevicePageOut(
        devices=[DeviceOut.of(d) for d in page.items], next_cursor=page.next_cursor
    )


@router.get("/devices/{device_id}")
def get_device(request: Request, device_id: str = DeviceId) -> DeviceOut:
    """One device's inventory row."""
    services = services_of(request)
    services.seen.flush()
    stale_after_s = services.settings.stale_after_s
    return DeviceOut.of(inventory.get_device(services.db, device_id, stale_after_s=stale_after_s))


@router.get("/devices/{device_id}/history")
def device_history(
    request: Request, device_id: str = DeviceId, cursor: str | None = Cursor, limit: int = Limit
) -> HistoryPageOut:
    """The events a device reported, newest first."""
    db = services_of(request).db
    page = inventory.device_history(db, device_id, cursor=cursor, limit=limit)
    return HistoryPageOut(
        device_id=device_id,
        events=[HistoryEntryOut(**dataclasses.asdict(e)) for e in page.items],
        next_cursor=page.next_cursor,
    )


@router.get("/audit")
def list_audit(
    request: Request,
    action: str | None = Query(default=None, pattern=NAME_PATTERN, description="Or a prefix."),
    actor: str | None = Query(default=None, pattern=NAME_PATTERN, description="Or its role."),
    since: dt.datetime | None = Query(default=None, description="ISO 8601, with a timezone."),
    cursor: str | None = Cursor,
    limit: int = Limit,
) -> AuditPageOut:
    """Recorded actions, newest first."""
    where = audit.AuditFilter(action=action, actor=actor, since=_aware(since))
    page = audit.list_audit(services_of(request).db, where, cursor=cursor, limit=limit)
    return AuditPageOut(
        entries=[AuditEntryOut(**dataclasses.asdict(e)) for e in page.items],
        next_cursor=page.next_cursor,
    )


def _aware(since: dt.datetime | None) -> dt.datetime | None:
    """A naive ``since`` is taken as UTC (what the server stores)."""
    if since is None:
        return None
    return since.replace(tzinfo=dt.UTC) if since.tzinfo is None else since.astimezone(dt.UTC)
