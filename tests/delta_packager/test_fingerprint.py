"""Base fingerprint (DESIGN decision 2, THREATS C12/C13): stable, and sensitive to the
quantized tensors, the quantization config and the tokenizer."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from delta_packager import PackagerInputError
from delta_packager.fingerprint import fingerprint_checkpoint


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
