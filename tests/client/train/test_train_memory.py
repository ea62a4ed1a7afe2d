"""Memory-aware training plans: shrink to fit, accumulate to keep the logical batch, refuse."""

from __future__ import annotations

import pytest

from client.train import (
    DPSettings,
    LocalTrainer,
    MemoryBudgetError,
    ModelFootprint,
    TrainSettings,
    estimate_peak_bytes,
    plan_training,
)

MIB = 1 << 20
# Roughly a 0.5B-parameter NF4 model with rank-8 LoRA on all projections.
PHONE = ModelFootprint(
    weights_bytes=400 * MIB, lora_params=4_400_000, trainable_params=4_400_000, hidden=896,
    intermediate=4864, layers=24, heads=14, vocab=151_936, max_positions=32_768,
    largest_linear=896 * 4864,
)  # fmt: skip


def test_estimate_grows_with_batch_seq_and_dp() -> None:
    base = estimate_peak_bytes(PHONE, physical_batch_size=1, seq_len=64, dp=False)
    assert base > PHONE.weights_bytes
    assert estimate_peak_bytes(PHONE, physical_batch_size=2, seq_len=64, dp=False) > base
    assert estimate_peak_bytes(PHONE, physical_batch_size=1, seq_len=128, dp=False) > base
    assert estimate_peak_bytes(PHONE, physical_batch_size=1, seq_len=64, dp=True) > base


def test_unbounded_budget_keeps_the_requested_shape() -> None:
    plan = plan_training(PHONE, budget_bytes=None, logical_batch_size=8, seq_len=None, dp=True)
    assert (plan.seq_len, plan.physical_batch_size) == (128, 8)  # logical batch as given


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_plans_shrink_batch_first_then_sequence_as_the_budget_shrinks(dp: bool) -> None:
    plans = []
    for budget_mib in (12000, 3000, 1500, 1000, 800, 760):
        plan = plan_training(
            PHONE, budget_bytes=budget_mib * MIB, logical_batch_size=8, seq_len=None, dp=dp
        )
        assert plan.estimated_peak_bytes <= budget_mib * MIB
        plans.append((plan.seq_len, plan.physical_batch_size))
    assert plans == sorted(plans, reverse=True)  # never grows as memory shrinks
    assert plans[0] == (128, 8) and plans[-1][1] == 1
    assert len(set(plans)) >= 4


def test_a_budget_below_the_smallest_setting_is_refused_clearly() -> None:
    with pytest.raises(MemoryBudgetError) as info:
        plan_training(PHONE, budget_bytes=300 * MIB, logical_batch_size=8, seq_len=None, dp=True)
    message = str(info.value)
    assert "seq_len=16" in message and "300 MiB" in message and "400 MiB" in message
    assert "Grant at least" in message


def test_trainer_refuses_before_touching_the_model(trainer: LocalTrainer, texts: list[str]) -> None:
    digest = trainer.base_digest()
    settings = TrainSettings(memory_budget_bytes=trainer.footprint.weights_bytes)
    with pytest.raises(MemoryBudgetError, match="does not fit"):
        trainer.train(None, texts, settings, DPSettings())
    assert trainer.base_digest() == digest


def test_tight_budget_trains_with_micro_batches_under_dp(
    trainer: LocalTrainer, texts: list[str]
) -> None:
    """Opacus BatchMemoryManager path: physical batch < logical batch, same DP mechanism."""
    fp = trainer.footprint
    fits_two = estimate_peak_bytes(fp, physical_batch_size=2, seq_len=32, dp=True)
    settings = TrainSettings(local_steps=3, batch_size=8, seq_len=32, memory_budget_bytes=fits_two)
    dp = DPSettings(enabled=True, noise_multiplier=1.0, accountant="rdp")
    result = trainer.train(None, texts, settings, dp)
    assert result.status == "ok" and result.steps == 3
    assert result.batch_size == 8 and result.physical_batch_size == 2
    assert result.estimated_peak_bytes <= fits_two
    unbounded = trainer.train(
        None, texts, TrainSettings(local_steps=3, batch_size=8, seq_len=32), dp
    )
    assert unbounded.physical_batch_size > 8  # Poisson headroom, no split needed
    assert result.sample_rate == unbounded.sample_rate  # accounting unchanged by splitting
    assert result.epsilon == pytest.approx(unbounded.epsilon)
