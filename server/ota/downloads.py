"""⑤ download, server side: ranged, resumable, bounded delivery of immutable blobs.

RFC 9110 §14: a single ``bytes=`` range is honoured (``206`` + ``Content-Range``);
``If-Range`` with anything but the current strong ETag means "send it all"; a range
that starts past the end is ``416`` with ``Content-Range: bytes */<length>``; several
ranges or a syntactically bad header are ignored (the whole file is sent), which the
RFC allows. The ETag is the quoted SHA-256 of the content, so it is strong and equal on
every worker. Concurrent downloads per process are capped; past the cap the answer is
``503`` with ``Retry-After``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from server.ota.blobs import FileBlobStore
from server.ota.errors import OverloadedError, RangeNotSatisfiableError

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class ByteRange:
    """Inclusive byte range within a resource of ``length`` bytes."""

    start: int
    end: int
    length: int

    @property
    def size(self) -> int:
        """Number of bytes in the range."""
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        """The ``Content-Range`` header value."""
        return f"bytes {self.start}-{self.end}/{self.length}"


def etag_of(sha256: str) -> str:
    """The strong ETag of a blob."""
    return f'"{sha256}"'


def parse_range(
    range_header: str | None, if_range: str | None, *, etag: str, length: int
) -> ByteRange | None:
    """The range to send, or None for the whole resource.

    Raises:
        RangeNotSatisfiableError: a single, well-formed range that selects no byte.
    """
    if range_header is None:
        return None
    if if_range is not None and if_range.strip() != etag:
        return None  # validator differs (or is a date): the client's partial copy is stale
    match = _RANGE_RE.match(range_header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or length == 0:
            raise RangeNotSatisfiableError("empty suffix range", length=length)
        return ByteRange(start=max(0, length - suffix), end=length - 1, length=length)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid; ignored per RFC 9110 §14.1.1
    if start >= length:
        raise RangeNotSatisfiableError(
            f"range starts at byte {start} but the file has {length} bytes", length=length
        )
    end = int(last) if last else length - 1
    return ByteRange(start=start, end=min(end, length - 1), length=length)


class DownloadSlots:
    """A per-process cap on concurrent downloads (event-loop confined, no locking)."""

    def __init__(self, capacity: int, *, retry_after_s: int) -> None:
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.in_use = 0

    def acquire(self) -> None:
        """Take a slot.

        Raises:
            OverloadedError: when every slot is taken.
        """
        if self.in_use >= self.capacity:
            raise OverloadedError(
                f"{self.in_use} downloads in progress; retry after {self.retry_after_s}s",
                retry_after_s=self.retry_after_s,
            )
        self.in_use += 1

    def release(self) -> None:
        """Give a slot back."""
        self.in_use -= 1


async def stream_blob(
    blobs: FileBlobStore,
    sha256: str,
    start: int,
    end: int,
    slots: DownloadSlots,
    on_bytes: object = None,
) -> AsyncIterator[bytes]:
    """Yield bytes ``start..end`` of a blob; the download slot is released however the
    stream ends (finished, client gone, cancelled)."""
    try:
        iterator = blobs.iter_range(sha256, start, end)
        while True:
            chunk = await anyio.to_thread.run_sync(next, iterator, None)
            if chunk is None:
                return
            if callable(on_bytes):
                on_bytes(len(chunk))
            yield chunk
    finally:
        slots.release()
