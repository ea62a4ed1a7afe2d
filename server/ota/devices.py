"""Device identity: enrollment, per-device bearer tokens, revocation, reported state.

Tokens are 256-bit random strings; only their SHA-256 is stored (a fast hash is enough
for a secret of that entropy, and lets the lookup be one indexed query). A revoked
device's token stops working at once. The device's own report of what it runs is
authoritative.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.ota import audit
from server.ota.database import Database
from server.ota.domain import DeviceCapabilities, DeviceReport
from server.ota.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from server.ota.models import DeviceRow, utcnow

TOKEN_PREFIX = "fdt_"


@dataclass(frozen=True)
class Enrollment:
    """What a device receives once, at enrollment."""

    device_id: str
    token: str


def hash_token(token: str) -> str:
    """The stored form of a device token."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_enrollment_secret(given: str, expected: str) -> None:
    """Constant-time check of the fleet enrollment secret.

    Raises:
        AuthenticationError: if it does not match.
    """
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise AuthenticationError(
            "enrollment secret is wrong; ask the operator for the current one"
        )


def enroll(db: Database, report: DeviceReport, *, id_seed: int | None = None) -> Enrollment:
    """Create a device with a fresh token.

    The id is random, or with ``id_seed`` (``OtaSettings.simulation_seed``) derived from
    the seed and the number of devices enrolled before, so that a simulation's devices
    land in the same rollout stages on every run. The token is always random.
    """
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    with db.write() as session:
        device_id = uuid.uuid4().hex if id_seed is None else _seeded_id(session, id_seed)
        session.add(
            DeviceRow(
                id=device_id,
                token_hash=hash_token(token),
                created_at=now,
                revoked_at=None,
                last_event_seq=0,
                last_seen_at=now,
                **_report_columns(report),
            )
        )
    return Enrollment(device_id=device_id, token=token)


def _seeded_id(session: Session, seed: int) -> str:
    enrolled = session.scalar(select(func.count()).select_from(DeviceRow)) or 0
    return hashlib.sha256(f"fedota-device:{seed}:{enrolled}".encode()).hexdigest()[:32]


def _report_columns(report: DeviceReport) -> dict[str, object]:
    return {
        "base_fingerprint": report.base_fingerprint,
        "installed_version": report.installed_version,
        "capabilities": dataclasses.asdict(report.capabilities),
        "runtime": report.capabilities.runtime,
        "memory_budget_bytes": report.memory_budget_bytes,
    }


def authenticate(db: Database, token: str, device_id: str) -> None:
    """Check that ``token`` belongs to the live device ``device_id``.

    Raises:
        AuthenticationError: unknown or revoked token.
        PermissionDeniedError: a valid token of another device.
    """
    with db.read() as session:
        row = session.execute(
            select(DeviceRow.id, DeviceRow.revoked_at).where(
                DeviceRow.token_hash == hash_token(token)
            )
        ).first()
    check_device_row(row, device_id)


def check_device_row(row: Any, device_id: str) -> None:
    """Judge the device row a token hash selected (None: no such token).

    Raises:
        AuthenticationError: unknown or revoked token.
        PermissionDeniedError: a valid token of another device.
    """
    if row is None:
        raise AuthenticationError("unknown device token; enroll the device again")
    if row.revoked_at is not None:
        raise AuthenticationError("this device's token was revoked; enroll the device again")
    if not hmac.compare_digest(row.id, device_id):
        raise PermissionDeniedError("a device may only act as itself")


def revoke(db: Database, device_id: str, *, actor: str) -> None:
    """Revoke a device's token (idempotent; audited when it revokes).

    Raises:
        NotFoundError: no such device.
    """
    with db.write() as session:
        row = session.get(DeviceRow, device_id)
        if row is None:
            raise NotFoundError(f"no device {device_id}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            audit.record(
                session,
                actor=actor,
                action=audit.AuditAction.DEVICE_REVOKE,
                target=f"device:{device_id}",
            )


def report_of(row: DeviceRow) -> DeviceReport:
    """The last state a device reported, as a domain value."""
    return report_from_columns(row)


def report_from_columns(row: Any) -> DeviceReport:
    """A device report from anything with the device columns (ORM object or Core row)."""
    caps = row.capabilities or {}
    return DeviceReport(
        base_fingerprint=row.base_fingerprint,
        installed_version=row.installed_version,
        capabilities=DeviceCapabilities(
            supports_delta=bool(caps.get("supports_delta", True)),
            format_versions=tuple(caps.get("format_versions", (1,))),
            runtime=str(caps.get("runtime", "")),
        ),
        memory_budget_bytes=row.memory_budget_bytes,
    )


def apply_report(row: DeviceRow, report: DeviceReport) -> bool:
    """Store a fresh device report on its row; returns whether anything changed."""
    changed = False
    for name, value in _report_columns(report).items():
        if getattr(row, name) != value:
            setattr(row, name, value)
            changed = True
    return changed
