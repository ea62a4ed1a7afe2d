"""TUF metadata and immutable, content-addressed targets under ``/tuf/``.

Metadata names follow the TUF spec for consistent snapshots: ``N.root.json``,
``N.targets.json``, ``N.snapshot.json`` and the unversioned ``timestamp.json`` (plus
unversioned latest ``root.json``/``targets.json``/``snapshot.json`` for convenience).
Targets live at ``/tuf/targets/<dir>/<hash>.<name>``, never change, and may be cached
forever.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Header, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.ota.downloads import etag_of, parse_range, stream_blob
from server.ota.errors import NotFoundError
from server.ota.releases import blob_for_url
from server.ota.services import services_of

router = APIRouter(prefix="/tuf", tags=["tuf"])
_METADATA_RE = re.compile(r"^(?:(\d{1,9})\.)?(root|targets|snapshot|timestamp)\.json$")
_JSON: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}}, "description": "TUF metadata"}
}
_BYTES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "The whole bundle"},
    206: {"content": {"application/octet-stream": {}}, "description": "A byte range"},
}


@router.get("/targets/{target_path:path}", response_class=Response, responses=_BYTES)
async def get_target(
    request: Request,
    target_path: str = PathParam(max_length=700),
    range_header: str | None = Header(default=None, alias="range", max_length=200),
    if_range: str | None = Header(default=None, max_length=200),
) -> Response:
    """Download a bundle (``Range``/``If-Range`` supported; strong ETag = SHA-256)."""
    services = services_of(request)
    found = await run_in_threadpool(_lookup, request, target_path)
    if found is None:
        raise NotFoundError(f"no target at /tuf/targets/{target_path}")
    sha256, length = found
    etag = etag_of(sha256)
    byte_range = parse_range(range_header, if_range, etag=etag, length=length)
    start, end = (byte_range.start, byte_range.end) if byte_range else (0, length - 1)
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Length": str(end - start + 1),
        "Cache-Control": "public, max-age=31536000, immutable",
    }
    if byte_range:
        headers["Content-Range"] = byte_range.content_range
    status = 206 if byte_range else 200
    services.metrics.downloads.labels(str(status)).inc()
    services.slots.acquire()
    return StreamingResponse(
        stream_blob(
            services.blobs,
            sha256,
            start,
            end,
            services.slots,
            on_bytes=services.metrics.download_bytes.inc,
        ),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )


def _lookup(request: Request, target_path: str) -> tuple[str, int] | None:
    with services_of(request).db.read() as session:
        return blob_for_url(session, target_path)


@router.get("/{filename}", response_class=Response, responses=_JSON)
async def get_metadata(request: Request, filename: str = PathParam(max_length=64)) -> Response:
    """Serve one TUF metadata file; the timestamp is re-signed first if it is getting old."""
    match = _METADATA_RE.match(filename)
    if match is None:
        raise NotFoundError(f"no metadata file {filename!r}")
    version, role = int(match.group(1)) if match.group(1) else None, match.group(2)
    if role == "timestamp" and version is not None:
        raise NotFoundError("timestamp.json is never versioned")
    repo = services_of(request).repo
    if role == "timestamp" and await run_in_threadpool(repo.needs_refresh):
        await run_in_threadpool(repo.refresh)
    payload = await run_in_threadpool(repo.get, role, version)
    cache = "no-store" if version is None else "public, max-age=31536000, immutable"
    return Response(payload, media_type="application/json", headers={"Cache-Control": cache})
