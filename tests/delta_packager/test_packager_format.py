"""The bundle container and its strict parser (THREATS A6, A7; parser fuzzing)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from delta_packager import (
    BundleFormatError,
    BundleIntegrityError,
    BundleRejectedError,
    parse_bundle,
)
from delta_packager.format import read_declared
from tests.delta_packager.packager_helpers import (
    FP_X,
    edit_manifest,
    make_bundle_bytes,
    repack,
    unpack,
    zstd_frame_declaring,
)


@pytest.fixture(scope="module")
def bundle() -> bytes:
    return make_bundle_bytes(seed=1, versions=2)


def test_format_module_does_not_import_torch() -> None:
    code = (
        "import sys; import delta_packager.format, delta_packager.apply, delta_packager.package,"
        " delta_packager.trust, delta_packager.store; "
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"torch-family modules imported: {proc.stdout} {proc.stderr}"


def test_round_trip_and_manifest_fields(bundle: bytes) -> None:
    b = parse_bundle(bundle)
    m = b.manifest
    assert (m.format_version, m.kind, m.from_version, m.to_version, m.release_counter) == (
        1,
        "delta",
        1,
        2,
        2,
    )
    assert m.base_fingerprint == FP_X and b.compressed_bytes == len(bundle)
    assert m.uncompressed_bytes == len(zstandard.ZstdDecompressor().decompress(bundle))
    assert m.adapter_config.rank == 4 and m.adapter_config.target_modules == ("q_proj", "v_proj")
    assert set(b.steps[0].tensors) == set(m.shapes)
    assert {e.encoding for e in b.steps[0].tensors.values()} <= {"int8_row", "int8_col"}


def test_payload_is_plain_safetensors(bundle: bytes) -> None:
    """Any safetensors reader can open the payload: the container is not bespoke."""
    tensors = safetensors.numpy.load(zstandard.ZstdDecompressor().decompress(bundle))
    assert any(k.endswith("/q") for k in tensors) and any(k.endswith("/scale") for k in tensors)


# ------------------------------------------------------------------ A6: malformed headers


def _set_scale(value: float) -> Callable[[dict[str, Any], bytearray], None]:
    def edit(header: dict[str, Any], data: bytearray) -> None:
        key = next(k for k in sorted(header) if k.endswith("/scale"))
        begin = header[key]["data_offsets"][0]
        data[begin : begin + 4] = struct.pack("<f", value)

    return edit


def _overlap(header: dict[str, Any], data: bytearray) -> None:
    keys = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    first, second = header[keys[0]], header[keys[1]]
    # Second tensor starts inside the first one; lengths still match their dtype/shape.
    shift = 4
    second["data_offsets"] = [second["data_offsets"][0] - shift, second["data_offsets"][1] - shift]
    del first


def _dtype_mismatch(header: dict[str, Any], data: bytearray) -> None:
    key = next(k for k in sorted(header) if k.endswith("/q"))
    header[key]["dtype"] = "F32"


def _shape_mismatch(header: dict[str, Any], data: bytearray) -> None:
    key = next(k for k in sorted(header) if k.endswith("/q"))
    header[key]["shape"] = [header[key]["shape"][0] + 1, *header[key]["shape"][1:]]


def _extra_tensor(header: dict[str, Any], data: bytearray) -> None:
    end = len(data)
    header["0/extra/data"] = {"dtype": "I8", "shape": [4], "data_offsets": [end, end + 4]}
    data.extend(b"\0\0\0\0")


def _missing_tensor(header: dict[str, Any], data: bytearray) -> None:
    key = max(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    begin = header.pop(key)["data_offsets"][0]
    del data[begin:]


def _code_minus_128(header: dict[str, Any], data: bytearray) -> None:
    key = next(k for k in sorted(header) if k.endswith("/q"))
    data[header[key]["data_offsets"][0]] = 0x80


def _extra_metadata(header: dict[str, Any], data: bytearray) -> None:
    header["__metadata__"]["format"] = "pt"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set_scale(float("nan")), "NaN or Inf"),
        (_set_scale(float("inf")), "NaN or Inf"),
        (_set_scale(-1.0), "negative scales"),
        (_overlap, "overlap or leave gaps|needs"),
        (_dtype_mismatch, "needs"),
        (_shape_mismatch, "needs"),
        (_extra_tensor, "not in the manifest"),
        (_missing_tensor, "not stored"),
        (_code_minus_128, "-128"),
        (_extra_metadata, "expected only"),
    ],
    ids=[
        "nan-scale",
        "inf-scale",
        "negative-scale",
        "overlapping-offsets",
        "dtype-vs-bytes",
        "shape-vs-bytes",
        "extra-tensor",
        "missing-tensor",
        "int8-code-128",
        "extra-metadata",
    ],
)
def test_malformed_payload_is_refused(
    bundle: bytes, edit: Callable[[dict[str, Any], bytearray], None], match: str
) -> None:
    header, data = unpack(bundle)
    buf = bytearray(data)
    edit(header, buf)
    with pytest.raises(BundleFormatError, match=match):
        parse_bundle(repack(header, bytes(buf)))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(format_version=2), "format_version is 2"),
        (lambda m: m["steps"][0]["encodings"].update({next(iter(m["shapes"])): "int4"}), "int4"),
        (lambda m: m.update(kind="full"), "full"),
        (lambda m: m.update(from_version=5), "first step's base"),
        (lambda m: m.update(from_version=0), "first step's base"),
        (lambda m: m["adapter_config"].update(rank=9), "rank 9"),
        (lambda m: m.update(base_fingerprint="md5:abc"), "base_fingerprint"),
        (lambda m: m["provenance"].update(epsilon="8"), "provenance.epsilon"),
        (lambda m: m.update(surprise=1), "exactly the keys"),
        (lambda m: m.pop("release_counter"), "exactly the keys"),
        (lambda m: m.update(release_counter=True), "release_counter"),
    ],
    ids=[
        "unknown-format-version",
        "unknown-encoding",
        "kind-vs-from-version",
        "from-after-to",
        "from-skips-a-version",
        "rank-vs-shapes",
        "bad-fingerprint",
        "string-epsilon",
        "unknown-field",
        "missing-field",
        "bool-as-int",
    ],
)
def test_malformed_manifest_is_refused(
    bundle: bytes, edit: Callable[[dict[str, Any]], None], match: str
) -> None:
    with pytest.raises(BundleFormatError, match=match):
        parse_bundle(edit_manifest(bundle, edit))


def test_non_canonical_manifest_is_refused(bundle: bytes) -> None:
    header, data = unpack(bundle)
    manifest = json.loads(header["__metadata__"]["fedota.manifest"])
    header["__metadata__"]["fedota.manifest"] = json.dumps(manifest, indent=1)
    with pytest.raises(BundleFormatError, match="canonical"):
        parse_bundle(repack(header, data, fix_size=False))


def test_nan_in_manifest_json_is_refused(bundle: bytes) -> None:
    header, data = unpack(bundle)
    text = header["__metadata__"]["fedota.manifest"].replace('"clip_norm":null', '"clip_norm":NaN')
    header["__metadata__"]["fedota.manifest"] = text
    with pytest.raises(BundleFormatError, match=r"NaN|finite"):
        parse_bundle(repack(header, data, fix_size=False))


def test_huge_header_length_is_refused_without_allocating(bundle: bytes) -> None:
    payload = struct.pack("<Q", 2**62) + b"{}" + b"\0" * 64
    data = zstandard.ZstdCompressor().compress(payload)
    tracemalloc.start()
    with pytest.raises(BundleFormatError, match="header length"):
        parse_bundle(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2**20


def test_wrong_uncompressed_size_in_manifest_is_refused(bundle: bytes) -> None:
    header, data = unpack(bundle)
    manifest = json.loads(header["__metadata__"]["fedota.manifest"])
    manifest["uncompressed_bytes"] += 8
    from delta_packager.manifest import canonical_json

    header["__metadata__"]["fedota.manifest"] = canonical_json(manifest)
    with pytest.raises(BundleIntegrityError, match="declares"):
        parse_bundle(repack(header, data, fix_size=False))


# ------------------------------------------------------------------ A7: decompression bombs


def test_zstd_frame_expanding_beyond_declared_size_is_stopped() -> None:
    """A frame whose header claims 1 KiB but whose blocks expand to 64 MiB."""
    big = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (64 * 2**20))
    small_header = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 1024)
    header_len = zstandard.frame_header_size(small_header)
    forged = small_header[:header_len] + big[zstandard.frame_header_size(big) :]
    tracemalloc.start()
    with pytest.raises(BundleRejectedError):
        parse_bundle(forged)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20, f"parser held {peak} bytes for a 1 KiB declared frame"


def _gigabyte_frame_prefix(kind: str, bundle: bytes) -> bytes:
    payload = zstandard.ZstdDecompressor().decompress(bundle)
    return {
        "zeros": b"",
        "header-length-claims-16-MiB": struct.pack("<Q", 16 * 2**20),
        "real-manifest-then-zeros": payload,
    }[kind]


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("zeros", "header length is 0"),
        ("header-length-claims-16-MiB", "header starts with"),
        ("real-manifest-then-zeros", "manifest declares"),
    ],
)
def test_frame_declaring_a_gigabyte_is_refused_before_decoding_it(
    bundle: bytes, kind: str, match: str
) -> None:
    """Issue 22 item 4: a 32 KB frame declaring 1 GiB (within the default limit).

    The header and manifest are decoded first; the payload is never decoded, so the
    parser holds kilobytes, not the gigabyte the frame declares.
    """
    data = zstd_frame_declaring(2**30, _gigabyte_frame_prefix(kind, bundle))
    assert len(data) < 64 * 2**10
    tracemalloc.start()
    with pytest.raises(BundleRejectedError, match=match):
        parse_bundle(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * 2**20, f"parser held {peak} bytes for a frame of {len(data)} bytes"


@pytest.mark.parametrize("cut", [1, 4, 40], ids=["last-byte", "checksum", "mid-block"])
def test_truncated_frame_is_refused_before_decoding(bundle: bytes, cut: int) -> None:
    with pytest.raises(BundleIntegrityError, match="truncated|corrupt"):
        parse_bundle(bundle[:-cut])


def test_streamed_parse_verifies_the_frame_checksum(bundle: bytes) -> None:
    """The checksum covers bytes decoded after the manifest: still checked at the end."""
    bad = bytearray(bundle)
    bad[-1] ^= 0x01  # the last byte is the content checksum
    with pytest.raises(BundleIntegrityError, match="checksum"):
        parse_bundle(bytes(bad))


def test_declared_size_above_the_limit_is_refused_before_decompressing() -> None:
    data = zstandard.ZstdCompressor().compress(b"\0" * (2 * 2**20))
    t0 = time.perf_counter()
    with pytest.raises(BundleIntegrityError, match="more than the limit"):
        parse_bundle(data, max_uncompressed_bytes=2**20)
    assert time.perf_counter() - t0 < 0.5


def test_size_other_than_the_signed_one_is_refused(bundle: bytes) -> None:
    real = parse_bundle(bundle).manifest.uncompressed_bytes
    with pytest.raises(BundleIntegrityError, match="signed metadata"):
        parse_bundle(bundle, expected_uncompressed_bytes=real - 1)


def test_frame_without_content_size_is_refused(bundle: bytes) -> None:
    payload = zstandard.ZstdDecompressor().decompress(bundle)
    data = zstandard.ZstdCompressor(write_content_size=False).compress(payload)
    with pytest.raises(BundleFormatError, match="content size"):
        parse_bundle(data)


def test_trailing_bytes_after_the_frame_are_refused(bundle: bytes) -> None:
    with pytest.raises(BundleFormatError, match="follow the zstd frame"):
        parse_bundle(bundle + zstandard.ZstdCompressor().compress(b"x"))


# ------------------------------------------------------------------ A5: bounded reads


@pytest.mark.parametrize("extra", [1, 10_000], ids=["one-byte-more", "endless-data"])
def test_read_declared_stops_at_the_signed_length(extra: int) -> None:
    stream = io.BytesIO(b"a" * (5000 + extra))
    with pytest.raises(BundleIntegrityError, match="more than"):
        read_declared(stream, 5000, chunk_bytes=1024)
    assert stream.tell() == 5001  # never read past declared + 1


def test_read_declared_reads_exact_and_refuses_short() -> None:
    assert read_declared(io.BytesIO(b"abc"), 3) == b"abc"
    with pytest.raises(BundleIntegrityError, match="only 2 of"):
        read_declared(io.BytesIO(b"ab"), 3)


# ------------------------------------------------------------------ fuzzing


_FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, val in ops:
        if not buf:
            break
        i = pos % len(buf)
        if kind == 0:
            buf[i] ^= 1 << (val % 8)
        elif kind == 1:
            buf[i] = val % 256
        elif kind == 2:
            del buf[i:]
        elif kind == 3:
            buf[i:i] = bytes([val % 256]) * (1 + val % 64)
        else:
            del buf[i : i + 1 + val % 32]
    return bytes(buf)


_ops = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 2**31), st.integers(0, 2**16)),
    min_size=1,
    max_size=4,
)


def _parse_safely(data: bytes) -> None:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        parse_bundle(data, max_uncompressed_bytes=2**20)
    except BundleRejectedError:
        pass  # the only exception type allowed out
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 16 * 2**20


@_FUZZ
@given(_ops)
def test_mutated_compressed_bundle_only_raises_the_typed_error(
    bundle: bytes, ops: list[tuple[int, int, int]]
) -> None:
    _parse_safely(_mutate(bundle, ops))


@_FUZZ
@given(_ops)
def test_mutated_payload_recompressed_only_raises_the_typed_error(
    bundle: bytes, ops: list[tuple[int, int, int]]
) -> None:
    """Mutations behind a valid zstd checksum reach the safetensors and manifest parsers."""
    payload = zstandard.ZstdDecompressor().decompress(bundle)
    _parse_safely(zstandard.ZstdCompressor(write_checksum=True).compress(_mutate(payload, ops)))


@_FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_the_typed_error(data: bytes) -> None:
    _parse_safely(data)


def test_a_single_flipped_bit_in_the_compressed_bundle_is_detected(bundle: bytes) -> None:
    """Every byte position: flipping it never yields a silently different bundle."""
    reference = parse_bundle(bundle)
    ref_bits = [
        {n: {p: a.tobytes() for p, a in e.parts.items()} for n, e in s.tensors.items()}
        for s in reference.steps
    ]
    for i in range(0, len(bundle), max(1, len(bundle) // 300)):
        mutated = bytearray(bundle)
        mutated[i] ^= 0x01
        try:
            got = parse_bundle(bytes(mutated))
        except BundleRejectedError:
            continue
        bits = [
            {n: {p: a.tobytes() for p, a in e.parts.items()} for n, e in s.tensors.items()}
            for s in got.steps
        ]
        assert bits == ref_bits and got.manifest == reference.manifest, (
            f"flip at {i} went unnoticed"
        )


def test_parse_exposes_read_only_arrays(bundle: bytes) -> None:
    part = next(iter(parse_bundle(bundle).steps[0].tensors.values())).parts
    arr = next(iter(part.values()))
    assert isinstance(arr, np.ndarray) and not arr.flags.writeable
