"""Routes for the release pipeline: upload bundles, publish releases, rotate root."""

from __future__ import annotations

import functools
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Request, status
from starlette.concurrency import run_in_threadpool

from server.ota.auth import Caller, require_role
from server.ota.releases import publish_release, record_blob
from server.ota.schemas import SHA256_PATTERN, BlobOut, ReleaseOut, RootOut, TargetOut
from server.ota.services import services_of

router = APIRouter(prefix="/v1", tags=["publishing"])
publisher = [Depends(require_role("publisher"))]
_OCTETS = {
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    "required": True,
}


@router.put(
    "/blobs/{sha256}",
    status_code=status.HTTP_201_CREATED,
    dependencies=publisher,
    openapi_extra={"requestBody": _OCTETS},
)
async def upload_blob(request: Request, sha256: str = Path(pattern=SHA256_PATTERN)) -> BlobOut:
    """Upload bundle bytes, stored under their SHA-256 (which must equal ``sha256``)."""
    services = services_of(request)
    length = await services.blobs.write_stream(
        request.stream(), expected_sha256=sha256, max_bytes=services.settings.max_blob_bytes
    )
    record_blob(services.db, sha256, length)
    return BlobOut(sha256=sha256, length=length)


@router.post("/releases", status_code=status.HTTP_201_CREATED)
async def create_release(
    request: Request,
    caller: Annotated[Caller, Depends(require_role("publisher"))],
    metadata: dict[str, Any] = Body(description="Signed TUF targets metadata (as signed)."),
) -> ReleaseOut:
    """Publish a release: signed targets metadata naming already uploaded bundles."""
    services = services_of(request)
    raw = await request.body()  # the exact bytes that were signed and will be served
    release = await run_in_threadpool(
        functools.partial(
            publish_release, actor=caller.actor, policy=services.settings.privacy_policy()
        ),
        services.db,
        services.repo,
        services.blobs,
        raw,
    )
    return ReleaseOut(
        version=release.version,
        snapshot_version=release.snapshot_version,
        targets=[TargetOut.of(t) for t in release.targets],
    )


@router.post("/tuf/root", status_code=status.HTTP_201_CREATED)
async def rotate_root(
    request: Request,
    caller: Annotated[Caller, Depends(require_role("admin"))],
    metadata: dict[str, Any] = Body(description="Root N+1, signed by old and new thresholds."),
) -> RootOut:
    """Install the next root version (key rotation)."""
    raw = await request.body()
    rotate = functools.partial(services_of(request).repo.rotate_root, actor=caller.actor)
    version = await run_in_threadpool(rotate, raw)
    return RootOut(version=version)
