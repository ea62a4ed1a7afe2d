"""The audit log: who did what to the fleet, written in the same transaction as the act.

Every publish, rollout transition (create, advance, pause, resume, cancel, and the
automatic advance and pause), root key rotation, device revocation and cleared failure
adds exactly one row through :func:`record`, called inside the action's own write
transaction: the entry commits if and only if the action does, so a crash or a refused
action leaves no entry and a retried one no second entry. Actors are ``<role>:<key id>``
(the first 12 hex digits of the SHA-256 of the role key used), ``device:<id>``, or
``system:<rule>`` for what the server does by itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session

from server.ota.database import Database
from server.ota.models import AuditRow, as_utc, utcnow
from server.ota.paging import Page, check_limit, decode_cursor, page_of


class AuditAction(StrEnum):
    """What an audit entry records."""

    PUBLISH = "release.publish"
    ROLLOUT_CREATE = "rollout.create"
    ROLLOUT_ADVANCE = "rollout.advance"
    ROLLOUT_PAUSE = "rollout.pause"
    ROLLOUT_RESUME = "rollout.resume"
    ROLLOUT_CANCEL = "rollout.cancel"
    ROLLOUT_AUTO_PAUSE = "rollout.auto_pause"
    ROOT_ROTATE = "tuf.root_rotate"
    DEVICE_REVOKE = "device.revoke"
    DEVICE_CLEAR_FAILURE = "device.clear_failure"


SYSTEM_STAGE_DONE = "system:stage-complete"  # the rule that starts the next stage


def system_actor(rule: str) -> str:
    """The actor of what the server does by itself under ``rule`` (e.g. a rollout's
    ``pause_reason``: ``system:threshold``)."""
    return f"system:{rule}"


def role_actor(role: str, key: str) -> str:
    """The actor name of a caller holding role ``key`` (never the key itself)."""
    return f"{role}:{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class AuditEntry:
    """One recorded action."""

    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class AuditFilter:
    """Which entries to list: ``action`` and ``actor`` match exactly, or as a prefix
    when they lack their separator (``rollout`` matches ``rollout.pause``, ``operator``
    matches ``operator:<key id>``); ``since`` keeps entries at or after it."""

    action: str | None = None
    actor: str | None = None
    since: dt.datetime | None = None


def record(
    session: Session, *, actor: str, action: AuditAction, target: str, **detail: Any
) -> None:
    """Add one entry inside the caller's write transaction (see module doc)."""
    session.add(
        AuditRow(at=utcnow(), actor=actor, action=action, target=target[:80], detail=detail)
    )


def list_audit(
    db: Database, where: AuditFilter, *, cursor: str | None = None, limit: int = 50
) -> Page[AuditEntry]:
    """Entries matching ``where``, newest first, one keyset page at a time.

    Raises:
        RequestError: a cursor this server did not issue, or a bad ``limit``.
    """
    after = decode_cursor("audit", cursor, (int,))
    query = _filtered(where)
    if after is not None:
        query = query.where(AuditRow.id < after[0])
    with db.read() as session:
        rows = session.scalars(query.order_by(AuditRow.id.desc()).limit(check_limit(limit) + 1))
        entries = [_entry(row) for row in rows]
    return page_of(entries, limit, "audit", lambda e: [e.id])


def _filtered(where: AuditFilter) -> Select[AuditRow]:
    query = select(AuditRow)
    if where.action is not None:
        query = query.where(_match(AuditRow.action, where.action, "."))
    if where.actor is not None:
        query = query.where(_match(AuditRow.actor, where.actor, ":"))
    if where.since is not None:
        query = query.where(AuditRow.at >= where.since)
    return query


def _match(column: Any, value: str, separator: str) -> ColumnElement[bool]:
    if separator in value:
        return column == value  # type: ignore[no-any-return]
    return column.startswith(value + separator, autoescape=True)  # type: ignore[no-any-return]


def _entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        at=as_utc(row.at),
        actor=row.actor,
        action=row.action,
        target=row.target,
        detail=dict(row.detail),
    )
