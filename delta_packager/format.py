"""③ package — the bundle container: zstd(safetensors) with the manifest in its metadata.

This is the one module ``client`` and ``server`` both read. It imports the standard
library, numpy, safetensors and zstandard only — never torch (a test checks this).

Layout (format version 1, see docs/adr/0002-bundle-format.md)::

    bundle = one zstd frame (content size and checksum in the frame header)
    frame content = safetensors file:
        u64 little-endian header length N | N bytes JSON header | tensor data
        header "__metadata__" = {"fedota.manifest": <canonical manifest JSON>}
        tensor keys "<step index>/<adapter tensor name>/<part>", part in data|q|scale

Invariants the strict parser enforces before any tensor is exposed:

* the compressed input is at most ``max_uncompressed_bytes`` long and is exactly one
  zstd frame that declares its content size, within the limit (and equal to the
  caller's expected size when given); decoding is streamed: the safetensors header and
  manifest are decoded first, the tensor data only once the manifest declares the same
  size as the frame, and decoding stops at that size (THREATS A7, ``_frame``);
* the safetensors header is at most ``MAX_HEADER_BYTES`` and lies inside the data;
  tensor byte ranges are contiguous, non-overlapping and cover the data exactly;
  every dtype/shape matches its byte count (A6);
* the manifest is canonical, of a known format version, and names exactly the stored
  tensors with the dtypes and shapes its encodings require; scales and float data are
  finite (A6); ``uncompressed_bytes`` equals the real decompressed size.
"""

from __future__ import annotations

import io
import json
import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors.numpy
import zstandard

from delta_packager._frame import FrameReader, open_frame
from delta_packager.encode import EncodedTensor, expected_parts
from delta_packager.errors import BundleFormatError, BundleIntegrityError, PackagerInputError
from delta_packager.manifest import (
    Manifest,
    StepInfo,
    canonical_json,
    manifest_from_json,
    manifest_to_dict,
)

__all__ = [
    "DEFAULT_MAX_UNCOMPRESSED_BYTES",
    "MANIFEST_KEY",
    "MAX_HEADER_BYTES",
    "Bundle",
    "Step",
    "parse_bundle",
    "read_bundle",
    "read_declared",
    "serialize_bundle",
]

logger = logging.getLogger(__name__)

MANIFEST_KEY = "fedota.manifest"
MAX_HEADER_BYTES = 16 * 2**20
DEFAULT_MAX_UNCOMPRESSED_BYTES = 1 * 2**30
MAX_WINDOW_BYTES = 2**25  # bounds the decoder's memory whatever the frame asks for
_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I8": np.dtype("i1"),
}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Step:
    """One decoded-ready step: every adapter tensor in encoded form."""

    kind: str
    to_version: int
    tensors: Mapping[str, EncodedTensor]


@dataclass(frozen=True)
class Bundle:
    """A parsed bundle. Only ``parse_bundle`` (and ``read_bundle``) build these."""

    manifest: Manifest
    steps: tuple[Step, ...]
    compressed_bytes: int


# ------------------------------------------------------------------------ writing


def _payload(manifest: Manifest, steps: tuple[Step, ...]) -> bytes:
    tensors: dict[str, np.ndarray] = {}
    for i, step in enumerate(steps):
        for name, enc in step.tensors.items():
            for part, arr in enc.parts.items():
                tensors[f"{i}/{name}/{part}"] = np.ascontiguousarray(arr)
    meta = {MANIFEST_KEY: canonical_json(manifest_to_dict(manifest))}
    return bytes(safetensors.numpy.save(tensors, metadata=meta))


def serialize_bundle(manifest: Manifest, steps: tuple[Step, ...], *, zstd_level: int = 10) -> bytes:
    """Write a bundle. ``manifest.uncompressed_bytes`` and ``steps`` infos are filled in.

    The manifest's own size is part of the payload it describes, so the size is found
    by fixed-point iteration (two or three passes; safetensors pads headers to 8 bytes).

    Args:
        manifest: The manifest; its ``steps`` and ``uncompressed_bytes`` are replaced.
        steps: The encoded steps, in apply order.
        zstd_level: zstd compression level.

    Returns:
        The bundle bytes.

    Raises:
        PackagerInputError: the size did not converge (should not happen).
    """
    infos = tuple(
        StepInfo(s.kind, s.to_version, {n: e.encoding for n, e in sorted(s.tensors.items())})
        for s in steps
    )
    m = replace(manifest, steps=infos)
    size = 8
    for _ in range(8):
        m = replace(m, uncompressed_bytes=size)
        payload = _payload(m, steps)
        if len(payload) == size:
            cctx = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True)
            return cctx.compress(payload)
        size = len(payload)
    raise PackagerInputError("bundle size did not converge; please report this as a bug")


# ------------------------------------------------------------------------ reading


def _header(frame: FrameReader) -> tuple[dict[str, Any], int]:
    """Decode only the safetensors header: the rest stays compressed until it is trusted."""
    if frame.declared < 8:
        raise BundleFormatError(f"safetensors payload is {frame.declared} bytes; expected >= 8")
    (n,) = struct.unpack("<Q", frame.read(8, "safetensors header length"))
    if not 2 <= n <= min(MAX_HEADER_BYTES, frame.declared - 8):
        raise BundleFormatError(
            f"safetensors header length is {n} bytes; expected 2 to "
            f"{min(MAX_HEADER_BYTES, frame.declared - 8)} (limit and payload size)"
        )
    # A header is a JSON object: refuse anything else before decoding up to 16 MiB of it.
    first = frame.read(1, "safetensors header")
    if first != b"{":
        raise BundleFormatError(
            f"safetensors header starts with {bytes(first)!r}; expected a JSON object"
        )

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs):
            raise BundleFormatError("safetensors header repeats a key; expected unique keys")
        return d

    try:
        text = (first + frame.read(n - 1, "safetensors header")).decode("utf-8")
        header = json.loads(text, object_pairs_hook=no_dupes)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, BundleFormatError):
            raise
        raise BundleFormatError(f"safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise BundleFormatError("safetensors header is not a JSON object")
    return header, 8 + n


def _is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**53


def _tensor_table(
    header: dict[str, Any], data_len: int
) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
    table: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise BundleFormatError(f"tensor {key!r}: expected dtype, shape and data_offsets")
        dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offs = info["shape"], info["data_offsets"]
        if dtype is None:
            raise BundleFormatError(
                f"tensor {key!r} has dtype {info['dtype']!r}; expected one of {sorted(_DTYPES)}"
            )
        lists_ok = isinstance(shape, list) and isinstance(offs, list) and len(offs) == 2
        if not lists_ok or len(shape) > 8 or not all(_is_index(x) for x in shape + offs):
            raise BundleFormatError(
                f"tensor {key!r}: malformed shape {shape!r} or offsets {offs!r}"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if offs[1] - offs[0] != nbytes or offs[1] > data_len:
            raise BundleFormatError(
                f"tensor {key!r}: {info['dtype']}{shape} needs {nbytes} bytes, offsets "
                f"{offs} give {offs[1] - offs[0]} (data section is {data_len} bytes)"
            )
        table[key] = (dtype, tuple(shape), offs[0], offs[1])
    position = 0
    for _, _, begin, end in sorted(table.values(), key=lambda t: (t[2], t[3])):
        if begin != position:
            raise BundleFormatError(
                f"tensor byte ranges overlap or leave gaps at offset {position} "
                f"(next range starts at {begin}); expected contiguous ranges"
            )
        position = end
    if position != data_len:
        raise BundleFormatError(f"tensors cover {position} of {data_len} data bytes; expected all")
    return table


def _check_values(key: str, part: str, arr: np.ndarray) -> None:
    if arr.size == 0:
        return
    # min/max reductions only: NaN propagates through them and ±Inf shows at the ends,
    # so no element-wise temporaries are needed on multi-megabyte tensors.
    lo, hi = arr.min(), arr.max()
    if arr.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise BundleFormatError(f"tensor {key!r} has NaN or Inf values; expected finite")
    if part == "scale" and lo < 0:
        raise BundleFormatError(f"tensor {key!r} has negative scales; expected >= 0")
    if part == "q" and lo == -128:
        raise BundleFormatError(f"tensor {key!r} has code -128; expected -127..127")


def _steps(manifest: Manifest, table: dict[str, Any], data: memoryview) -> tuple[Step, ...]:
    used: set[str] = set()
    steps = []
    for i, info in enumerate(manifest.steps):
        tensors: dict[str, EncodedTensor] = {}
        for name, encoding in info.encodings.items():
            shape = manifest.shapes[name]
            parts: dict[str, np.ndarray] = {}
            for part, (dtype, pshape) in expected_parts(encoding, shape).items():
                key = f"{i}/{name}/{part}"
                if key not in table:
                    raise BundleFormatError(f"manifest names tensor {key!r}; it is not stored")
                sdtype, sshape, begin, end = table[key]
                if sdtype != np.dtype(dtype) or sshape != pshape:
                    raise BundleFormatError(
                        f"tensor {key!r} is {sdtype}{list(sshape)}; encoding {encoding} "
                        f"needs {np.dtype(dtype)}{list(pshape)}"
                    )
                arr = np.frombuffer(data[begin:end], dtype=sdtype).reshape(sshape)
                _check_values(key, part, arr)
                parts[part] = arr
                used.add(key)
            tensors[name] = EncodedTensor(encoding, shape, parts)
        steps.append(Step(info.kind, info.to_version, tensors))
    extra = set(table) - used
    if extra:
        raise BundleFormatError(
            f"{len(extra)} stored tensors are not in the manifest, e.g. {min(extra)!r}"
        )
    return tuple(steps)


def parse_bundle(
    data: bytes,
    *,
    max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES,
    expected_uncompressed_bytes: int | None = None,
) -> Bundle:
    """Parse and validate bundle bytes strictly (see the module docstring).

    Args:
        data: The compressed bundle.
        max_uncompressed_bytes: Refuse anything that would decompress beyond this.
        expected_uncompressed_bytes: The size the signed TUF metadata declares, if known;
            decompression stops there and any other declared size is refused.

    Returns:
        The parsed bundle; tensor parts are read-only views into the payload.

    Raises:
        BundleFormatError: the bytes are not a well-formed bundle of a known version.
        BundleIntegrityError: sizes disagree with what was declared, or the zstd
            checksum fails.
    """
    if len(data) > max_uncompressed_bytes + 2**16:
        raise BundleIntegrityError(f"bundle is {len(data)} bytes; limit {max_uncompressed_bytes}")
    frame = open_frame(
        data,
        limit=max_uncompressed_bytes,
        expected=expected_uncompressed_bytes,
        max_window_bytes=MAX_WINDOW_BYTES,
    )
    header, data_start = _header(frame)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or set(meta) != {MANIFEST_KEY}:
        got = sorted(meta) if isinstance(meta, dict) else meta
        raise BundleFormatError(f"safetensors metadata is {got!r}; expected only {MANIFEST_KEY!r}")
    if not isinstance(meta[MANIFEST_KEY], str):
        raise BundleFormatError("the manifest in the safetensors metadata is not a string")
    manifest = manifest_from_json(meta[MANIFEST_KEY])
    if manifest.uncompressed_bytes != frame.declared:
        raise BundleIntegrityError(
            f"manifest declares {manifest.uncompressed_bytes} uncompressed bytes, the zstd "
            f"frame declares {frame.declared}: the bundle was altered, discard it"
        )
    table = _tensor_table(header, frame.declared - data_start)
    # Only now, bounded by what the manifest declares, is the tensor data decoded.
    body = bytearray(frame.declared - data_start)
    frame.read_into(body, "tensor data")
    frame.finish()
    steps = _steps(manifest, table, memoryview(body).toreadonly())
    return Bundle(manifest=manifest, steps=steps, compressed_bytes=len(data))


def read_bundle(
    path: Path, *, max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES
) -> Bundle:
    """Read and parse a bundle file, refusing files larger than the limit before reading.

    Raises:
        PackagerInputError: the file cannot be read.
        BundleFormatError: see ``parse_bundle``.
        BundleIntegrityError: see ``parse_bundle``.
    """
    try:
        size = path.stat().st_size
        if size > max_uncompressed_bytes + 2**16:
            raise BundleIntegrityError(f"{path} is {size} bytes; limit {max_uncompressed_bytes}")
        data = path.read_bytes()
    except OSError as e:
        raise PackagerInputError(f"cannot read bundle {path}: {e.strerror}; check the path") from e
    return parse_bundle(data, max_uncompressed_bytes=max_uncompressed_bytes)


def read_declared(stream: BinaryIO, length: int, *, chunk_bytes: int = _CHUNK) -> bytes:
    """Read exactly the ``length`` bytes signed metadata declares, and not one more.

    Reads at most ``length + 1`` bytes, so a server streaming more than declared costs
    nothing beyond the declared size (THREATS A5).

    Raises:
        BundleIntegrityError: the stream ends early or has more than ``length`` bytes.
    """
    buf = io.BytesIO()
    while buf.tell() <= length:
        chunk = stream.read(min(chunk_bytes, length + 1 - buf.tell()))
        if not chunk:
            break
        buf.write(chunk)
    if buf.tell() != length:
        got = "more than" if buf.tell() > length else f"only {buf.tell()} of"
        raise BundleIntegrityError(
            f"server sent {got} the {length} bytes the signed metadata declares; "
            "download stopped, nothing was staged"
        )
    return buf.getvalue()
