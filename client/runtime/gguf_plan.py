"""Planning llama.cpp inference within a memory budget, from the GGUF header alone.

:func:`read_gguf_footprint` parses a GGUF file's header (key/values and tensor table;
no tensor data is read) into the sizes that drive the plan. :func:`plan_llamacpp_memory`
then splits the budget as ``client.runtime.budget`` does for the NF4 runtime:

* weights: the tensors' bytes (read into memory, not mapped, so they count once), plus
  the largest tensor once more for the loader's staging buffer;
* adapter: the bytes reserved for the LoRA (llama.cpp keeps it in float32);
* fixed: llama.cpp's context, graph metadata and thread pool (``FIXED_OVERHEAD_BYTES``,
  measured by ``benchmarks/bench_device_runtime.py``, rounded up);
* output: ``chunk × vocab`` float32 logits (evaluation scores every position of a
  chunk);
* compute: the graph's working buffers for a chunk attending over a full cache, an
  analytic estimate times ``COMPUTE_MARGIN``;
* KV cache: ``n_ctx × 2 × layers × kv_heads × head_dim`` float16 values. llama.cpp
  rounds ``n_ctx`` up to a multiple of ``CTX_STEP`` (256), so the cache is sized in those
  steps and the runtime never holds more tokens than the plan's capacity (THREATS I44).

A budget that cannot hold the weights plus one ``CTX_STEP`` of cache is refused before
anything is allocated, with the number of bytes needed (THREATS H39 on this backend).
Only the stdlib and the ``gguf`` package's table of block sizes are used.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.errors import ClientInputError
from client.runtime.budget import BudgetTooSmallError, MemoryPlan

__all__ = [
    "CTX_STEP",
    "GgufFootprint",
    "plan_llamacpp_memory",
    "read_gguf_footprint",
]

MIB = 1024 * 1024
FIXED_OVERHEAD_BYTES = 24 * MIB
COMPUTE_MARGIN = 2.0
CTX_STEP = 256
KV_VALUE_BYTES = 2  # float16 cache
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS.update({10: "<Q", 11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufFootprint:
    """Sizes of a GGUF base, read from its header."""

    path: Path
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    weights_bytes: int
    largest_tensor_bytes: int
    tensor_shapes: dict[str, tuple[int, ...]]  # GGUF order: (ne0, ne1, ...)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layer * self.n_head_kv * self.head_dim * KV_VALUE_BYTES

    def compute_bytes(self, chunk: int, n_ctx: int) -> int:
        """Working buffers of one forward pass of ``chunk`` tokens over ``n_ctx``."""
        per_token = (self.n_vocab + 6 * self.n_embd + 3 * self.n_ff) * 4
        scores = 2 * self.n_head * chunk * n_ctx * 4
        return int((chunk * per_token + scores) * COMPUTE_MARGIN)


class _Reader:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:  # skipped: only scalars drive the plan
            sub, count = self.take("<I"), self.take("<Q")
            if sub == _STRING:
                for _ in range(count):
                    length = self.take("<Q")  # (take moves pos: not in one += statement)
                    self.pos += length
            else:
                self.pos += count * struct.calcsize(_SCALARS[sub])
            return None
        return self.take(_SCALARS[vtype])


def _parse(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int]]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ClientInputError(f"{path} is not a GGUF file (bad magic)")
        r = _Reader(buf)
        r.pos = 4
        r.take("<I")  # version
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            kv[key] = r.value(r.take("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            dims = tuple(r.take("<Q") for _ in range(r.take("<I")))
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(r.take("<I"))]
            r.take("<Q")  # offset
            tensors.append((name, dims, math.prod(dims) // block * size))
    return kv, tensors


def read_gguf_footprint(path: Path | str) -> GgufFootprint:
    """Read a GGUF base's sizes from its header.

    Raises:
        ClientInputError: not a GGUF model file, or one without the keys a plan needs.
    """
    gguf_path = Path(path)
    try:
        kv, tensors = _parse(gguf_path)
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise ClientInputError(f"{gguf_path} is not a readable GGUF file: {e}") from e
    arch = kv.get("general.architecture")
    if kv.get("general.type", "model") != "model" or not isinstance(arch, str):
        raise ClientInputError(f"{gguf_path} is not a GGUF model (an adapter or other file)")
    try:
        n_embd = int(kv[f"{arch}.embedding_length"])
        n_head = int(kv[f"{arch}.attention.head_count"])
        shapes = {name: dims for name, dims, _ in tensors}
        return GgufFootprint(
            path=gguf_path,
            arch=arch,
            n_layer=int(kv[f"{arch}.block_count"]),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(kv.get(f"{arch}.attention.head_count_kv", n_head)),
            head_dim=int(kv.get(f"{arch}.attention.key_length", n_embd // n_head)),
            n_ff=int(kv[f"{arch}.feed_forward_length"]),
            n_vocab=int(shapes["token_embd.weight"][1]),
            n_ctx_train=int(kv[f"{arch}.context_length"]),
            weights_bytes=sum(n for _, _, n in tensors),
            largest_tensor_bytes=max(n for _, _, n in tensors),
            tensor_shapes=shapes,
        )
    except KeyError as e:
        raise ClientInputError(f"{gguf_path} lacks GGUF metadata {e} a runtime needs") from e


def plan_llamacpp_memory(
    footprint: GgufFootprint,
    budget_bytes: int,
    *,
    adapter_bytes: int = 0,
    chunk_tokens: int = 32,
) -> MemoryPlan:
    """Split ``budget_bytes`` into weights, adapter, buffers and a KV cache.

    Raises:
        BudgetTooSmallError: the budget cannot hold the weights, the adapter, the
            buffers and a ``CTX_STEP``-token cache; carries ``needed_bytes``.
    """
    fixed = FIXED_OVERHEAD_BYTES + footprint.largest_tensor_bytes
    base = footprint.weights_bytes + adapter_bytes + fixed

    def need(n_ctx: int) -> int:
        c = min(chunk_tokens, n_ctx)
        return (
            base
            + c * footprint.n_vocab * 4
            + footprint.compute_bytes(c, n_ctx)
            + n_ctx * footprint.kv_bytes_per_token
        )

    minimum = need(CTX_STEP)
    if budget_bytes < minimum:
        raise BudgetTooSmallError(
            f"memory budget {budget_bytes / MIB:.1f} MiB is too small: the GGUF base needs "
            f"at least {math.ceil(minimum / MIB)} MiB (weights "
            f"{footprint.weights_bytes / MIB:.1f} MiB, adapter {adapter_bytes / MIB:.1f} "
            f"MiB, buffers and a {CTX_STEP}-token cache); raise --budget-mb",
            needed_bytes=minimum,
        )
    n_ctx = CTX_STEP
    ceiling = max(CTX_STEP, footprint.n_ctx_train // CTX_STEP * CTX_STEP)
    while n_ctx + CTX_STEP <= ceiling and need(n_ctx + CTX_STEP) <= budget_bytes:
        n_ctx += CTX_STEP
    c = min(chunk_tokens, n_ctx)
    return MemoryPlan(
        budget_bytes=budget_bytes,
        weights_bytes=footprint.weights_bytes,
        adapter_bytes=adapter_bytes,
        fixed_bytes=fixed,
        working_bytes=c * footprint.n_vocab * 4 + footprint.compute_bytes(c, n_ctx),
        kv_capacity_tokens=n_ctx,
        prefill_chunk_tokens=c,
    )
