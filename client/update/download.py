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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from client.update.errors import UpdateRetryError, UpdateTransientError
from client.update.state import StepHook
from client.update.transport import Retrier, RetryableError, check_response
from protocol import atomic_write_json, fsync_file, read_json, replace_file

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


def _declared_total(response: httpx.Response) -> int | None:
    """Total size the server claims: Content-Range total on 206, Content-Length on 200."""
    if response.status_code == 206:
        match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
        return int(match[3]) if match and match[3] != "*" else None
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


@dataclass
class _Download:
    """One download of ``url`` into ``dest``: what its attempts share.

    The partial file ``dest.part`` and its validator ``dest.part.json`` (URL, signed
    length, strong ETag) persist between attempts and across restarts; ``stats`` adds
    up every attempt.
    """

    http: httpx.Client
    url: str
    dest: Path
    length: int
    hook: StepHook | None
    stats: DownloadStats = field(default_factory=DownloadStats)
    part: Path = field(init=False)
    meta_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.part = self.dest.with_name(self.dest.name + ".part")
        self.meta_path = self.dest.with_name(self.dest.name + ".part.json")

    def _validator(self) -> dict[str, Any] | None:
        return read_json(self.meta_path) if self.meta_path.exists() else None

    def discard(self, reason: str) -> None:
        """Delete the partial file and its validator; count a restart for ``reason``."""
        for path in (self.part, self.meta_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.stats.restarts += 1
        self.stats.reasons.append(reason)
        logger.info("discarding partial download %s: %s", self.part.name, reason)

    def drop_foreign_partial(self) -> None:
        """Discard a partial file whose validator names another URL or length, or none."""
        meta = self._validator()
        if self.part.exists() and (
            not meta or meta.get("url") != self.url or meta.get("length") != self.length
        ):
            self.discard("partial file without matching validator")

    def attempt(self) -> None:
        """One request: resume the partial file if it can be validated, else start over."""
        offset = self._partial_size()
        if offset == self.length:
            return
        stored = self._validator()
        etag = stored.get("etag") if stored else None
        headers = {}
        if offset and etag:
            headers = {"Range": f"bytes={offset}-{self.length - 1}", "If-Range": etag}
        elif offset:
            self.discard("no strong ETag to resume with")
            offset = 0
        self.stats.requests += 1
        with self.http.stream("GET", self.url, headers=headers) as response:
            check_response(response)
            self._receive(response, offset=offset, etag=etag)

    def _partial_size(self) -> int:
        """Bytes already held; a partial file longer than the signed length is discarded."""
        offset = self.part.stat().st_size if self.part.exists() else 0
        if offset > self.length:
            self.discard(f"partial file is {offset} bytes > {self.length}")
            return 0
        return offset

    def _receive(self, response: httpx.Response, *, offset: int, etag: str | None) -> None:
        self._check_answer(response)
        if response.status_code == 206:
            self._accept_range(response, offset=offset, etag=etag)
        else:
            offset = self._restart_whole(response, offset=offset)
        self._write(response, offset)

    def _check_answer(self, response: httpx.Response) -> None:
        """Refuse a 416, a status other than 200/206, and a declared size below ours."""
        status = response.status_code
        if status == 416:
            self.discard("server answered 416")
            raise RetryableError("416 Range Not Satisfiable; restarting from byte 0")
        if status not in (200, 206):
            raise UpdateTransientError(
                f"GET {self.url} answered {status}; expected 200 or 206: the server does not "
                "serve this signed target, report it to the operator"
            )
        declared = _declared_total(response)
        if declared is not None and declared < self.length:
            self.discard(f"server declares {declared} bytes")
            raise UpdateRetryError(
                f"the server says {self.url} is {declared} bytes, the signed length is "
                f"{self.length}: the mirror serves another file than the signed one; "
                "will retry later",
                reason="payload_mismatch",
            )

    def _accept_range(self, response: httpx.Response, *, offset: int, etag: str | None) -> None:
        """A 206 continues the partial file only from our offset, same length and ETag."""
        new_etag = response.headers.get("etag")
        match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
        ok = (
            match is not None
            and int(match[1]) == offset
            and match[3] in (str(self.length), "*")
            and int(match[1]) <= int(match[2]) < self.length
            and (new_etag is None or new_etag == etag)
        )
        if not ok:
            self.discard("bad Content-Range or ETag on 206")
            raise RetryableError(
                f"206 with Content-Range {response.headers.get('content-range')!r} "
                f"for a request from byte {offset} of {self.length}"
            )
        self.stats.resumed += 1

    def _restart_whole(self, response: httpx.Response, *, offset: int) -> int:
        """A 200 replaces any partial file; store its strong ETag. Returns the offset, 0."""
        if offset:
            self.discard("server sent the whole file (200)")
        new_etag = response.headers.get("etag")
        strong = new_etag if new_etag and not new_etag.startswith("W/") else None
        atomic_write_json(self.meta_path, {"url": self.url, "length": self.length, "etag": strong})
        return 0

    def _write(self, response: httpx.Response, offset: int) -> None:
        """Append the body at ``offset`` as it arrives, never past the signed length."""
        position = offset
        mode = "r+b" if offset else "wb"
        with open(self.part, mode) as f:
            f.seek(offset)
            f.truncate()
            try:
                for chunk in response.iter_bytes():  # as received: a cut loses nothing held
                    self.stats.received_bytes += len(chunk)
                    take = chunk[: self.length - position]
                    f.write(take)
                    f.flush()
                    position += len(take)
                    if self.hook is not None:
                        self.hook("download")
                    if position >= self.length:
                        break  # A5: never read past the signed length
            finally:
                f.flush()
                fsync_file(f.fileno())
        if position < self.length:
            raise RetryableError(f"transfer ended at byte {position} of {self.length}")

    def finish(self) -> None:
        """Move the complete partial file to ``dest`` and drop its validator."""
        replace_file(self.part, self.dest)
        with contextlib.suppress(FileNotFoundError):
            self.meta_path.unlink()


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
    job = _Download(http, url=url, dest=dest, length=length, hook=hook)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and dest.stat().st_size == length:
        return job.stats  # finished before a restart; the verifier checks its hash
    job.drop_foreign_partial()
    retrier.run(job.attempt, what=f"download {url}")
    job.finish()
    return job.stats
