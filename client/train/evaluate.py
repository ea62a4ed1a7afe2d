"""Held-out metrics of an adapter: next-token loss, perplexity, top-1 accuracy, and
per-text likelihoods for memorisation audits.

Invariant: metrics are token-weighted (each predicted token counts once, padding
never), so clients' results aggregate exactly by weighting with ``num_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from client.train._loops import per_sample_loss
from client.train.data import IGNORE_INDEX, Blocks, pack_texts
from client.train.settings import EvalResult

__all__ = ["evaluate_blocks", "score_texts"]

EVAL_BATCH = 8
SCORE_BATCH = 64


@torch.no_grad()
def evaluate_blocks(model: Any, blocks: Blocks) -> EvalResult:
    """Token-weighted next-token loss, perplexity and top-1 accuracy over ``blocks``."""
    total_loss = 0.0
    correct = tokens = 0
    for start in range(0, len(blocks), EVAL_BATCH):
        sl = slice(start, start + EVAL_BATCH)
        logits = model(
            input_ids=blocks.input_ids[sl], attention_mask=blocks.attention_mask[sl]
        ).logits[:, :-1]
        targets = blocks.labels[sl, 1:]
        mask = targets != IGNORE_INDEX
        ce = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX
        )
        total_loss += float(ce[mask].sum())
        correct += int((logits.argmax(-1) == targets)[mask].sum())
        tokens += int(mask.sum())
    if tokens == 0:
        return EvalResult(loss=math.nan, perplexity=math.nan, accuracy=0.0, num_tokens=0)
    loss = total_loss / tokens
    return EvalResult(loss, math.exp(min(loss, 700.0)), correct / tokens, tokens)


@torch.no_grad()
def score_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, device: str) -> list[float]:
    """Total negative log-likelihood (nats) of each text, one row per text."""
    out: list[float] = []
    for start in range(0, len(texts), SCORE_BATCH):
        chunk = list(texts[start : start + SCORE_BATCH])
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        longest = max(len(i) for i in ids) + 2
        blocks = pack_texts(tokenizer, chunk, longest, pack=False).to(device)
        nll = per_sample_loss(model, blocks.input_ids, blocks.attention_mask, blocks.labels)
        counts = (blocks.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
        out.extend((nll * counts).tolist())
    return out
