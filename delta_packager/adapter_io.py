"""③ package — reading a PEFT LoRA adapter from disk into numpy (no torch).

Accepts a PEFT ``save_pretrained`` directory (``adapter_model.safetensors`` +
``adapter_config.json``) or a bare ``.safetensors`` file (config then inferred from the
tensor names and shapes). F32, F16 and BF16 tensors are read; everything becomes
float32. Tensors are read with a bounded header parse, never by unpickling.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from delta_packager.errors import PackagerInputError
from delta_packager.manifest import AdapterConfig

__all__ = ["load_adapter"]

_MAX_HEADER_BYTES = 64 * 2**20
_LORA = re.compile(r"\.(?P<module>[A-Za-z0-9_]+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PackagerInputError(f"cannot read {path}: {e.strerror}; check the path") from e
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if n > min(_MAX_HEADER_BYTES, len(data) - 8):
            raise ValueError(f"header length {n} exceeds the file")
        header: dict[str, Any] = json.loads(data[8 : 8 + n])
        out: dict[str, np.ndarray] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = (8 + n + int(o) for o in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            raw = data[begin:end]
            count = math.prod(shape)
            if info["dtype"] == "BF16":
                if len(raw) != 2 * count:
                    raise ValueError(f"tensor {name}: byte count does not match its shape")
                bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                out[name] = bits.view(np.float32).reshape(shape)
                continue
            dtype = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name} has dtype {info['dtype']}; expected a float type")
            if len(raw) != np.dtype(dtype).itemsize * count:
                raise ValueError(f"tensor {name}: byte count does not match its shape")
            out[name] = np.frombuffer(raw, dtype=dtype).astype(np.float32).reshape(shape)
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise PackagerInputError(f"{path} is not a readable safetensors adapter: {e}") from e
    return out


def _infer_config(
    tensors: dict[str, np.ndarray], raw: dict[str, Any], *, ffa: bool
) -> AdapterConfig:
    modules, rank = set(), None
    for name, arr in tensors.items():
        match = _LORA.search(name)
        if not match:
            raise PackagerInputError(
                f"tensor {name} is not a LoRA weight (…<module>.lora_A|B.weight); expected "
                "a PEFT LoRA adapter"
            )
        modules.add(match["module"])
        if match["ab"] == "A" and arr.ndim == 2:
            rank = arr.shape[0]
    r = int(raw.get("r") or rank or 0)
    if r < 1:
        raise PackagerInputError("cannot tell the LoRA rank: no lora_A tensor and no config")
    targets = raw.get("target_modules") or sorted(modules)
    if isinstance(targets, str):
        targets = [targets]
    return AdapterConfig(
        rank=r,
        alpha=float(raw.get("lora_alpha", r)),
        target_modules=tuple(sorted(str(t) for t in targets)),
        ffa=ffa,
        peft_config=raw,
    )


def load_adapter(path: Path, *, ffa: bool = False) -> tuple[dict[str, np.ndarray], AdapterConfig]:
    """Load LoRA tensors (float32) and their config.

    Args:
        path: A PEFT adapter directory or a ``.safetensors`` file.
        ffa: Whether the adapter was trained with FFA-LoRA (``A`` frozen).

    Returns:
        Tensor name -> float32 array, and the adapter config.

    Raises:
        PackagerInputError: missing files, unreadable tensors, or not a LoRA adapter.
    """
    raw: dict[str, Any] = {}
    if path.is_dir():
        weights = path / "adapter_model.safetensors"
        config = path / "adapter_config.json"
        if not weights.is_file():
            raise PackagerInputError(
                f"{path} has no adapter_model.safetensors; expected a PEFT save_pretrained dir"
            )
        if config.is_file():
            try:
                raw = json.loads(config.read_text())
            except ValueError as e:
                raise PackagerInputError(f"{config} is not JSON: {e}") from e
    elif path.suffix == ".safetensors" and path.is_file():
        weights = path
    else:
        raise PackagerInputError(
            f"{path} is neither a PEFT adapter directory nor a .safetensors file"
        )
    tensors = _read_safetensors(weights)
    if not tensors:
        raise PackagerInputError(f"{weights} holds no tensors; expected LoRA weights")
    return tensors, _infer_config(tensors, raw, ffa=ffa)
