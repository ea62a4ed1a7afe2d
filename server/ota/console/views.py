"""What the console pages show, read through the service layer and keyset-paged.

Every list is one page of at most ``PAGE`` rows found on an index (``WHERE key < cursor
ORDER BY key LIMIT n + 1``, :mod:`server.ota.paging`), never an ``OFFSET`` or a count of
the whole fleet, so pages cost the same at 100,000 devices as at ten. Release
provenance is read from each bundle's signed manifest in blob storage (parsed once per
blob: blobs are content-addressed and never rewritten).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from delta_packager import BundleFormatError, BundleIntegrityError, parse_bundle
from server.ota import inventory, rollouts
from server.ota.blobs import FileBlobStore
from server.ota.database import Database
from server.ota.domain import RolloutView
from server.ota.fleet_stats import tier_of
from server.ota.inventory import DeviceFilter, DeviceSummary, HistoryEntry
from server.ota.models import DeviceVersionRow, ReleaseRow, RolloutRow, TargetRow, as_utc
from server.ota.paging import Page, decode_cursor, page_of

logger = logging.getLogger(__name__)
PAGE = 25


@dataclass(frozen=True)
class DeviceDetail:
    """One device (its inventory row), what it reported per version, and a page of
    its history."""

    device: DeviceSummary
    tier: str
    versions: tuple[tuple[int, str, dt.datetime], ...]
    events: Page[HistoryEntry]


def device_page(
    db: Database, where: DeviceFilter, cursor: str | None, *, stale_after_s: float
) -> Page[DeviceSummary]:
    """One page of the inventory (the service the API's ``GET /v1/devices`` calls)."""
    return inventory.list_devices(db, where, stale_after_s=stale_after_s, cursor=cursor, limit=PAGE)


def device_detail(
    db: Database, device_id: str, cursor: str | None, *, stale_after_s: float
) -> DeviceDetail:
    """A device's page: its inventory row, versions, and history newest first.

    Raises:
        NotFoundError: no such device.
    """
    device = inventory.get_device(db, device_id, stale_after_s=stale_after_s)
    events = inventory.device_history(db, device_id, cursor=cursor, limit=PAGE)
    with db.read() as session:
        versions = session.execute(
            select(DeviceVersionRow.version, DeviceVersionRow.status, DeviceVersionRow.updated_at)
            .where(DeviceVersionRow.device_id == device_id)
            .order_by(DeviceVersionRow.version.desc())
        ).all()
    return DeviceDetail(
        device=device,
        tier=tier_of(device.memory_budget_bytes),
        versions=tuple((v, status, as_utc(at)) for v, status, at in versions),
        events=events,
    )


@dataclass(frozen=True)
class BundleLine:
    """One bundle of a release, with what its signed manifest says."""

    path: str
    kind: str
    from_version: int | None
    to_version: int
    base_fingerprint: str
    length: int
    uncompressed_bytes: int
    provenance: dict[str, Any] | None  # None: the stored bytes could not be parsed


@dataclass(frozen=True)
class ReleaseLine:
    """One published release and its bundles."""

    version: int
    published_at: dt.datetime
    bundles: tuple[BundleLine, ...]


def release_page(
    db: Database, blobs: FileBlobStore, cursor: str | None, *, size: int = 10
) -> Page[ReleaseLine]:
    """Releases, newest first, with every bundle's signed provenance."""
    after = decode_cursor("console-releases", cursor, (int,))
    query = select(ReleaseRow)
    if after is not None:
        query = query.where(ReleaseRow.version < after[0])
    with db.read() as session:
        releases = session.scalars(query.order_by(ReleaseRow.version.desc()).limit(size + 1)).all()
        versions = [r.version for r in releases]
        targets = session.scalars(
            select(TargetRow)
            .where(TargetRow.release_version.in_(versions))
            .order_by(TargetRow.to_version.desc(), TargetRow.path)
        ).all()
        lines = [
            ReleaseLine(
                version=r.version,
                published_at=as_utc(r.published_at),
                bundles=tuple(_bundle(blobs, t) for t in targets if t.release_version == r.version),
            )
            for r in releases
        ]
    return page_of(lines, size, "console-releases", lambda r: [r.version])


def _bundle(blobs: FileBlobStore, row: TargetRow) -> BundleLine:
    return BundleLine(
        path=row.path,
        kind=row.kind,
        from_version=row.from_version,
        to_version=row.to_version,
        base_fingerprint=row.base_fingerprint,
        length=row.length,
        uncompressed_bytes=row.uncompressed_bytes,
        provenance=signed_provenance(blobs.path_of(row.blob_sha256), row.uncompressed_bytes),
    )


_PROVENANCE: dict[str, dict[str, Any]] = {}  # by blob name; blobs are never rewritten
_PROVENANCE_MAX = 512


def signed_provenance(blob: Path, uncompressed_bytes: int) -> dict[str, Any] | None:
    """The ``provenance`` of the manifest signed inside a stored bundle (None: unreadable;
    the server stored only bytes that hash as signed, so this means a foreign format or
    a storage fault, logged and tried again next time)."""
    cached = _PROVENANCE.get(blob.name)
    if cached is not None:
        return cached
    try:
        bundle = parse_bundle(
            blob.read_bytes(),
            max_uncompressed_bytes=uncompressed_bytes,
            expected_uncompressed_bytes=uncompressed_bytes,
        )
    except (OSError, BundleFormatError, BundleIntegrityError) as exc:
        logger.warning("cannot read the manifest of %s: %s", blob.name, exc)
        return None
    if len(_PROVENANCE) >= _PROVENANCE_MAX:
        _PROVENANCE.pop(next(iter(_PROVENANCE)), None)
    _PROVENANCE[blob.name] = dataclasses.asdict(bundle.manifest.provenance)
    return _PROVENANCE[blob.name]


def rollout_page(db: Database, cursor: str | None, *, size: int = 10) -> Page[RolloutView]:
    """Rollouts, newest first, each with its per-stage figures."""
    after = decode_cursor("console-rollouts", cursor, (int,))
    query = select(RolloutRow.id)
    if after is not None:
        query = query.where(RolloutRow.id < after[0])
    with db.read() as session:
        ids = session.scalars(query.order_by(RolloutRow.id.desc()).limit(size + 1)).all()
    views = [rollouts.get_rollout(db, rollout_id) for rollout_id in ids]
    return page_of(views, size, "console-rollouts", lambda v: [v.id])
