"""Base-model fingerprint: which exact quantized base a bundle applies to.

``fingerprint_checkpoint`` is a SHA-256 over, in this order and framing:

1. every tensor of the pre-quantized checkpoint, sorted by name, as
   ``name, dtype, shape, raw bytes`` (read from the safetensors files without torch);
2. the ``quantization_config`` of ``config.json`` in canonical JSON;
3. every tokenizer file present, sorted by file name, as ``name, bytes``.

Each field is length-prefixed, so no two different inputs frame to the same stream.
The result is independent of the process, the shard layout and file timestamps, and
changes when any tensor byte, the quantization config or the tokenizer changes
(THREATS C12, C13).

``fingerprint_gguf`` fingerprints a GGUF export of a base (what the llama.cpp runtime
loads, DESIGN decision 11): ``sha256(b"fedota-gguf-fingerprint-v1\\0" + file bytes)``.
GGUF packs tensors, quantization types and the tokenizer into one file, so every byte
counts (THREATS I42); each export has its own fingerprint, and a release names every
base it applies to (``Manifest.compatible_bases``). ``fingerprint_base`` picks the
right one for a path. Only the stdlib is used: the packager stays torch-free.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from delta_packager.errors import PackagerInputError

__all__ = [
    "FINGERPRINT_PREFIX",
    "GGUF_MAGIC",
    "TOKENIZER_FILES",
    "fingerprint_base",
    "fingerprint_checkpoint",
    "fingerprint_gguf",
    "is_fingerprint",
    "normalize_bases",
    "rank_target",
]

FINGERPRINT_PREFIX = "sha256:"
#: The first four bytes of every GGUF file (llama.cpp's ``GGUF_MAGIC``).
GGUF_MAGIC = b"GGUF"
#: The files that make up a Hugging Face tokenizer: hashed into the fingerprint, and
#: copied next to every pre-quantized checkpoint so it is self-contained.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_CHUNK = 1 << 20
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
#: Most further bases one release may name (the manifest parser's bound too).
MAX_COMPATIBLE_BASES = 64


def rank_target(base_fingerprint: str, rank: int) -> str:
    """The target a phone training LoRA rank ``rank`` on ``base_fingerprint`` is offered
    bundles under (heterogeneous ranks, ADR 0016).

    A fingerprint-shaped SHA-256 of the base fingerprint and the rank: a rank-``r``
    bundle names it as its ``base_fingerprint`` (signed, in the manifest and the TUF
    custom metadata), so the OTA server offers it, and the update agent applies it,
    only on phones of that base *and* that rank, with no change to the server.

    Raises:
        PackagerInputError: not a fingerprint, or a rank below 1.
    """
    if not is_fingerprint(base_fingerprint) or isinstance(rank, bool) or rank < 1:
        raise PackagerInputError(
            f"a rank target needs a sha256: base fingerprint and a rank >= 1, got "
            f"{base_fingerprint!r} and {rank!r}"
        )
    digest = hashlib.sha256(f"fedota-lora-rank\0{base_fingerprint}\0{rank}".encode()).hexdigest()
    return FINGERPRINT_PREFIX + digest


def is_fingerprint(value: object) -> bool:
    """Whether ``value`` is a fingerprint string: ``"sha256:"`` and 64 lowercase hex."""
    return isinstance(value, str) and _FINGERPRINT.match(value) is not None


def normalize_bases(base_fingerprint: str, others: Iterable[str]) -> tuple[str, ...]:
    """The compatible bases of a release in manifest form: sorted, unique, no primary.

    Args:
        base_fingerprint: The primary base the packager state is built for.
        others: Further base fingerprints the same adapter applies to.

    Returns:
        The sorted, de-duplicated fingerprints.

    Raises:
        PackagerInputError: one is not a fingerprint, is the primary base itself, or
            there are more than ``MAX_COMPATIBLE_BASES``.
    """
    bases = sorted(set(others))
    for fp in bases:
        if not is_fingerprint(fp):
            raise PackagerInputError(
                f'compatible base {fp!r} is not a fingerprint; expected "sha256:" and 64 '
                "lowercase hex digits, e.g. from `fedota base-model fingerprint`"
            )
    if base_fingerprint in bases:
        raise PackagerInputError(
            f"compatible base {base_fingerprint} is the release's own base; name only "
            "further bases (e.g. GGUF exports) as compatible"
        )
    if len(bases) > MAX_COMPATIBLE_BASES:
        raise PackagerInputError(
            f"{len(bases)} compatible bases; at most {MAX_COMPATIBLE_BASES} fit in a manifest"
        )
    return tuple(bases)


def _frame(h: Any, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise PackagerInputError(f"{path} is not a safetensors file: shorter than 8 bytes")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER_BYTES:
            raise PackagerInputError(f"{path}: safetensors header of {n} bytes is implausible")
        try:
            header: dict[str, Any] = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackagerInputError(f"{path}: safetensors header is not JSON: {e}") from e
    return header, 8 + n


def _tensor_index(model_dir: Path) -> list[tuple[str, Path, dict[str, Any], int]]:
    entries = []
    for shard in sorted(model_dir.glob("*.safetensors")):
        header, data_start = _read_header(shard)
        for name, info in header.items():
            if name != "__metadata__":
                entries.append((name, shard, info, data_start))
    entries.sort(key=lambda e: e[0])
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise PackagerInputError(f"{model_dir}: a tensor name appears in two shards")
    return entries


def _hash_tensor(h: Any, name: str, shard: Path, info: dict[str, Any], data_start: int) -> None:
    begin, end = info["data_offsets"]
    _frame(h, name.encode())
    _frame(h, str(info["dtype"]).encode())
    _frame(h, json.dumps(list(info["shape"])).encode())
    h.update(struct.pack("<Q", end - begin))
    with open(shard, "rb") as f:
        f.seek(data_start + begin)
        remaining = end - begin
        while remaining:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                raise PackagerInputError(f"{shard}: tensor {name} runs past the end of the file")
            h.update(chunk)
            remaining -= len(chunk)


def fingerprint_checkpoint(quantized_dir: Path | str) -> str:
    """Fingerprint a pre-quantized base checkpoint directory.

    Args:
        quantized_dir: a directory written by ``client.runtime.save_quantized`` (or any
            Hugging Face checkpoint whose ``config.json`` has a ``quantization_config``).

    Returns:
        ``"sha256:"`` followed by 64 lowercase hex digits.

    Raises:
        PackagerInputError: the directory is missing, has no safetensors weights, is not
            quantized, or a file is malformed.
    """
    model_dir = Path(quantized_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise PackagerInputError(
            f"{model_dir} is not a model checkpoint: {config_path.name} is missing"
        )
    quant = json.loads(config_path.read_text()).get("quantization_config")
    if not quant:
        raise PackagerInputError(
            f"{model_dir} is not pre-quantized (no quantization_config in config.json); "
            "fingerprint the NF4 copy, e.g. DIR/nf4 from `fedota base-model init`"
        )
    entries = _tensor_index(model_dir)
    if not entries:
        raise PackagerInputError(f"{model_dir} has no tensors in *.safetensors files")
    h = hashlib.sha256(b"fedota-base-fingerprint-v1\0")
    for name, shard, info, data_start in entries:
        _hash_tensor(h, name, shard, info, data_start)
    _frame(h, json.dumps(quant, sort_keys=True, separators=(",", ":")).encode())
    for fname in sorted(TOKENIZER_FILES):
        path = model_dir / fname
        if path.is_file():
            _frame(h, fname.encode())
            _frame(h, path.read_bytes())
    return FINGERPRINT_PREFIX + h.hexdigest()


def fingerprint_gguf(path: Path | str) -> str:
    """Fingerprint a GGUF export of a base model (the llama.cpp runtime's base).

    Args:
        path: The ``.gguf`` file.

    Returns:
        ``"sha256:"`` followed by 64 lowercase hex digits: the SHA-256 of
        ``b"fedota-gguf-fingerprint-v1\\0"`` and every byte of the file.

    Raises:
        PackagerInputError: the file is missing, unreadable, or does not start with the
            GGUF magic.
    """
    gguf = Path(path)
    h = hashlib.sha256(b"fedota-gguf-fingerprint-v1\0")
    try:
        with open(gguf, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
            if magic != GGUF_MAGIC:
                raise PackagerInputError(
                    f"{gguf} is not a GGUF file: it starts with {magic!r}, expected "
                    f"{GGUF_MAGIC!r}; pass the .gguf export of the base (llama.cpp)"
                )
            h.update(magic)
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise PackagerInputError(f"cannot read the GGUF base {gguf}: {e.strerror or e}") from e
    return FINGERPRINT_PREFIX + h.hexdigest()


def fingerprint_base(path: Path | str) -> str:
    """Fingerprint a base model of either runtime: an NF4 directory or a GGUF file.

    Args:
        path: A pre-quantized checkpoint directory (``fingerprint_checkpoint``) or a
            ``.gguf`` file (``fingerprint_gguf``).

    Returns:
        ``"sha256:"`` followed by 64 lowercase hex digits.

    Raises:
        PackagerInputError: ``path`` is neither a directory nor a ``.gguf`` file, or the
            base it names is malformed.
    """
    base = Path(path)
    if not base.exists():
        raise PackagerInputError(
            f"{base} does not exist: pass a pre-quantized checkpoint directory (NF4) "
            "or a .gguf file"
        )
    if base.is_dir():
        return fingerprint_checkpoint(base)
    if base.suffix.lower() == ".gguf":
        return fingerprint_gguf(base)
    raise PackagerInputError(
        f"{base} is not a base model: expected a pre-quantized checkpoint directory "
        "(NF4) or a .gguf file"
    )
