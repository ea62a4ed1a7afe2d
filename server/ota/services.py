"""The collaborators one app instance uses, built once from settings."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from server.ota.blobs import FileBlobStore
from server.ota.database import Database, make_engine, require_migrated
from server.ota.downloads import DownloadSlots
from server.ota.errors import OtaConfigError
from server.ota.inventory import SeenTracker
from server.ota.observability import Metrics
from server.ota.settings import OtaSettings
from server.ota.throttle import FailureThrottle
from server.ota.tuf_repo import OnlineKeys, TufRepository, load_signer
from server.ota.updates import UpdateChecker


@dataclass(frozen=True)
class Services:
    """Everything a route needs, injected through ``app.state.services``."""

    settings: OtaSettings
    db: Database
    repo: TufRepository
    blobs: FileBlobStore
    slots: DownloadSlots
    metrics: Metrics
    checker: UpdateChecker
    enrollment_failures: FailureThrottle
    token_failures: FailureThrottle
    seen: SeenTracker


def build_services(settings: OtaSettings) -> Services:
    """Connect to the database, check its revision, load keys and bootstrap TUF.

    Raises:
        DatabaseNotMigratedError: the schema is not at head (names the command to run).
        OtaConfigError: unusable keys or trusted root.
    """
    db = Database(
        make_engine(settings.database_url, pool_size=settings.db_pool_size),
        hot_pool_size=settings.check_threads,
    )
    require_migrated(db.engine, _redacted(settings.database_url))
    keys = OnlineKeys(
        snapshot=load_signer(settings.snapshot_key), timestamp=load_signer(settings.timestamp_key)
    )
    repo = TufRepository(
        db,
        keys,
        snapshot_expiry_s=settings.snapshot_expiry_s,
        timestamp_expiry_s=settings.timestamp_expiry_s,
    )
    try:
        root_bytes = settings.trusted_root.read_bytes()
    except OSError as exc:
        raise OtaConfigError(f"cannot read trusted root {settings.trusted_root}: {exc}") from exc
    repo.bootstrap(root_bytes)
    seen = SeenTracker(db)
    return Services(
        settings=settings,
        db=db,
        repo=repo,
        blobs=FileBlobStore(settings.storage_dir),
        slots=DownloadSlots(
            settings.max_concurrent_downloads, retry_after_s=settings.retry_after_s
        ),
        metrics=Metrics(),
        checker=UpdateChecker(db, threads=settings.check_threads, seen=seen),
        enrollment_failures=_failure_throttle(settings),
        token_failures=_failure_throttle(settings),
        seen=seen,
    )


def _failure_throttle(settings: OtaSettings) -> FailureThrottle:
    return FailureThrottle(
        max_failures=settings.max_auth_failures, window_s=settings.auth_failure_window_s
    )


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


def services_of(request: Request) -> Services:
    """The app's services (a FastAPI dependency helper)."""
    services: Services = request.app.state.services
    return services
