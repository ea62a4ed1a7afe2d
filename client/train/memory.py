"""Memory-aware training plans: pick sequence length and physical batch to fit a budget.

The estimate is weights (measured: bytes of every parameter and buffer of the loaded
NF4 model) + LoRA state (parameters, gradients, AdamW moments, DP accumulators) +
DP per-sample gradients (``hooks`` mode) + activations (computed per token from the
model config: what autograd keeps for a Llama-style decoder layer, attention scores,
and the logits with their cross-entropy workspace) + the transient fp32 copy of the
largest dequantised NF4 weight (measured from the loaded ``Linear4bit`` modules).
``ACTIVATION_SAFETY`` covers allocator slack; it was set so that the estimate is at
least the peak RSS growth that ``benchmarks/bench_client_train.py`` measures on the
``tiny`` preset's shape (batch 8 x 64 tokens; figures in docs/benchmarks.md,
"On-device training step"). DP estimates are for the Poisson headroom batch, so they
exceed the measured mean-batch growth.

A larger logical batch than fits is reached by gradient accumulation (Opacus
``BatchMemoryManager`` under DP), which leaves the DP guarantee unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from client.train.errors import MemoryBudgetError

__all__ = ["ModelFootprint", "TrainPlan", "estimate_peak_bytes", "footprint", "plan_training"]

FLOAT_BYTES = 4
ACTIVATION_SAFETY = 1.7
DEFAULT_SEQ_LENS = (128, 64, 32, 16)
MIB = 1 << 20


@dataclass(frozen=True)
class ModelFootprint:
    """Sizes the estimate needs, measured from a loaded PEFT model."""

    weights_bytes: int
    lora_params: int
    trainable_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    max_positions: int
    largest_linear: int


@dataclass(frozen=True)
class TrainPlan:
    """What fits: tokens per block, samples per forward pass, estimated peak bytes."""

    seq_len: int
    physical_batch_size: int
    estimated_peak_bytes: int


def footprint(peft_model: Any) -> ModelFootprint:
    """Measure a loaded PEFT model (weights in bytes, LoRA sizes, config dims)."""
    weights = 0
    lora = trainable = 0
    for name, p in peft_model.named_parameters():
        if ".lora_" in name:
            lora += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        else:
            weights += p.numel() * p.element_size()
    weights += sum(b.numel() * b.element_size() for b in peft_model.buffers())
    # The largest NF4 weight is dequantised to fp32 transiently in forward and backward.
    largest = max(
        (int(m.in_features) * int(m.out_features) for m in peft_model.modules()
         if type(m).__name__ == "Linear4bit" and hasattr(m, "in_features")),
        default=0,
    )  # fmt: skip
    cfg = peft_model.get_base_model().config
    hidden = int(cfg.hidden_size)
    inter = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
    return ModelFootprint(
        weights_bytes=weights,
        lora_params=lora,
        trainable_params=trainable,
        hidden=hidden,
        intermediate=inter,
        layers=int(cfg.num_hidden_layers),
        heads=int(cfg.num_attention_heads),
        vocab=int(cfg.vocab_size),
        max_positions=int(getattr(cfg, "max_position_embeddings", 2048) or 2048),
        largest_linear=largest,
    )


def estimate_peak_bytes(
    fp: ModelFootprint, *, physical_batch_size: int, seq_len: int, dp: bool, ghost: bool = False
) -> int:
    """Estimated peak training memory for one forward/backward/step.

    Args:
        fp: the model's footprint.
        physical_batch_size: samples per forward pass.
        seq_len: tokens per sample.
        dp: DP-SGD (adds per-sample gradients or norms and the clipped-sum buffer).
        ghost: Opacus ghost clipping (per-sample norms from T x T Gram matrices
            instead of materialised per-sample gradients).
    """
    tokens = physical_batch_size * seq_len
    per_layer = 12 * fp.hidden + 5 * fp.intermediate + 3 * fp.heads * seq_len
    # logits, their contiguous copy for cross-entropy, log-softmax, and their gradient
    head = 2 * fp.hidden + 4 * fp.vocab
    activations = tokens * (fp.layers * per_layer + head) * FLOAT_BYTES
    # LoRA params + grads + AdamW exp_avg/exp_avg_sq (+ DP summed_grad).
    lora_state = (fp.lora_params + fp.trainable_params * (4 if dp else 3)) * FLOAT_BYTES
    per_sample = 0
    if dp and ghost:
        modules = 7 * fp.layers
        per_sample = 2 * modules * physical_batch_size * seq_len * seq_len * FLOAT_BYTES
    elif dp:
        per_sample = 2 * physical_batch_size * fp.trainable_params * FLOAT_BYTES
    dequant = 2 * fp.largest_linear * FLOAT_BYTES
    inputs = 3 * tokens * 8
    dynamic = ACTIVATION_SAFETY * (activations + per_sample + dequant + inputs)
    return int(fp.weights_bytes + lora_state + dynamic)


def _halvings(start: int) -> list[int]:
    out = []
    value = max(1, start)
    while True:
        out.append(value)
        if value == 1:
            return out
        value = max(1, value // 2)


def plan_training(
    fp: ModelFootprint,
    *,
    budget_bytes: int | None,
    logical_batch_size: int,
    seq_len: int | None,
    dp: bool,
    ghost: bool = False,
) -> TrainPlan:
    """Choose the longest sequence, then the largest physical batch, that fits.

    Args:
        fp: the model's footprint.
        budget_bytes: training memory budget; None = unbounded (no shrinking).
        logical_batch_size: the batch the optimizer step averages over.
        seq_len: fixed tokens per block, or None to choose from 128/64/32/16 (capped by
            the model's context).
        dp: DP-SGD on.
        ghost: Opacus ghost clipping.

    Returns:
        The plan; ``logical_batch_size / physical_batch_size`` micro-batches per step.

    Raises:
        MemoryBudgetError: even the smallest sequence length with batch 1 does not fit.
    """
    if seq_len is not None:
        seq_lens = [seq_len]
    else:
        seq_lens = [s for s in DEFAULT_SEQ_LENS if s <= fp.max_positions] or [fp.max_positions]
    batches = _halvings(logical_batch_size)
    for s in seq_lens:
        for b in batches:
            need = estimate_peak_bytes(fp, physical_batch_size=b, seq_len=s, dp=dp, ghost=ghost)
            if budget_bytes is None or need <= budget_bytes:
                return TrainPlan(seq_len=s, physical_batch_size=b, estimated_peak_bytes=need)
    smallest = estimate_peak_bytes(
        fp, physical_batch_size=1, seq_len=seq_lens[-1], dp=dp, ghost=ghost
    )
    raise MemoryBudgetError(
        f"training does not fit the memory budget: the smallest setting (seq_len="
        f"{seq_lens[-1]}, batch 1{', DP' if dp else ''}) needs about {math.ceil(smallest / MIB)} "
        f"MiB, of which {math.ceil(fp.weights_bytes / MIB)} MiB are the NF4 weights, but the "
        f"budget is {(budget_bytes or 0) // MIB} MiB. Grant at least "
        f"{math.ceil(smallest / MIB)} MiB for training, lower the LoRA rank, or skip "
        "training on this device"
    )
