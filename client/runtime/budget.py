"""Planning inference within a memory budget — before anything is allocated.

``budget_bytes`` is what the runtime may add on top of the interpreter and libraries
(peak RSS minus RSS before loading): weights + adapter + KV cache + activations + the
fixed cost of building the model. The planner reads sizes from the checkpoint's
safetensors header and ``config.json`` (no tensor is loaded), then:

* refuses a budget that cannot hold weights + adapter + minimal working memory, saying
  how many bytes are needed (THREATS H39);
* sizes a bounded KV cache from what is left, in tokens;
* fixes the prefill chunk so activations stay bounded whatever the prompt length.

The constants below were calibrated on this project's CI machine (x86-64, glibc, torch
CPU) by ``benchmarks/bench_runtime.py``; every request is still measured, and the test
suite checks that measured peaks never exceed the budget (THREATS H41).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from client.errors import ClientError

__all__ = [
    "BudgetTooSmallError",
    "MemoryPlan",
    "ModelFootprint",
    "footprint_from_checkpoint",
    "plan_memory",
]

MIB = 1024 * 1024
#: Python objects, module tree, allocator arenas and library kernels touched on first
#: use; measured on the tiny base with benchmarks/bench_runtime.py and rounded up
#: (docs/benchmarks.md, "Runtime vs the naive path (NF4)").
FIXED_OVERHEAD_BYTES = 32 * MIB
#: Activations are estimated analytically and multiplied by this margin.
ACTIVATION_MARGIN = 2.0
MIN_KV_TOKENS = 16
FLOAT_BYTES = 4


class BudgetTooSmallError(ClientError):
    """The memory budget cannot hold the model and its minimal working memory."""

    exit_code = 3

    def __init__(self, message: str, *, needed_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes


@dataclass(frozen=True)
class ModelFootprint:
    """Sizes that drive the plan, read from the checkpoint without loading it."""

    weights_bytes: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    largest_linear_elements: int

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * FLOAT_BYTES

    def activation_bytes(self, new_tokens: int, context_tokens: int) -> int:
        """Working memory of one forward pass over ``new_tokens`` with ``context_tokens``
        of attention context (analytic estimate, times ``ACTIVATION_MARGIN``)."""
        per_token = (6 * self.hidden_size + 3 * self.intermediate_size) * FLOAT_BYTES
        scores = 2 * self.num_heads * new_tokens * context_tokens * FLOAT_BYTES
        dequant = 2 * self.largest_linear_elements * FLOAT_BYTES  # bnb CPU dequantizes
        logits = 2 * self.vocab_size * FLOAT_BYTES  # only the last position is scored
        raw = new_tokens * per_token + scores + dequant + logits
        return int(raw * ACTIVATION_MARGIN)


def _header_bytes(model_dir: Path) -> int:
    total = 0
    for shard in model_dir.glob("*.safetensors"):
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                total += end - begin
    return total


def footprint_from_checkpoint(model_dir: Path | str) -> ModelFootprint:
    """Read a checkpoint's sizes from ``config.json`` and safetensors headers."""
    path = Path(model_dir)
    cfg = json.loads((path / "config.json").read_text())
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    inter = int(cfg.get("intermediate_size", 4 * hidden))
    vocab = int(cfg["vocab_size"])
    return ModelFootprint(
        weights_bytes=_header_bytes(path),
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        intermediate_size=inter,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=vocab,
        largest_linear_elements=max(hidden * inter, hidden * hidden),
    )


@dataclass(frozen=True)
class MemoryPlan:
    """How a budget is spent. All sizes in bytes unless the name says tokens."""

    budget_bytes: int
    weights_bytes: int
    adapter_bytes: int
    fixed_bytes: int
    working_bytes: int
    kv_capacity_tokens: int
    prefill_chunk_tokens: int

    @property
    def kv_bytes(self) -> int:
        return (
            self.budget_bytes
            - self.weights_bytes
            - self.adapter_bytes
            - self.fixed_bytes
            - self.working_bytes
        )


def plan_memory(
    footprint: ModelFootprint,
    budget_bytes: int,
    *,
    adapter_bytes: int = 0,
    prefill_chunk_tokens: int = 32,
) -> MemoryPlan:
    """Split ``budget_bytes`` into weights, adapter, working memory and KV cache.

    The working memory is sized for the largest step the runtime will take: a prefill
    chunk attending over a full cache. The cache then gets the rest, so the two are
    solved together: ``kv(n) + act(chunk, n) <= left``.

    Raises:
        BudgetTooSmallError: the budget cannot hold weights + adapter + minimal working
            memory + a minimal cache; the error carries ``needed_bytes``.
    """
    # Weights are counted twice: the file pages read while loading, and the tensors.
    fixed = FIXED_OVERHEAD_BYTES + footprint.weights_bytes
    base = footprint.weights_bytes + adapter_bytes + fixed
    chunk = prefill_chunk_tokens

    def need(kv_tokens: int) -> int:
        c = min(chunk, kv_tokens)
        return (
            base
            + kv_tokens * footprint.kv_bytes_per_token
            + footprint.activation_bytes(c, kv_tokens)
        )

    minimum = need(MIN_KV_TOKENS)
    if budget_bytes < minimum:
        raise BudgetTooSmallError(
            f"memory budget {budget_bytes / MIB:.1f} MiB is too small: the model needs at "
            f"least {math.ceil(minimum / MIB)} MiB (weights {footprint.weights_bytes / MIB:.1f} "
            f"MiB, adapter {adapter_bytes / MIB:.1f} MiB, working memory and a "
            f"{MIN_KV_TOKENS}-token cache); raise --budget-mb",
            needed_bytes=minimum,
        )
    lo, hi = MIN_KV_TOKENS, MIN_KV_TOKENS
    while need(hi * 2) <= budget_bytes and hi < 1 << 20:
        hi *= 2
    hi *= 2
    while hi - lo > 1:  # largest token count that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= budget_bytes else (lo, mid)
    working = footprint.activation_bytes(min(chunk, lo), lo)
    return MemoryPlan(
        budget_bytes=budget_bytes,
        weights_bytes=footprint.weights_bytes,
        adapter_bytes=adapter_bytes,
        fixed_bytes=fixed,
        working_bytes=working,
        kv_capacity_tokens=lo,
        prefill_chunk_tokens=min(chunk, lo),
    )
