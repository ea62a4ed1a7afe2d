"""④ publish: accept a release (signed targets metadata + the bundles it names).

Bundles are uploaded first, content-addressed (``PUT /v1/blobs/{sha256}``); the
release then names them. A release is accepted only if its targets metadata verifies
against the trusted root, is newer than the current one, every target follows the
bundle contract, and every target's bytes are stored with exactly the signed length
and hashes. All of it — release row, target rows, one ``target_bases`` row per base a
bundle applies to (its primary and every ``compatible_bases`` entry of its signed
custom metadata), targets/snapshot/timestamp metadata — commits in one transaction, so
devices never see a half-published release.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from protocol import PrivacyPolicy, PrivacySpend
from server.ota import audit
from server.ota.blobs import FileBlobStore, hash_file
from server.ota.database import Database
from server.ota.domain import BundleTarget, parse_bundle_target, release_gate_violation
from server.ota.errors import NotFoundError, ReleaseGateError, ReleaseRejectedError
from server.ota.models import (
    BlobRow,
    ReleaseRow,
    TargetBaseRow,
    TargetRow,
    bump_generation,
    utcnow,
)
from server.ota.tuf_repo import TufRepository

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedRelease:
    """What a successful publish produced."""

    version: int
    snapshot_version: int
    targets: tuple[BundleTarget, ...]


def record_blob(db: Database, sha256: str, length: int) -> None:
    """Remember a stored blob (idempotent: uploading the same bytes twice is fine)."""
    values = {"sha256": sha256, "length": length, "created_at": utcnow()}
    with db.write() as session:
        insert = pg_insert if db.is_postgres else sqlite_insert
        session.execute(insert(BlobRow).values(**values).on_conflict_do_nothing())


def publish_release(
    db: Database,
    repo: TufRepository,
    blobs: FileBlobStore,
    targets_bytes: bytes,
    *,
    actor: str,
    policy: PrivacyPolicy | None = None,
) -> PublishedRelease:
    """Verify and publish a release.

    Args:
        db: The database.
        repo: The TUF repository (online keys).
        blobs: Where the uploaded bundles are.
        targets_bytes: The signed targets metadata, as signed.
        actor: Who publishes (recorded in the audit log, in the same transaction).
        policy: The operator's privacy release gate: every bundle this release adds
            (a target path the current release does not hold) must be within it.

    Returns:
        The published release.

    Raises:
        ReleaseGateError: a bundle it adds spent more privacy than ``policy`` allows.
        ReleaseRejectedError: signature, contract, missing bundle or hash mismatch.
        ConflictError: the targets version is not newer than the published one.
    """
    with db.write() as session:
        repo.lock(session)
        targets_md = repo.verify_targets(session, targets_bytes)
        bundles = tuple(
            parse_bundle_target(path, info.length, info.hashes, info.custom)
            for path, info in sorted(targets_md.signed.targets.items())
        )
        if policy is not None and policy.is_set:
            _check_gate(session, policy, bundles, targets_md.signed.version)
        for bundle in bundles:
            _check_bytes(session, blobs, bundle)
        version = targets_md.signed.version
        session.add(
            ReleaseRow(
                version=version,
                targets_sha256=hashlib.sha256(targets_bytes).hexdigest(),
                published_at=utcnow(),
            )
        )
        rows = [_target_row(version, b) for b in bundles]
        session.add_all(rows)
        session.flush()  # assigns the target ids the base rows point to
        session.add_all(
            TargetBaseRow(
                target_id=row.id,
                base_fingerprint=base,
                release_version=version,
                to_version=bundle.to_version,
            )
            for row, bundle in zip(rows, bundles, strict=True)
            for base in bundle.bases
        )
        session.flush()
        snapshot_version = repo.publish_targets(session, targets_md, targets_bytes)
        bump_generation(session)
        audit.record(
            session,
            actor=actor,
            action=audit.AuditAction.PUBLISH,
            target=f"release:{version}",
            snapshot_version=snapshot_version,
            bundles=[b.path for b in bundles],
        )
    logger.info("published release v%d with %d bundle(s)", version, len(bundles))
    return PublishedRelease(version=version, snapshot_version=snapshot_version, targets=bundles)


def _check_gate(
    session: Session, policy: PrivacyPolicy, bundles: tuple[BundleTarget, ...], version: int
) -> None:
    """Refuse the release if a bundle it adds breaks the privacy policy. Bundles the
    current release already holds were judged when they were added (a policy tightened
    since then stops them at rollout time instead)."""
    latest = latest_release_version(session)
    rows = session.execute(
        select(TargetRow.path, TargetRow.blob_sha256).where(TargetRow.release_version == latest)
    )
    held = {(path, sha) for path, sha in rows}
    for bundle in bundles:
        if (bundle.path, bundle.sha256) in held:
            continue
        why = release_gate_violation(policy, bundle)
        if why is not None:
            raise ReleaseGateError(
                f"{why} ({bundle.path}, targets v{version}); refusing to publish it: "
                "release an adapter trained within the budget, or change the server's policy"
            )


def _check_bytes(session: Session, blobs: FileBlobStore, bundle: BundleTarget) -> None:
    row = session.get(BlobRow, bundle.sha256)
    if row is None or not blobs.exists(bundle.sha256):
        raise ReleaseRejectedError(
            f"bundle for {bundle.path} (sha256 {bundle.sha256}) was not uploaded; "
            f"PUT it to /v1/blobs/{bundle.sha256} first"
        )
    if row.length != bundle.length:
        raise ReleaseRejectedError(
            f"{bundle.path}: stored bundle has {row.length} bytes, metadata says {bundle.length}"
        )
    others = [name for name in bundle.hashes if name != "sha256"]
    if others:
        actual = hash_file(blobs.path_of(bundle.sha256), others)
        for name in others:
            if actual[name] != bundle.hashes[name]:
                raise ReleaseRejectedError(f"{bundle.path}: {name} of the stored bytes differs")


def _target_row(version: int, bundle: BundleTarget) -> TargetRow:
    return TargetRow(
        release_version=version,
        path=bundle.path,
        url_path=bundle.url_path,
        blob_sha256=bundle.sha256,
        length=bundle.length,
        hashes=bundle.hashes,
        kind=bundle.kind,
        from_version=bundle.from_version,
        to_version=bundle.to_version,
        base_fingerprint=bundle.base_fingerprint,
        release_counter=bundle.release_counter,
        uncompressed_bytes=bundle.uncompressed_bytes,
        privacy=bundle.privacy.to_json() if bundle.privacy is not None else None,
    )


def latest_release_version(session: Session) -> int | None:
    """Version of the newest published release (None before the first)."""
    return session.scalar(select(func.max(ReleaseRow.version)))


def require_released(session: Session, version: int) -> None:
    """Check that some published release names a bundle of adapter ``version``.

    Raises:
        NotFoundError: no release ever did.
    """
    named = session.scalar(select(TargetRow.id).where(TargetRow.to_version == version).limit(1))
    if named is None:
        raise NotFoundError(
            f"version {version} was never released; a device can only report outcomes "
            "of versions a published release names"
        )


def current_targets(session: Session, base_fingerprint: str, to_version: int) -> list[BundleTarget]:
    """Bundles of the newest release of ``to_version`` that apply to a base (as their
    primary or a compatible base): one range scan of ``ix_target_bases_lookup``."""
    latest = latest_release_version(session)
    if latest is None:
        return []
    rows = session.scalars(
        select(TargetRow)
        .join(TargetBaseRow, TargetBaseRow.target_id == TargetRow.id)
        .where(
            TargetBaseRow.release_version == latest,
            TargetBaseRow.base_fingerprint == base_fingerprint,
            TargetBaseRow.to_version == to_version,
        )
    ).all()
    ids = [row.id for row in rows]
    compatible = group_compatible(
        session.execute(compatible_bases_query().where(TargetBaseRow.target_id.in_(ids)))
    )
    return [
        replace(bundle_of(row, compatible.get(row.id, ())), privacy=_privacy_of(row))
        for row in rows
    ]


def _privacy_of(row: TargetRow) -> PrivacySpend | None:
    """The stored signed privacy block (validated at publish time)."""
    return PrivacySpend.from_json(row.privacy) if row.privacy is not None else None


def compatible_bases_query() -> Select[int, str]:
    """``(target_id, base)`` of every compatible (not primary) base; add a ``where``."""
    return (
        select(TargetBaseRow.target_id, TargetBaseRow.base_fingerprint)
        .join(TargetRow, TargetRow.id == TargetBaseRow.target_id)
        .where(TargetBaseRow.base_fingerprint != TargetRow.base_fingerprint)
    )


def group_compatible(rows: Iterable[Any]) -> dict[int, tuple[str, ...]]:
    """``compatible_bases_query`` rows as target id -> sorted compatible bases (sorted
    here, not in SQL: the signed metadata's order is Python's, not a collation's)."""
    grouped: dict[int, list[str]] = defaultdict(list)
    for target_id, base in rows:
        grouped[int(target_id)].append(str(base))
    return {target_id: tuple(sorted(bases)) for target_id, bases in grouped.items()}


def bundle_of(row: TargetRow, compatible_bases: tuple[str, ...] = ()) -> BundleTarget:
    """A target row (ORM object or Core row) and its compatible bases as a domain value."""
    return BundleTarget(
        path=row.path,
        length=row.length,
        hashes=dict(row.hashes),
        kind=row.kind,
        from_version=row.from_version,
        to_version=row.to_version,
        base_fingerprint=row.base_fingerprint,
        release_counter=row.release_counter,
        uncompressed_bytes=row.uncompressed_bytes,
        compatible_bases=compatible_bases,
    )


def blob_for_url(session: Session, url_path: str) -> tuple[str, int] | None:
    """(sha256, length) of the blob served at ``/tuf/targets/<url_path>``, if any."""
    row = session.execute(
        select(TargetRow.blob_sha256, TargetRow.length)
        .where(TargetRow.url_path == url_path)
        .limit(1)
    ).first()
    return (row[0], row[1]) if row else None
