"""Memorisation audit: the exposure of a planted canary (Carlini et al., USENIX Sec 2019).

exposure = log2(|R|) - log2(rank), where the canary is ranked by model likelihood
among |R| texts of the same format (the canary plus ``len(candidates)`` random
alternatives; rank 1 = most likely). A memorised canary has exposure near
log2(|R|); one the model knows nothing about has expected exposure about
1 / ln 2 = 1.44 bits. This is how THREATS G36 checks that DP is actually applied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

__all__ = ["canary_exposure"]


class _Scorer(Protocol):
    def score(
        self, adapter: Mapping[str, torch.Tensor] | None, texts: Sequence[str]
    ) -> list[float]: ...


def canary_exposure(
    scorer: _Scorer,
    adapter: Mapping[str, torch.Tensor] | None,
    canary: str,
    candidates: Sequence[str],
) -> float:
    """Exposure (bits) of ``canary`` among ``candidates`` under ``adapter``.

    Args:
        scorer: anything with ``score(adapter, texts) -> NLL per text`` (a LocalTrainer).
        adapter: the adapter to audit.
        canary: the planted text.
        candidates: texts of the same format that were not planted (canary excluded).

    Returns:
        log2(len(candidates) + 1) - log2(rank); ties count against the canary.

    Raises:
        ValueError: ``candidates`` is empty or contains the canary.
    """
    if not candidates or canary in candidates:
        raise ValueError("candidates must be non-empty and must not contain the canary")
    nll = scorer.score(adapter, [canary, *candidates])
    rank = 1 + sum(1 for other in nll[1:] if other <= nll[0])
    return math.log2(len(candidates) + 1) - math.log2(rank)
