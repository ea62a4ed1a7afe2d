"""⑤ download: resumable, bounded by the signed length (``Range`` + ``If-Range``).

Invariants:

* never more than ``length`` bytes (the length in verified TUF metadata) are written,
  whatever the server sends (THREATS A5);
* a partial file is resumed only with a strong ETag as ``If-Range`` validator; a ``200``
  answer (validator changed, or no range support), a ``206`` whose ``Content-Range``
  does not start at our offset or names another length, or a ``416`` discards the
  partial file and starts again (D16, D17);
* every chunk is written as the network delivers it (no re-chunking buffer), so an
  interrupted transfer re-fetches nothing it already received (D15: at most the one
  read in flight is lost);
* the result is *not* trusted: ``client.update.verify`` checks length and hashes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from client.update.errors import UpdateRetryError, UpdateTransientError
from client.update.state import StepHook
from client.update.transport import Retrier, RetryableError, check_response
from delta_packager.files import atomic_write_json, fsync_file, read_json

__all__ = ["DownloadStats", "download"]

logger = logging.getLogger(__name__)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass
class DownloadStats:
    """What a download cost (mutable: filled in as it goes)."""

    received_bytes: int = 0
    requests: int = 0
    resumed: int = 0
    restarts: int = 0
    reasons: list[str] = field(default_factory=list)


def _discard(part: Path, meta: Path, stats: DownloadStats, reason: str) -> None:
    for path in (part, meta):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    stats.restarts += 1
    stats.reasons.append(reason)
    logger.info("discarding partial download %s: %s", part.name, reason)


def _declared_total(response: httpx.Response) -> int | None:
    """Total size the server claims: Content-Range total on 206, Content-Length on 200."""
    if response.status_code == 206:
        match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
        return int(match[3]) if match and match[3] != "*" else None
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def download(
    http: httpx.Client,
    retrier: Retrier,
    *,
    url: str,
    dest: Path,
    length: int,
    hook: StepHook | None = None,
) -> DownloadStats:
    """Download ``url`` into ``dest`` (resuming ``dest.part``), at most ``length`` bytes.

    Args:
        http: The HTTP client (carries base URL and auth).
        retrier: The run's retrier (backoff, ``Retry-After``, budget).
        url: Target URL.
        dest: Where the complete file goes; ``dest.part`` and ``dest.part.json`` hold
            the partial file and its validator between attempts and across restarts.
        length: The signed length.
        hook: Called with ``"download"`` after every chunk is written (crash tests).

    Returns:
        Transfer statistics; ``dest`` then holds exactly ``length`` bytes.

    Raises:
        UpdateTransientError: retries exhausted, or the server refuses the target.
        UpdateRejectedError: the server declares a size below the signed length.
    """
    part = dest.with_name(dest.name + ".part")
    meta_path = dest.with_name(dest.name + ".part.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stats = DownloadStats()
    if dest.exists() and dest.stat().st_size == length:
        return stats  # finished before a restart; the verifier checks its hash
    meta = read_json(meta_path) if meta_path.exists() else None
    if part.exists() and (not meta or meta.get("url") != url or meta.get("length") != length):
        _discard(part, meta_path, stats, "partial file without matching validator")

    def attempt() -> None:
        offset = part.stat().st_size if part.exists() else 0
        if offset > length:
            _discard(part, meta_path, stats, f"partial file is {offset} bytes > {length}")
            offset = 0
        if offset == length:
            return
        stored = read_json(meta_path) if meta_path.exists() else None
        etag = stored.get("etag") if stored else None
        headers = {}
        if offset and etag:
            headers = {"Range": f"bytes={offset}-{length - 1}", "If-Range": etag}
        elif offset:
            _discard(part, meta_path, stats, "no strong ETag to resume with")
            offset = 0
        stats.requests += 1
        with http.stream("GET", url, headers=headers) as response:
            check_response(response)
            _receive(response, offset=offset, etag=etag)

    def _receive(response: httpx.Response, *, offset: int, etag: str | None) -> None:
        status = response.status_code
        if status == 416:
            _discard(part, meta_path, stats, "server answered 416")
            raise RetryableError("416 Range Not Satisfiable; restarting from byte 0")
        if status not in (200, 206):
            raise UpdateTransientError(
                f"GET {url} answered {status}; expected 200 or 206: the server does not "
                "serve this signed target, report it to the operator"
            )
        new_etag = response.headers.get("etag")
        declared = _declared_total(response)
        if declared is not None and declared < length:
            _discard(part, meta_path, stats, f"server declares {declared} bytes")
            raise UpdateRetryError(
                f"the server says {url} is {declared} bytes, the signed length is {length}: "
                "the mirror serves another file than the signed one; will retry later",
                reason="payload_mismatch",
            )
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            ok = (
                match is not None
                and int(match[1]) == offset
                and match[3] in (str(length), "*")
                and int(match[1]) <= int(match[2]) < length
                and (new_etag is None or new_etag == etag)
            )
            if not ok:
                _discard(part, meta_path, stats, "bad Content-Range or ETag on 206")
                raise RetryableError(
                    f"206 with Content-Range {response.headers.get('content-range')!r} "
                    f"for a request from byte {offset} of {length}"
                )
            stats.resumed += 1
        else:
            if offset:
                _discard(part, meta_path, stats, "server sent the whole file (200)")
            offset = 0
            strong = new_etag if new_etag and not new_etag.startswith("W/") else None
            atomic_write_json(meta_path, {"url": url, "length": length, "etag": strong})
        _write(response, offset)

    def _write(response: httpx.Response, offset: int) -> None:
        position = offset
        mode = "r+b" if offset else "wb"
        with open(part, mode) as f:
            f.seek(offset)
            f.truncate()
            try:
                for chunk in response.iter_bytes():  # as received: a cut loses nothing held
                    stats.received_bytes += len(chunk)
                    take = chunk[: length - position]
                    f.write(take)
                    f.flush()
                    position += len(take)
                    if hook is not None:
                        hook("download")
                    if position >= length:
                        break  # A5: never read past the signed length
            finally:
                f.flush()
                fsync_file(f.fileno())
        if position < length:
            raise RetryableError(f"transfer ended at byte {position} of {length}")

    retrier.run(attempt, what=f"download {url}")
    os.replace(part, dest)
    with contextlib.suppress(FileNotFoundError):
        meta_path.unlink()
    return stats
