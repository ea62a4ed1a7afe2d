"""③ package — a bounded reader for the one zstd frame of a bundle (THREATS A7).

A frame states its content size in its header, and nothing stops that header from
lying, or from stating a gigabyte in a 32 KB frame of zeros. ``open_frame`` checks the
frame before any of it is decoded; the reader then hands out exactly the bytes asked
for, so the caller reads the safetensors header and manifest first and decides whether
the rest is worth decoding. Memory held is what the caller has read, plus the decoder's
window (at most ``max_window_bytes`` and at most the declared content size).

Checks made before decoding (RFC 8878 §3.1.1): the zstd magic number, a declared
content size within the limit (and equal to the signed size when given), and a block
walk that ends exactly at the end of the input, so a truncated frame or bytes after it
are refused without decoding anything. ``FrameReader.finish`` confirms the frame ends at
the declared size and lets libzstd verify the content checksum.
"""

from __future__ import annotations

import zstandard

from delta_packager.errors import BundleFormatError, BundleIntegrityError

__all__ = ["FrameReader", "frame_length", "open_frame"]

_MAGIC = zstandard.MAGIC_NUMBER.to_bytes(4, "little")
_BLOCK_HEADER_BYTES = 3
_RAW, _RLE, _COMPRESSED = 0, 1, 2
_CHECKSUM_BYTES = 4
_CHUNK = 1 << 20


def _check_magic(data: bytes) -> None:
    if data[:4] != _MAGIC:
        raise BundleFormatError("not a zstd frame (bad magic number); expected a fedota bundle")


def frame_length(data: bytes) -> int:
    """The length of the zstd frame at the start of ``data``, found from its block headers.

    Raises:
        BundleFormatError: not a zstd frame, or a block of the reserved type.
        BundleIntegrityError: the frame runs past the end of ``data`` (truncated).
    """
    _check_magic(data)
    try:
        pos = zstandard.frame_header_size(data)
        has_checksum = zstandard.get_frame_parameters(data).has_checksum
    except zstandard.ZstdError as e:
        raise BundleFormatError(f"not a zstd frame ({e}); expected a fedota bundle") from e
    last = False
    while not last:
        if pos + _BLOCK_HEADER_BYTES > len(data):
            break
        header = int.from_bytes(data[pos : pos + _BLOCK_HEADER_BYTES], "little")
        last, kind, size = bool(header & 1), (header >> 1) & 3, header >> 3
        if kind not in (_RAW, _RLE, _COMPRESSED):
            raise BundleFormatError(f"zstd block at byte {pos} has the reserved type; corrupt")
        pos += _BLOCK_HEADER_BYTES + (1 if kind == _RLE else size)
    end = pos + (_CHECKSUM_BYTES if has_checksum else 0)
    if not last or end > len(data):
        raise BundleIntegrityError(
            f"zstd frame is truncated ({len(data)} bytes, its blocks need more); "
            "the download or copy is incomplete, discard it"
        )
    return end


class FrameReader:
    """Decodes a checked frame on demand; made by ``open_frame`` only."""

    def __init__(self, data: bytes, declared: int, max_window_bytes: int) -> None:
        self.declared = declared
        self.position = 0
        dctx = zstandard.ZstdDecompressor(max_window_size=max_window_bytes)
        self._reader = dctx.stream_reader(data, read_across_frames=False)

    def _fail(self, e: zstandard.ZstdError) -> BundleIntegrityError:
        return BundleIntegrityError(
            f"zstd decompression failed ({e}): the bundle is corrupt, truncated, expands "
            "beyond its declared size, or was altered; discard it"
        )

    def read_into(self, out: bytearray | memoryview, what: str) -> None:
        """Fill ``out`` exactly with the next decoded bytes.

        Raises:
            BundleFormatError: ``out`` reaches past the declared content size.
            BundleIntegrityError: the frame ends first or fails to decode.
        """
        view = memoryview(out)
        if self.position + len(view) > self.declared:
            raise BundleFormatError(
                f"{what} needs {len(view)} bytes at offset {self.position}; the frame "
                f"declares only {self.declared}"
            )
        filled = 0
        try:
            while filled < len(view):
                n = self._reader.readinto(view[filled : filled + _CHUNK])
                if not n:
                    break
                filled += n
        except zstandard.ZstdError as e:
            raise self._fail(e) from e
        self.position += filled
        if filled != len(view):
            raise BundleIntegrityError(
                f"bundle decompresses to {self.position} bytes, its frame declares "
                f"{self.declared}: it is corrupt, discard it"
            )

    def read(self, n: int, what: str) -> bytearray:
        """The next ``n`` decoded bytes, allocated as they are decoded (``n`` may lie).

        Raises:
            BundleFormatError: ``n`` reaches past the declared content size.
            BundleIntegrityError: the frame ends first or fails to decode.
        """
        if self.position + n > self.declared:
            raise BundleFormatError(
                f"{what} needs {n} bytes at offset {self.position}; the frame declares "
                f"only {self.declared}"
            )
        out = bytearray()
        while len(out) < n:
            chunk = bytearray(min(n - len(out), _CHUNK))
            self.read_into(chunk, what)
            out += chunk
        return out

    def finish(self) -> None:
        """Confirm the frame ends at its declared size, with a valid checksum.

        Raises:
            BundleIntegrityError: more output follows, or the checksum fails.
        """
        try:
            extra = self._reader.read(1)
        except zstandard.ZstdError as e:
            raise self._fail(e) from e
        if extra or self.position != self.declared:
            raise BundleIntegrityError(
                f"bundle decompresses to more than the {self.declared} bytes its frame "
                "declares: it is corrupt or a decompression bomb, discard it"
            )
        self._reader.close()


def open_frame(
    data: bytes, *, limit: int, expected: int | None, max_window_bytes: int
) -> FrameReader:
    """Check a bundle's zstd frame before decoding any of it, and return its reader.

    Args:
        data: The compressed bundle: exactly one zstd frame.
        limit: Refuse a frame that declares more uncompressed bytes than this.
        expected: The uncompressed size signed metadata declares, if known.
        max_window_bytes: The largest decoder window to allocate.

    Raises:
        BundleFormatError: not one zstd frame with a declared content size.
        BundleIntegrityError: the declared size is over the limit or differs from the
            signed one, or the frame is truncated.
    """
    _check_magic(data)
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as e:
        raise BundleFormatError(f"not a zstd frame ({e}); expected a fedota bundle") from e
    if declared in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise BundleFormatError("zstd frame does not declare its content size; expected it to")
    if expected is not None and declared != expected:
        raise BundleIntegrityError(
            f"zstd frame declares {declared} uncompressed bytes, the signed metadata "
            f"declares {expected}: payload and metadata are from different releases"
        )
    if declared > limit:
        raise BundleIntegrityError(
            f"bundle declares {declared} uncompressed bytes, more than the limit of {limit}"
        )
    end = frame_length(data)
    if end != len(data):
        raise BundleFormatError(
            f"{len(data) - end} bytes follow the zstd frame; expected none (one frame only)"
        )
    return FrameReader(data, declared, max_window_bytes)
