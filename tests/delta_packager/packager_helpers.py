"""Shared builders for the delta_packager tests: small random LoRA adapters, bundles,
and the files ``fedota package`` reads (a PEFT adapter directory, a quantized base)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

FP_X = "sha256:" + "a" * 64
FP_Y = "sha256:" + "b" * 64


def lora_names(layers: int = 2, modules: tuple[str, ...] = ("q_proj", "v_proj")) -> list[str]:
    """PEFT state-dict names (``save_pretrained`` form) for a tiny Llama."""
    names = []
    for i in range(layers):
        for mod in modules:
            for ab in ("A", "B"):
                names.append(f"base_model.model.model.layers.{i}.self_attn.{mod}.lora_{ab}.weight")
    return names


def random_adapter(
    rng: np.random.Generator, *, hidden: int = 32, rank: int = 4, layers: int = 2
) -> dict[str, np.ndarray]:
    """A trained-looking adapter: A ~ U(±1/sqrt(hidden)), B small Gaussian."""
    out = {}
    bound = 1.0 / np.sqrt(hidden)
    for name in lora_names(layers):
        if ".lora_A." in name:
            out[name] = rng.uniform(-bound, bound, size=(rank, hidden)).astype(np.float32)
        else:
            out[name] = (0.01 * rng.standard_normal((hidden, rank))).astype(np.float32)
    return out


def train_step(
    rng: np.random.Generator, adapter: dict[str, np.ndarray], *, lr: float = 1e-3
) -> dict[str, np.ndarray]:
    """One fake round: every tensor moves by a small Gaussian step."""
    return {
        k: (v + lr * rng.standard_normal(v.shape)).astype(np.float32) for k, v in adapter.items()
    }


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """True when both dicts hold the same names with bit-identical float32 arrays."""
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def make_bundle_bytes(seed: int = 0, *, versions: int = 1, fp: str = FP_X) -> bytes:
    """Bytes of a real bundle: a full v1 (and deltas up to ``versions`` when > 1)."""
    from delta_packager import AdapterConfig, package_version

    rng = np.random.default_rng(seed)
    adapter = random_adapter(rng)
    config = AdapterConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    state, data = None, b""
    for _ in range(versions):
        result = package_version(
            adapter, previous=state, base_fingerprint=fp, adapter_config=config
        )
        state, data = result.state, result.bundle_bytes
        adapter = train_step(rng, adapter)
    return data


def unpack(bundle: bytes) -> tuple[dict[str, Any], bytes]:
    """Split a bundle into its safetensors header (dict) and tensor data section."""
    import zstandard

    payload = zstandard.ZstdDecompressor().decompress(bundle)
    (n,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + n]), payload[8 + n :]


def repack(
    header: dict[str, Any], data: bytes, *, fix_size: bool = True, raw_header: bytes | None = None
) -> bytes:
    """Rebuild a bundle from a (possibly edited) header and data section.

    With ``fix_size`` the manifest's ``uncompressed_bytes`` is updated so the edit is
    the only defect; the manifest is kept canonical.
    """
    import zstandard

    from delta_packager.manifest import canonical_json

    for _ in range(4):
        hbytes = raw_header if raw_header is not None else json.dumps(header).encode()
        payload = struct.pack("<Q", len(hbytes)) + hbytes + data
        if not fix_size or raw_header is not None:
            break
        manifest = json.loads(header["__metadata__"]["fedota.manifest"])
        if manifest["uncompressed_bytes"] == len(payload):
            break
        manifest["uncompressed_bytes"] = len(payload)
        header["__metadata__"]["fedota.manifest"] = canonical_json(manifest)
    return zstandard.ZstdCompressor(write_checksum=True).compress(payload)


def edit_manifest(bundle: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Return ``bundle`` with its manifest edited (canonical form and size kept right)."""
    from delta_packager.manifest import canonical_json

    header, data = unpack(bundle)
    manifest = json.loads(header["__metadata__"]["fedota.manifest"])
    edit(manifest)
    header["__metadata__"]["fedota.manifest"] = canonical_json(manifest)
    return repack(header, data)


def zstd_frame_declaring(declared: int, prefix: bytes = b"") -> bytes:
    """A zstd frame (RFC 8878) that declares ``declared`` bytes: ``prefix``, then zeros.

    Built block by block, without ever holding the content: raw blocks for ``prefix``,
    then run-length blocks of 128 KiB of zeros, 4 bytes each. A frame declaring 1 GiB
    is about 32 KB, the decompression bomb of issue 22 item 4. No checksum.
    """
    block_max = 1 << 17

    def block(kind: int, size: int, last: bool) -> bytes:
        return (int(last) | kind << 1 | size << 3).to_bytes(3, "little")

    # Descriptor: 8-byte content size, not single-segment, no checksum, no dictionary;
    # window 2**20 bytes (exponent 10, mantissa 0).
    out = [b"\x28\xb5\x2f\xfd", bytes([0b1100_0000, 10 << 3]), struct.pack("<Q", declared)]
    pos = 0
    while pos < declared:
        size = min(block_max, declared - pos)
        last = pos + size == declared
        if pos < len(prefix):
            size = min(size, len(prefix) - pos)
            last = pos + size == declared
            out += [block(0, size, last), prefix[pos : pos + size]]
        else:
            out += [block(1, size, last), b"\0"]
        pos += size
    return b"".join(out)


def write_peft_adapter(directory: Path, tensors: dict[str, np.ndarray]) -> Path:
    """The files PEFT ``save_pretrained`` writes for a LoRA adapter."""
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(
        tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def write_quantized_base(
    directory: Path, *, quant_type: str = "nf4", tokenizer: str = "{}"
) -> Path:
    """A minimal pre-quantized checkpoint: packed uint8 weights, config, tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {"model.layers.0.mlp.up_proj.weight": np.arange(64, dtype=np.uint8).reshape(32, 2)}
    safetensors.numpy.save_file(weights, str(directory / "model.safetensors"))
    config = {
        "model_type": "llama",
        "quantization_config": {"bnb_4bit_quant_type": quant_type, "load_in_4bit": True},
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_text(tokenizer)
    return directory
