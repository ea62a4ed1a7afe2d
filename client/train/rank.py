"""① train: the LoRA rank a phone trains, sized to its training memory budget.

A federation may allow several ranks (``RunConfig.lora_ranks``, e.g. ``4,8,16``); the
global adapter has the largest. Each phone trains the largest allowed rank whose
estimated training peak (:func:`client.train.memory.estimate_peak_bytes`) fits its
budget *at the training plan of the smallest allowed rank*: a larger rank may use the
memory a phone has left, but never costs it sequence length or batch size. A phone
whose budget does not even fit the smallest rank gets the smallest rank (its trainer
then refuses with the usual ``MemoryBudgetError``), and a phone without a budget gets
the largest rank.

LoRA parameters grow linearly with the rank (``r·(in + out)`` per adapted matrix), so
the footprint of any rank follows from the footprint measured at one rank
(:func:`footprint_at_rank`) without loading the model again.

Every phone keeps the LoRA scale of the global rank: ``alpha_r = alpha · r / R``
(:func:`scaled_alpha`), so the first ``r`` rank slices of the global adapter mean the
same update on a rank-``r`` phone as on a rank-``R`` one (ADR 0016).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from client.train.errors import MemoryBudgetError, TrainConfigError
from client.train.memory import DEFAULT_SEQ_LENS, ModelFootprint, estimate_peak_bytes, plan_training
from client.train.settings import DPSettings, TrainSettings
from client.train.trainer import LocalTrainer, planned_batch

__all__ = [
    "RankChoice",
    "choose_rank",
    "footprint_at_rank",
    "rank_for_trainer",
    "scaled_alpha",
]


@dataclasses.dataclass(frozen=True)
class RankChoice:
    """The rank a phone trains and why.

    Attributes:
        rank: the chosen LoRA rank.
        estimated_peak_bytes: the estimate at that rank (at the plan below).
        seq_len: tokens per block of the plan the ranks were compared at.
        physical_batch_size: samples per forward pass of that plan.
        fits: whether the estimate fits the budget (False: even the smallest rank
            does not; the trainer will refuse).
    """

    rank: int
    estimated_peak_bytes: int
    seq_len: int
    physical_batch_size: int
    fits: bool


def footprint_at_rank(fp: ModelFootprint, measured_rank: int, rank: int) -> ModelFootprint:
    """``fp`` (measured on a model with LoRA rank ``measured_rank``) at LoRA rank ``rank``.

    Raises:
        TrainConfigError: a rank below 1.
    """
    if measured_rank < 1 or rank < 1:
        raise TrainConfigError(f"LoRA ranks must be >= 1, got {measured_rank} and {rank}")
    lora = fp.lora_params * rank // measured_rank
    trainable = fp.trainable_params * rank // measured_rank
    return dataclasses.replace(fp, lora_params=lora, trainable_params=trainable)


def scaled_alpha(alpha: float, rank: int, global_rank: int) -> float:
    """The LoRA alpha of a rank-``rank`` phone that keeps the global scale ``alpha / R``."""
    return float(alpha) * rank / global_rank


def choose_rank(
    fp: ModelFootprint,
    *,
    measured_rank: int,
    allowed: Sequence[int],
    budget_bytes: int | None,
    logical_batch_size: int,
    seq_len: int | None,
    dp: bool,
    ghost: bool = False,
) -> RankChoice:
    """The largest rank of ``allowed`` whose training estimate fits ``budget_bytes``.

    Args:
        fp: the model's footprint, measured at LoRA rank ``measured_rank``.
        measured_rank: the rank ``fp`` was measured at.
        allowed: the ranks the federation allows.
        budget_bytes: the phone's training memory budget (``None``: unbounded).
        logical_batch_size, seq_len, dp, ghost: as for :func:`plan_training` (the
            caller adds the DP Poisson headroom to the batch, as the trainer does).

    Raises:
        TrainConfigError: ``allowed`` is empty or holds a rank below 1.
    """
    ranks = sorted(set(allowed))
    if not ranks or ranks[0] < 1:
        raise TrainConfigError(f"allowed LoRA ranks must be >= 1 and not empty, got {allowed}")
    smallest = footprint_at_rank(fp, measured_rank, ranks[0])
    try:
        plan = plan_training(
            smallest,
            budget_bytes=budget_bytes,
            logical_batch_size=logical_batch_size,
            seq_len=seq_len,
            dp=dp,
            ghost=ghost,
        )
    except MemoryBudgetError:
        seq = seq_len or min(DEFAULT_SEQ_LENS)
        need = estimate_peak_bytes(smallest, physical_batch_size=1, seq_len=seq, dp=dp, ghost=ghost)
        return RankChoice(ranks[0], need, seq, 1, fits=False)
    chosen = RankChoice(
        ranks[0], plan.estimated_peak_bytes, plan.seq_len, plan.physical_batch_size, fits=True
    )
    for rank in ranks[1:]:
        need = estimate_peak_bytes(
            footprint_at_rank(fp, measured_rank, rank),
            physical_batch_size=plan.physical_batch_size,
            seq_len=plan.seq_len,
            dp=dp,
            ghost=ghost,
        )
        if budget_bytes is not None and need > budget_bytes:
            break
        chosen = RankChoice(rank, need, plan.seq_len, plan.physical_batch_size, fits=True)
    return chosen


def rank_for_trainer(
    trainer: LocalTrainer, *, allowed: Sequence[int], settings: TrainSettings, dp: DPSettings
) -> RankChoice:
    """:func:`choose_rank` for the plan ``trainer.train`` would make with these settings
    (the footprint measured on ``trainer``'s model, at its rank)."""
    return choose_rank(
        trainer.footprint,
        measured_rank=trainer.lora.rank,
        allowed=allowed,
        budget_bytes=settings.memory_budget_bytes,
        logical_batch_size=planned_batch(settings, dp),
        seq_len=settings.seq_len,
        dp=dp.enabled,
        ghost=dp.enabled and dp.grad_sample_mode == "ghost",
    )
