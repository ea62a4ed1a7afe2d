"""⑦ apply, for llama.cpp: the verified adapter state as a GGUF LoRA, made on the device.

Bundles carry runtime-neutral LoRA tensors named as PEFT names them
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). llama.cpp loads a
LoRA from a GGUF file whose tensors are named after the base's GGUF tensors
(``blk.0.attn_q.weight.lora_a``), with ``general.type = adapter``, ``adapter.type =
lora`` and ``adapter.lora.alpha``; it scales ``B·A`` by ``alpha / rank`` as PEFT does.
The layouts agree: PEFT's ``lora_A`` is ``(rank, in)`` and ``lora_B`` is ``(out, rank)``,
which is what llama.cpp expects of ``lora_a`` and ``lora_b``.

One transform is needed: for the ``llama`` architecture the GGUF export permutes the
rows of ``q_proj`` and ``k_proj`` (llama.cpp rotates interleaved pairs, Hugging Face
rotates halves), so the rows of those layers' ``lora_B`` are permuted the same way:
``P(W + B·A) = P·W + (P·B)·A``. :func:`permute_rotary_rows` is that one permutation,
used by the base export too, so the two can never disagree.

Invariant (THREATS I43): :func:`write_lora_gguf` writes a temp file, fsyncs it and
renames it into place, so a kill leaves either no file or a complete one, and the
adapter the runtime has attached is untouched until the new file is complete. The temp
file's name ends in ``TMP_SUFFIX``, so the update agent's stale sweep
(``DeviceState.clean_stale``) removes what a killed process left in ``runtime-cache/``.

Torch-free: numpy and the ``gguf`` package only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from client.errors import ClientInputError
from protocol import atomic_file

__all__ = [
    "SUPPORTED_ARCHES",
    "gguf_tensor_name",
    "lora_to_gguf_tensors",
    "permute_rotary_rows",
    "write_lora_gguf",
]

#: GGUF architectures fedota exports and runs (Hugging Face Llama and Qwen2 families).
SUPPORTED_ARCHES = ("llama", "qwen2")
_PEFT_PREFIX = "base_model.model."


def permute_rotary_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection from Hugging Face's rotate-half layout
    to llama.cpp's interleaved one (per head: ``[x0..x(d/2-1), y0..]`` → ``[x0, y0, ..]``).

    Args:
        rows: ``(n_heads * head_dim, ...)`` array (a weight or a LoRA ``B``).
        n_heads: Heads this projection has (key/value heads for ``k_proj``).
    """
    out = rows.shape[0]
    if out % (2 * n_heads):
        raise ClientInputError(f"{out} rows do not split into {n_heads} heads of even size")
    head = rows.reshape(n_heads, 2, out // n_heads // 2, *rows.shape[1:])
    return np.ascontiguousarray(head.swapaxes(1, 2).reshape(rows.shape))


def gguf_tensor_name(arch: str, n_blocks: int, hf_module: str) -> str | None:
    """The GGUF base tensor (without ``.weight``) a Hugging Face module maps to."""
    import gguf

    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}.get(arch)
    if model_arch is None:
        raise ClientInputError(
            f"GGUF architecture {arch!r} is not supported; fedota runs {SUPPORTED_ARCHES}"
        )
    return _name_map(model_arch, n_blocks).get_name(hf_module)


_MAPS: dict[tuple[object, int], object] = {}


def _name_map(model_arch: object, n_blocks: int):  # type: ignore[no-untyped-def]
    import gguf

    key = (model_arch, n_blocks)
    if key not in _MAPS:
        _MAPS[key] = gguf.get_tensor_name_map(model_arch, n_blocks)  # type: ignore[arg-type]
    return _MAPS[key]


def lora_to_gguf_tensors(
    state: Mapping[str, np.ndarray],
    *,
    arch: str,
    n_blocks: int,
    n_heads: int,
    n_kv_heads: int,
) -> dict[str, np.ndarray]:
    """Rename (and for ``llama`` q/k, permute) PEFT LoRA tensors to llama.cpp's names.

    Raises:
        ClientInputError: a tensor is not a LoRA A/B weight of a module the base has.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        module, sep, kind = name.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            raise ClientInputError(f"adapter tensor {name!r} is not a LoRA A/B weight")
        target = gguf_tensor_name(arch, n_blocks, module)
        if target is None:
            raise ClientInputError(
                f"adapter tensor {name!r}: module {module!r} has no tensor in a {arch} GGUF"
            )
        array = np.ascontiguousarray(value, dtype=np.float32)
        if kind == "B.weight" and arch == "llama":
            if target.endswith(".attn_q"):
                array = permute_rotary_rows(array, n_heads)
            elif target.endswith(".attn_k"):
                array = permute_rotary_rows(array, n_kv_heads)
        out[f"{target}.weight.lora_{kind[0].lower()}"] = array
    return out


def write_lora_gguf(
    path: Path, tensors: Mapping[str, np.ndarray], *, arch: str, alpha: float
) -> Path:
    """Write a llama.cpp LoRA adapter file atomically (temp, fsync, rename, fsync dir).

    Args:
        path: Destination ``.gguf`` path.
        tensors: Output of :func:`lora_to_gguf_tensors`.
        arch: The base's GGUF architecture (llama.cpp refuses a LoRA of another).
        alpha: LoRA alpha; llama.cpp scales by ``alpha / rank``.

    Raises:
        OSError: the file could not be written (nothing is left at ``path``).
    """
    import gguf

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name in sorted(tensors):
            writer.add_tensor(name, np.ascontiguousarray(tensors[name], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
