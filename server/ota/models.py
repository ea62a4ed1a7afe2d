"""SQLAlchemy 2 table mappings of the OTA service (the schema Alembic migrates).

Invariants kept by the schema itself: one token hash per device; one stored row per
(device, telemetry event id) so duplicates collapse; one (role, version) per TUF
metadata file so two workers can never publish different bytes under one version.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    """Timezone-aware now in UTC."""
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base with the project's naming convention for constraints."""


class DeviceRow(Base):
    __tablename__ = "devices"
    # Keyset pages of the inventory walk ``id`` within one filter (revision 0005).
    __table_args__ = (
        Index("ix_devices_base_id", "base_fingerprint", "id"),
        Index("ix_devices_installed_id", "installed_version", "id"),
        Index("ix_devices_runtime_id", "runtime", "id"),
        Index("ix_devices_outcome_id", "last_outcome", "id"),
        Index("ix_devices_last_seen", "last_seen_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    base_fingerprint: Mapped[str] = mapped_column(String(80), index=True)
    installed_version: Mapped[int | None] = mapped_column(Integer)
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    memory_budget_bytes: Mapped[int] = mapped_column(BigInteger)
    last_event_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # revision 0005: the fleet inventory (server/ota/inventory.py). ``runtime`` repeats
    # capabilities["runtime"] so it can be filtered on; ``last_outcome*`` describe the
    # event that last moved ``last_event_seq``; ``last_seen_at`` is written in batches.
    runtime: Mapped[str] = mapped_column(String(64), default="")
    last_seen_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=text("CURRENT_TIMESTAMP")
    )
    last_outcome: Mapped[str | None] = mapped_column(String(24))
    last_outcome_version: Mapped[int | None] = mapped_column(Integer)
    last_outcome_detail: Mapped[str] = mapped_column(String(500), default="")
    last_outcome_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class BlobRow(Base):
    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    length: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class ReleaseRow(Base):
    __tablename__ = "releases"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    targets_sha256: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class TargetRow(Base):
    __tablename__ = "targets"
    __table_args__ = (
        UniqueConstraint("release_version", "path"),
        Index("ix_targets_lookup", "release_version", "base_fingerprint", "to_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    release_version: Mapped[int] = mapped_column(ForeignKey("releases.version"))
    path: Mapped[str] = mapped_column(String(512))
    url_path: Mapped[str] = mapped_column(String(640), index=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    length: Mapped[int] = mapped_column(BigInteger)
    hashes: Mapped[dict[str, str]] = mapped_column(JSON)
    kind: Mapped[str] = mapped_column(String(8))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer)
    base_fingerprint: Mapped[str] = mapped_column(String(80))
    release_counter: Mapped[int] = mapped_column(Integer)
    uncompressed_bytes: Mapped[int] = mapped_column(BigInteger)
    # revision 0006 (release gates): the signed custom.fedota.privacy block, if any
    privacy: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)


class TufMetadataRow(Base):
    __tablename__ = "tuf_metadata"

    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


# ---- revision 0002: rollouts and telemetry -------------------------------------------


class RolloutRow(Base):
    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_fingerprint: Mapped[str] = mapped_column(String(80), index=True)
    to_version: Mapped[int] = mapped_column(Integer)
    salt: Mapped[str] = mapped_column(String(32))
    stages: Mapped[list[int]] = mapped_column(JSON)
    max_failure_rate: Mapped[float] = mapped_column(Float)
    min_reports: Mapped[int] = mapped_column(Integer)
    min_reports_fraction: Mapped[float] = mapped_column(Float, default=1.0)  # revision 0005
    stage_index: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    pause_reason: Mapped[str | None] = mapped_column(String(16))
    quality_tolerance: Mapped[float | None] = mapped_column(Float, nullable=True)  # rev. 0006
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class RolloutEventRow(Base):
    """Audit trail of rollout state changes: each action appears exactly once."""

    __tablename__ = "rollout_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    stage_index: Mapped[int] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(80), default="")  # revision 0005


class RolloutReportRow(Base):
    """The latest outcome one device reported for one rollout, and its stage."""

    __tablename__ = "rollout_reports"
    __table_args__ = (Index("ix_rollout_reports_stage", "rollout_id", "stage_index", "outcome"),)

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    stage_index: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))
    seq: Mapped[int] = mapped_column(BigInteger)
    # revision 0006: golden-prompt losses the device measured (new, replaced adapter)
    golden_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    previous_golden_loss: Mapped[float | None] = mapped_column(Float, nullable=True)


class DeviceVersionRow(Base):
    """What a device last reported about one adapter version (installed / failed)."""

    __tablename__ = "device_versions"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(String(16))
    seq: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class TelemetryEventRow(Base):
    __tablename__ = "telemetry_events"
    __table_args__ = (Index("ix_telemetry_events_history", "device_id", "seq"),)  # rev. 0005

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(24))
    version: Mapped[int | None] = mapped_column(Integer)
    installed_version: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(String(500))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


REVISION_0001_TABLES = ("devices", "blobs", "releases", "targets", "tuf_metadata")


def as_utc(value: dt.datetime) -> dt.datetime:
    """``value`` as an aware UTC datetime (SQLite hands back naive UTC values)."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# ---- revision 0003: a generation stamp for per-process caches ---------------------------


class OtaStateRow(Base):
    """One row: ``generation`` rises in every transaction that changes what checks answer
    (a release, any rollout transition), so workers can cache that state and know, from
    the same query that authenticates a device, whether their cache is current."""

    __tablename__ = "ota_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(BigInteger)


def bump_generation(session: Any) -> None:
    """Invalidate every worker's cached release/rollout state (inside the change's
    transaction, so the new generation is visible exactly when the change is)."""
    from sqlalchemy import update

    session.execute(
        update(OtaStateRow).where(OtaStateRow.id == 1).values(generation=OtaStateRow.generation + 1)
    )


# ---- revision 0004: every base a bundle applies to ------------------------------------


class TargetBaseRow(Base):
    """One row per (bundle, base it applies to): its primary base and each compatible
    one. ``release_version`` and ``to_version`` repeat the target's, so "the current
    release's bundles of version v for base b" is one range scan of
    ``ix_target_bases_lookup`` (the same key as ``ix_targets_lookup``)."""

    __tablename__ = "target_bases"
    __table_args__ = (
        Index("ix_target_bases_lookup", "release_version", "base_fingerprint", "to_version"),
    )

    target_id: Mapped[int] = mapped_column(ForeignKey("targets.id"), primary_key=True)
    base_fingerprint: Mapped[str] = mapped_column(String(80), primary_key=True)
    release_version: Mapped[int] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer)


# ---- revision 0005: the audit log ---------------------------------------------------


class AuditRow(Base):
    """One operator, pipeline or automatic action, written in the action's transaction."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_action_id", "action", "id"),
        Index("ix_audit_log_actor_id", "actor", "id"),
        Index("ix_audit_log_at", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(80))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(80))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
