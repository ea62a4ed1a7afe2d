"""The LoRA rank a phone trains, sized to its memory budget (ADR 0016)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from client.train import (
    LocalTrainer,
    LoraSettings,
    ModelFootprint,
    TrainConfigError,
    choose_rank,
    estimate_peak_bytes,
    scaled_alpha,
)
from client.train.rank import footprint_at_rank
from protocol import truncate_to_rank

MIB = 1 << 20
# Qwen2-0.5B-like at rank 8 on every projection: 4.4 M LoRA parameters.
PHONE = ModelFootprint(
    weights_bytes=400 * MIB, lora_params=4_400_000, trainable_params=4_400_000, hidden=896,
    intermediate=4864, layers=24, heads=14, vocab=151_936, max_positions=32_768,
    largest_linear=896 * 4864,
)  # fmt: skip
RANKS = (4, 8, 16)


def _need(rank: int, *, batch: int = 8, seq: int = 128, dp: bool = True) -> int:
    fp = footprint_at_rank(PHONE, 8, rank)
    return estimate_peak_bytes(fp, physical_batch_size=batch, seq_len=seq, dp=dp)


def _choose(budget: int | None, **kw: object) -> int:
    args: dict[str, object] = dict(
        measured_rank=8, allowed=RANKS, budget_bytes=budget, logical_batch_size=8,
        seq_len=128, dp=True,
    )  # fmt: skip
    return choose_rank(PHONE, **{**args, **kw}).rank  # type: ignore[arg-type]


def test_lora_parameters_scale_linearly_with_the_rank() -> None:
    fp = footprint_at_rank(PHONE, 8, 16)
    assert (fp.lora_params, fp.trainable_params) == (8_800_000, 8_800_000)
    assert footprint_at_rank(PHONE, 8, 4).lora_params == 2_200_000
    assert dataclasses.replace(fp, lora_params=0, trainable_params=0) == dataclasses.replace(
        PHONE, lora_params=0, trainable_params=0
    )
    assert _need(4) < _need(8) < _need(16)


def test_the_largest_rank_that_fits_is_chosen() -> None:
    assert _choose(_need(4)) == 4
    assert _choose(_need(8) - 1) == 4
    assert _choose(_need(8)) == 8
    assert _choose(_need(16) - 1) == 8
    assert _choose(_need(16)) == 16
    assert _choose(None) == 16  # no budget: the largest rank
    assert _choose(10 * _need(16), allowed=(2, 4)) == 4


def test_a_larger_rank_never_costs_sequence_length_or_batch() -> None:
    """Just below rank 16's need at full batch: rank 16 at a smaller batch would fit,
    but the phone keeps rank 8 and the batch rank 4 affords."""
    budget = _need(16) - 1
    assert (
        estimate_peak_bytes(
            footprint_at_rank(PHONE, 8, 16), physical_batch_size=4, seq_len=128, dp=True
        )
        <= budget
    )
    choice = choose_rank(
        PHONE, measured_rank=8, allowed=RANKS, budget_bytes=budget, logical_batch_size=8,
        seq_len=128, dp=True,
    )  # fmt: skip
    assert (choice.rank, choice.physical_batch_size, choice.seq_len, choice.fits) == (
        8,
        8,
        128,
        True,
    )
    assert choice.estimated_peak_bytes == _need(8)


def test_a_budget_below_the_smallest_rank_gets_the_smallest_rank_marked_unfit() -> None:
    choice = choose_rank(
        PHONE, measured_rank=8, allowed=RANKS, budget_bytes=PHONE.weights_bytes,
        logical_batch_size=8, seq_len=128, dp=True,
    )  # fmt: skip
    assert (choice.rank, choice.fits) == (4, False)


def test_bad_rank_sets_are_refused() -> None:
    with pytest.raises(TrainConfigError, match="allowed LoRA ranks must be >= 1"):
        _choose(None, allowed=())
    with pytest.raises(TrainConfigError, match="allowed LoRA ranks must be >= 1"):
        _choose(None, allowed=(0, 4))


def test_the_alpha_keeps_the_global_scale() -> None:
    assert scaled_alpha(32.0, 4, 16) == 8.0
    assert (
        LoraSettings(rank=4, alpha=scaled_alpha(32.0, 4, 16)).scale
        == LoraSettings(rank=16, alpha=32.0).scale
    )


def test_a_lower_rank_phone_holds_the_first_slices_of_the_global_seeded_init(
    word_base: Path,
) -> None:
    """FFA: a rank-2 phone's frozen A is the first 2 rows of the rank-4 A (nested init),
    and its footprint is what the linear scaling predicts."""
    big = LocalTrainer(word_base, LoraSettings(rank=4, alpha=8.0, ffa=True, init_seed=7))
    small = LocalTrainer(
        word_base,
        LoraSettings(rank=2, alpha=4.0, ffa=True, init_seed=7, init_rank=4),
    )
    full_big = big.full_adapter(None)
    full_small = small.full_adapter(None)
    want = truncate_to_rank(full_big, 2)
    assert set(full_small) == set(want)
    for name, tensor in full_small.items():
        assert torch.equal(tensor, want[name]), name
    assert small.footprint == footprint_at_rank(big.footprint, 4, 2)
    # Without init_rank the rank-2 init is drawn afresh: not the global's slices.
    fresh = LocalTrainer(word_base, LoraSettings(rank=2, alpha=4.0, ffa=True, init_seed=7))
    a = next(n for n in want if ".lora_A." in n)
    assert not torch.equal(fresh.full_adapter(None)[a], want[a])


def test_init_rank_below_the_rank_is_refused() -> None:
    with pytest.raises(TrainConfigError, match="init_rank must be >= rank 4"):
        LoraSettings(rank=4, alpha=8.0, init_rank=2)
