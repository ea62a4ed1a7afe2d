"""Base fingerprint (DESIGN decisions 2 and 11, THREATS C12/C13, I42): stable, and
sensitive to the quantized tensors, the quantization config and the tokenizer — and, for
a GGUF export, to every byte of the file."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from delta_packager import (
    PackagerInputError,
    fingerprint_base,
    fingerprint_checkpoint,
    fingerprint_gguf,
)
from delta_packager.fingerprint import is_fingerprint, normalize_bases


@pytest.fixture()
def nf4_copy(micro_base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(micro_base / "nf4", tmp_path / "nf4"))


def test_format_and_stability_across_processes(micro_base: Path) -> None:
    fp = fingerprint_checkpoint(micro_base / "nf4")
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    code = (
        "import sys; from delta_packager.fingerprint import fingerprint_checkpoint as f; "
        "print(f(sys.argv[1]))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, str(micro_base / "nf4")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert other.stdout.strip() == fp


def _flip_one_tensor_byte(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    begin, _ = header["model.layers.0.mlp.up_proj.weight"]["data_offsets"]
    data[8 + n + begin] ^= 0x01
    path.write_bytes(bytes(data))


def _change_quant_config(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_use_double_quant"] = False
    (model_dir / "config.json").write_text(json.dumps(config))


def _change_tokenizer(model_dir: Path) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|padding|>"
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))


@pytest.mark.parametrize(
    "mutate",
    [_flip_one_tensor_byte, _change_quant_config, _change_tokenizer],
    ids=["tensor-byte", "quantization-config", "tokenizer"],
)
def test_any_change_changes_the_fingerprint(nf4_copy: Path, mutate) -> None:  # type: ignore[no-untyped-def]
    before = fingerprint_checkpoint(nf4_copy)
    mutate(nf4_copy)
    assert fingerprint_checkpoint(nf4_copy) != before


def test_unrelated_files_and_model_config_do_not_matter(nf4_copy: Path) -> None:
    before = fingerprint_checkpoint(nf4_copy)
    config = json.loads((nf4_copy / "config.json").read_text())
    config["transformers_version"] = "0.0.0"
    (nf4_copy / "config.json").write_text(json.dumps(config, indent=4))
    (nf4_copy / "README.md").write_text("notes")
    assert fingerprint_checkpoint(nf4_copy) == before


def test_float_checkpoint_is_refused(micro_base: Path) -> None:
    with pytest.raises(PackagerInputError, match="not pre-quantized"):
        fingerprint_checkpoint(micro_base)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PackagerInputError, match="config.json is missing"):
        fingerprint_checkpoint(tmp_path / "absent")


# ---------------------------------------------------------------- GGUF exports (I42)


def _gguf(path: Path, body: bytes = b"\x03\x00\x00\x00tensors+tokenizer") -> Path:
    path.write_bytes(b"GGUF" + body)
    return path


def test_gguf_fingerprint_is_the_documented_hash(tmp_path: Path) -> None:
    gguf = _gguf(tmp_path / "base.gguf", bytes(range(256)) * 9000)  # > 2 chunks of 1 MiB
    data = gguf.read_bytes()
    expected = hashlib.sha256(b"fedota-gguf-fingerprint-v1\0" + data).hexdigest()
    assert fingerprint_gguf(gguf) == "sha256:" + expected
    # Golden value: `sha256sum` of the tag b"fedota-gguf-fingerprint-v1\0" followed by
    # the file b"GGUF\x03\0\0\0tensors+tokenizer" (printf ... | sha256sum).
    assert fingerprint_gguf(_gguf(tmp_path / "small.gguf")) == (
        "sha256:d37b932db9cb677e609527a3c0223401463559da1626341a1731b0ac094283ac"
    )


@pytest.mark.parametrize("offset", [0, 4, 5_000, -1], ids=["magic", "first-body", "middle", "last"])
def test_one_changed_byte_changes_the_gguf_fingerprint(tmp_path: Path, offset: int) -> None:
    gguf = _gguf(tmp_path / "base.gguf", bytes(10_000))
    before = fingerprint_gguf(gguf)
    data = bytearray(gguf.read_bytes())
    data[offset] ^= 0x01
    gguf.write_bytes(bytes(data))
    if offset == 0:  # no longer GGUF at all
        with pytest.raises(PackagerInputError, match="not a GGUF file"):
            fingerprint_gguf(gguf)
    else:
        assert fingerprint_gguf(gguf) != before


@pytest.mark.parametrize(
    "content", [b"", b"GGU", b"\x00\x00\x00\x00GGUF", b"PK\x03\x04zip"], ids=repr
)
def test_a_file_without_the_gguf_magic_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(content)
    with pytest.raises(PackagerInputError, match=r"not a GGUF file.*expected b'GGUF'"):
        fingerprint_gguf(path)


def test_a_missing_gguf_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PackagerInputError, match="cannot read the GGUF base"):
        fingerprint_gguf(tmp_path / "absent.gguf")


def _nf4_dir(directory: Path) -> Path:
    directory.mkdir()
    weights = {"w": np.arange(8, dtype=np.uint8).reshape(4, 2)}
    safetensors.numpy.save_file(weights, str(directory / "model.safetensors"))
    config = {"quantization_config": {"bnb_4bit_quant_type": "nf4"}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_fingerprint_base_dispatches_on_the_kind_of_path(tmp_path: Path) -> None:
    nf4 = _nf4_dir(tmp_path / "nf4")
    gguf = _gguf(tmp_path / "Base.Q4_K_M.GGUF")
    assert fingerprint_base(nf4) == fingerprint_checkpoint(nf4)
    assert fingerprint_base(str(gguf)) == fingerprint_gguf(gguf)
    assert fingerprint_base(nf4) != fingerprint_base(gguf)


@pytest.mark.parametrize("name", ["model.safetensors", "base.bin", "absent"])
def test_fingerprint_base_refuses_anything_else_saying_what_it_accepts(
    tmp_path: Path, name: str
) -> None:
    path = tmp_path / name
    if name != "absent":
        path.write_bytes(b"GGUF")  # even with the magic: only *.gguf files are GGUF bases
    with pytest.raises(PackagerInputError, match=r"checkpoint directory \(NF4\) or a \.gguf"):
        fingerprint_base(path)


def test_normalize_bases_sorts_dedupes_and_refuses_bad_entries() -> None:
    a, b, c = ("sha256:" + ch * 64 for ch in "abc")
    assert normalize_bases(a, [c, b, c]) == (b, c)
    assert normalize_bases(a, []) == ()
    with pytest.raises(PackagerInputError, match="is the release's own base"):
        normalize_bases(a, [b, a])
    with pytest.raises(PackagerInputError, match="is not a fingerprint"):
        normalize_bases(a, ["sha256:" + "B" * 64])
    assert is_fingerprint(a) and not is_fingerprint(a[:-1]) and not is_fingerprint(None)
