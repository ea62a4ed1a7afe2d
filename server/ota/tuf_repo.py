"""④ publish, trust side: the server's TUF repository (consistent snapshots).

The server holds only the online snapshot and timestamp keys. It accepts a new targets
metadata only when the trusted root's targets role signs it (threshold included) and
its version is higher than the current one; it then signs a new snapshot and timestamp.
Every metadata version is stored once in the database — ``(role, version)`` is the
primary key, so concurrent workers can never publish two different files under one
version — and stays servable, so a device that fetched ``N.targets.json`` can finish.
The timestamp (and the snapshot) are re-signed when less than half their lifetime is
left, by a background task and on demand when ``timestamp.json`` is served.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import Signer
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tuf.api.exceptions import RepositoryError, UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from delta_packager import PackagerError, trust
from server.ota import audit
from server.ota.database import Database
from server.ota.errors import ConflictError, NotFoundError, OtaConfigError, ReleaseRejectedError
from server.ota.models import TufMetadataRow, as_utc

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
_PARSE_ERRORS = (DeserializationError, ValueError, TypeError, KeyError, AttributeError)
_PG_TUF_LOCK = 0x0F0DA7A  # advisory lock id serializing metadata writers on PostgreSQL


def load_signer(pem_path: Path) -> Signer:
    """Load an online key the release pipeline wrote (``KEYS/private/<role>.pem``).

    Uses the pipeline's own loader, so the key file contract has one implementation.

    Raises:
        OtaConfigError: if the file is missing or is not a usable private key.
    """
    try:
        return trust.load_signer(pem_path)
    except PackagerError as exc:
        raise OtaConfigError(
            f"{exc}; configure the online key file the release pipeline wrote"
        ) from exc


@dataclass(frozen=True)
class OnlineKeys:
    """The two signers the server holds."""

    snapshot: Signer
    timestamp: Signer


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


class TufRepository:
    """Stores, verifies and signs the repository's metadata in the database."""

    def __init__(
        self,
        db: Database,
        keys: OnlineKeys,
        *,
        snapshot_expiry_s: int,
        timestamp_expiry_s: int,
    ) -> None:
        self._db = db
        self._keys = keys
        self._snapshot_expiry = dt.timedelta(seconds=snapshot_expiry_s)
        self._timestamp_expiry = dt.timedelta(seconds=timestamp_expiry_s)

    # ------------------------------------------------------------------ reading
    def get(self, role: str, version: int | None = None) -> bytes:
        """The bytes of ``role`` at ``version`` (latest when None).

        Raises:
            NotFoundError: if no such metadata was published.
        """
        with self._db.read() as session:
            row = self._row(session, role, version)
        if row is None:
            raise NotFoundError(f"no {role} metadata{'' if version is None else f' v{version}'}")
        return row.payload

    @staticmethod
    def _row(session: Session, role: str, version: int | None) -> TufMetadataRow | None:
        query = select(TufMetadataRow).where(TufMetadataRow.role == role)
        if version is None:
            query = query.order_by(TufMetadataRow.version.desc()).limit(1)
        else:
            query = query.where(TufMetadataRow.version == version)
        return session.scalars(query).first()

    def latest_root(self, session: Session) -> Metadata[Root]:
        """The newest trusted root.

        Raises:
            OtaConfigError: if the repository was never bootstrapped.
        """
        row = self._row(session, "root", None)
        if row is None:
            raise OtaConfigError("no trusted root stored; start the server with --trusted-root")
        return Metadata[Root].from_bytes(row.payload)

    # ------------------------------------------------------------------ bootstrap
    def bootstrap(self, trusted_root: bytes) -> None:
        """Store the configured root (or verify it chains from the stored one).

        Raises:
            OtaConfigError: if the root does not verify, or the online keys are not the
                root's snapshot/timestamp keys.
        """
        try:
            new_root = Metadata[Root].from_bytes(trusted_root)
            new_root.verify_delegate("root", new_root)
        except (RepositoryError, *_PARSE_ERRORS) as exc:
            raise OtaConfigError(f"trusted root does not verify: {exc}") from exc
        if not new_root.signed.consistent_snapshot:
            raise OtaConfigError("trusted root must set consistent_snapshot=true")
        with self._db.write() as session:
            self._lock(session)
            stored = self._row(session, "root", None)
            if stored is None:
                self._insert(session, new_root)
                logger.info("stored trusted root v%d", new_root.signed.version)
            elif new_root.signed.version > stored.version:
                self._check_root_rotation(Metadata[Root].from_bytes(stored.payload), new_root)
                self._insert(session, new_root)
            root = self.latest_root(session)
        self._check_online_keys(root)

    def rotate_root(self, new_root_bytes: bytes, *, actor: str) -> int:
        """Accept root N+1 signed by the thresholds of root N and of itself (audited as
        ``actor``, in the same transaction).

        Returns:
            The new root version.

        Raises:
            ReleaseRejectedError: if it does not verify or is not exactly N+1.
        """
        try:
            new_root = Metadata[Root].from_bytes(new_root_bytes)
        except _PARSE_ERRORS as exc:
            raise ReleaseRejectedError(f"not a TUF root metadata file: {exc}") from exc
        with self._db.write() as session:
            self._lock(session)
            current = self.latest_root(session)
            self._check_root_rotation(current, new_root)
            try:
                self._check_online_keys(new_root)
            except OtaConfigError as exc:
                raise ReleaseRejectedError(str(exc)) from exc
            self._insert(session, new_root)
            audit.record(
                session,
                actor=actor,
                action=audit.AuditAction.ROOT_ROTATE,
                target=f"root:{new_root.signed.version}",
                keyids=sorted(new_root.signed.keys),
            )
        return new_root.signed.version

    @staticmethod
    def _check_root_rotation(current: Metadata[Root], new: Metadata[Root]) -> None:
        if new.signed.version != current.signed.version + 1:
            raise ReleaseRejectedError(
                f"root v{new.signed.version} does not follow v{current.signed.version}; "
                f"publish v{current.signed.version + 1}"
            )
        try:
            current.verify_delegate("root", new)
            new.verify_delegate("root", new)
        except UnsignedMetadataError as exc:
            raise ReleaseRejectedError(
                f"root v{new.signed.version} lacks the signatures of the old or new root "
                f"threshold: {exc}"
            ) from exc

    def _check_online_keys(self, root: Metadata[Root]) -> None:
        for role, signer in (
            ("snapshot", self._keys.snapshot),
            ("timestamp", self._keys.timestamp),
        ):
            spec = root.signed.roles[role]
            if signer.public_key.keyid not in spec.keyids or spec.threshold != 1:
                raise OtaConfigError(
                    f"the configured {role} key {signer.public_key.keyid[:12]} is not the "
                    f"1-of-1 {role} key of root v{root.signed.version}; configure the key "
                    "the root names"
                )

    # ------------------------------------------------------------------ releases
    def verify_targets(self, session: Session, targets_bytes: bytes) -> Metadata[Targets]:
        """Verify new targets metadata against the trusted root and the current version.

        Raises:
            ReleaseRejectedError: bad format, bad signature/threshold, expired, not newer.
        """
        try:
            targets = Metadata[Targets].from_bytes(targets_bytes)
        except _PARSE_ERRORS as exc:
            raise ReleaseRejectedError(f"not a TUF targets metadata file: {exc}") from exc
        try:
            self.latest_root(session).verify_delegate("targets", targets)
        except UnsignedMetadataError as exc:
            raise ReleaseRejectedError(
                f"targets metadata is not signed by the root's targets threshold: {exc}; "
                "sign it with the offline targets key"
            ) from exc
        if targets.signed.is_expired(_now()):
            raise ReleaseRejectedError(f"targets metadata expired at {targets.signed.expires}")
        if targets.signed.delegations is not None:
            raise ReleaseRejectedError("delegated targets are not supported by this server")
        current = session.scalar(
            select(func.max(TufMetadataRow.version)).where(TufMetadataRow.role == "targets")
        )
        if current is not None and targets.signed.version <= current:
            raise ConflictError(
                f"targets v{targets.signed.version} is not newer than the published "
                f"v{current}; sign a new targets metadata with version {current + 1} or more"
            )
        return targets

    def publish_targets(self, session: Session, targets: Metadata[Targets], raw: bytes) -> int:
        """Store verified targets and sign a snapshot and timestamp naming it.

        Must run inside the caller's write transaction (after :meth:`lock`).

        Returns:
            The new snapshot version.
        """
        session.add(
            TufMetadataRow(
                role="targets",
                version=targets.signed.version,
                payload=raw,
                expires_at=targets.signed.expires,
            )
        )
        return self._sign_snapshot_and_timestamp(session, targets.signed.version)

    def lock(self, session: Session) -> None:
        """Serialize metadata writers (advisory lock on PostgreSQL; SQLite already is)."""
        self._lock(session)

    def _lock(self, session: Session) -> None:
        self._db.serialize(session, _PG_TUF_LOCK)

    def _sign_snapshot_and_timestamp(self, session: Session, targets_version: int) -> int:
        now = _now()
        last = self._row(session, "snapshot", None)
        snapshot = Metadata(
            Snapshot(
                version=(last.version + 1) if last else 1,
                expires=now + self._snapshot_expiry,
                meta={"targets.json": MetaFile(version=targets_version)},
            )
        )
        snapshot.sign(self._keys.snapshot)
        snapshot_bytes = self._insert(session, snapshot)
        self._sign_timestamp(session, snapshot.signed.version, snapshot_bytes, now)
        return snapshot.signed.version

    def _sign_timestamp(
        self, session: Session, snapshot_version: int, snapshot_bytes: bytes, now: dt.datetime
    ) -> None:
        last = self._row(session, "timestamp", None)
        meta = MetaFile.from_data(snapshot_version, snapshot_bytes, ["sha256"])
        timestamp = Metadata(
            Timestamp(
                version=(last.version + 1) if last else 1,
                expires=now + self._timestamp_expiry,
                snapshot_meta=meta,
            )
        )
        timestamp.sign(self._keys.timestamp)
        self._insert(session, timestamp)

    @staticmethod
    def _insert(session: Session, md: Metadata) -> bytes:  # type: ignore[type-arg]
        payload = md.to_bytes()
        session.add(
            TufMetadataRow(
                role=md.signed.type,
                version=md.signed.version,
                payload=payload,
                expires_at=md.signed.expires,
            )
        )
        session.flush()
        return payload

    # ------------------------------------------------------------------ freshness
    def refresh(self, now: dt.datetime | None = None) -> bool:
        """Re-sign snapshot/timestamp when less than half their lifetime is left.

        Returns:
            True if new metadata was signed (False also when another worker won the race).
        """
        now = now or _now()
        try:
            with self._db.write() as session:
                self._lock(session)
                return self._refresh_locked(session, now)
        except IntegrityError:
            logger.info("another worker refreshed the timestamp first")
            return False

    def _refresh_locked(self, session: Session, now: dt.datetime) -> bool:
        snapshot = self._row(session, "snapshot", None)
        timestamp = self._row(session, "timestamp", None)
        if snapshot is None or timestamp is None:
            return False  # nothing published yet
        if as_utc(snapshot.expires_at) - now < self._snapshot_expiry / 2:
            targets_version = (
                Metadata[Snapshot].from_bytes(snapshot.payload).signed.meta["targets.json"].version
            )
            self._sign_snapshot_and_timestamp(session, targets_version)
            logger.info("re-signed snapshot and timestamp before expiry")
            return True
        if as_utc(timestamp.expires_at) - now < self._timestamp_expiry / 2:
            self._sign_timestamp(session, snapshot.version, snapshot.payload, now)
            logger.info("re-signed timestamp before expiry")
            return True
        return False

    def needs_refresh(self, now: dt.datetime | None = None) -> bool:
        """Whether the newest snapshot or timestamp has less than half its lifetime left."""
        now = now or _now()
        with self._db.read() as session:
            snapshot = self._row(session, "snapshot", None)
            timestamp = self._row(session, "timestamp", None)
        if snapshot is None or timestamp is None:
            return False
        return (
            as_utc(snapshot.expires_at) - now < self._snapshot_expiry / 2
            or as_utc(timestamp.expires_at) - now < self._timestamp_expiry / 2
        )
