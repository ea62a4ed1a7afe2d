"""Content-addressed blob storage for bundles (immutable once written).

A blob's name is the SHA-256 of its bytes, so a URL that names a blob can never serve
other bytes. Writes are crash-safe (``protocol.files.atomic_file``): bytes that do not
hash to the name never become the blob.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from protocol import atomic_file
from server.ota.errors import PayloadTooLargeError, RequestError

_CHUNK_BYTES = 256 * 1024


class BlobStore(Protocol):
    """Where bundle bytes live (a directory here; shared storage in a larger deployment)."""

    def exists(self, sha256: str) -> bool:
        """Whether a blob with this digest is stored."""

    def open(self, sha256: str) -> BinaryIO:
        """Open a stored blob for reading."""

    def path_of(self, sha256: str) -> Path:
        """The file holding a blob (for streaming responses)."""


class FileBlobStore:
    """Blobs under ``root/sha256/<first two hex>/<digest>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)

    def path_of(self, sha256: str) -> Path:
        """The file holding a blob."""
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """Whether a blob with this digest is stored."""
        return self.path_of(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        """Open a stored blob for reading."""
        return self.path_of(sha256).open("rb")

    async def write_stream(
        self, chunks: AsyncIterator[bytes], *, expected_sha256: str, max_bytes: int
    ) -> int:
        """Store the streamed bytes if their digest is ``expected_sha256``.

        Returns:
            The number of bytes stored.

        Raises:
            PayloadTooLargeError: if more than ``max_bytes`` arrive (reading stops there).
            RequestError: if the digest of what arrived is not ``expected_sha256``.
        """
        digest = hashlib.sha256()
        length = 0
        with atomic_file(self.path_of(expected_sha256)) as tmp, tmp.open("wb") as out:
            async for chunk in chunks:
                length += len(chunk)
                if length > max_bytes:
                    raise PayloadTooLargeError(
                        f"blob is larger than the {max_bytes}-byte limit; "
                        "raise FEDOTA_OTA_MAX_BLOB_BYTES if this is intended"
                    )
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            if digest.hexdigest() != expected_sha256:
                raise RequestError(
                    f"uploaded bytes hash to sha256 {digest.hexdigest()}, "
                    f"not {expected_sha256} as the URL says; upload the file again"
                )
        return length

    def iter_range(self, sha256: str, start: int, end_inclusive: int) -> Iterator[bytes]:
        """Yield the bytes ``start..end_inclusive`` of a blob in bounded chunks."""
        remaining = end_inclusive - start + 1
        with self.open(sha256) as handle:
            handle.seek(start)
            while remaining > 0:
                chunk = handle.read(min(_CHUNK_BYTES, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk


def hash_file(path: Path, algorithms: list[str]) -> dict[str, str]:
    """Hex digests of a file for each hashlib algorithm name in ``algorithms``.

    Raises:
        ValueError: for an algorithm hashlib does not provide.
    """
    hashers = {name: hashlib.new(name) for name in algorithms}
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}
