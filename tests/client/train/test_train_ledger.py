"""Privacy ledger: persistence across restarts, budget enforcement (THREATS G38)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.train import (
    LEDGER_FILE,
    DPRound,
    DPSettings,
    LedgerError,
    LocalTrainer,
    PrivacyLedger,
    TrainSettings,
    compute_epsilon,
)

ROUND = DPRound(noise_multiplier=1.0, sample_rate=0.25, steps=10)


def test_ledger_survives_restart_and_composes_rounds(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, epsilon_budget=50.0)
    assert ledger.path == tmp_path / LEDGER_FILE and ledger.spent_epsilon() == 0.0
    first = ledger.record(ROUND)
    second = ledger.record(ROUND)
    reopened = PrivacyLedger(tmp_path)  # a new process: nothing but the file
    assert reopened.rounds == (ROUND, ROUND)
    assert reopened.epsilon_budget == 50.0
    assert reopened.spent_epsilon() == pytest.approx(second)
    assert second > first
    assert second == pytest.approx(compute_epsilon([DPRound(1.0, 0.25, 20)], delta=1e-5))
    assert [p.name for p in tmp_path.iterdir()] == [LEDGER_FILE]  # no temp files left


def test_budget_can_only_be_tightened_on_reopen(tmp_path: Path) -> None:
    PrivacyLedger(tmp_path, epsilon_budget=5.0)
    assert PrivacyLedger(tmp_path, epsilon_budget=100.0).epsilon_budget == 5.0
    assert PrivacyLedger(tmp_path, epsilon_budget=2.0).epsilon_budget == 2.0
    assert PrivacyLedger(tmp_path).epsilon_budget == 2.0


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("{not json", id="torn"),
        pytest.param(json.dumps({"format": 99, "rounds": [], "delta": 1e-5}), id="format"),
        pytest.param(json.dumps({"format": 1, "delta": 1e-5}), id="no-rounds"),
        pytest.param(
            json.dumps(
                {
                    "format": 1,
                    "delta": 1e-5,
                    "rounds": [
                        {"mechanism": {"noise_multiplier": -1, "sample_rate": 0.1, "steps": 1}}
                    ],
                }
            ),
            id="bad-mechanism",
        ),
    ],
)
def test_corrupt_ledger_is_an_error_not_a_fresh_start(tmp_path: Path, content: str) -> None:
    (tmp_path / LEDGER_FILE).write_text(content)
    with pytest.raises(LedgerError, match="corrupt"):
        PrivacyLedger(tmp_path)


def test_delta_is_fixed_for_the_ledger_life(tmp_path: Path) -> None:
    PrivacyLedger(tmp_path, delta=1e-5)
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger(tmp_path, delta=1e-6)


def test_g38_trainer_stops_when_the_budget_is_spent_and_after_restart(
    trainer: LocalTrainer, texts: list[str], tmp_path: Path
) -> None:
    settings = TrainSettings(local_steps=3, batch_size=8, seq_len=32, learning_rate=1e-2)
    dp = DPSettings(enabled=True, noise_multiplier=1.0, accountant="rdp")
    one_round = trainer.train(None, texts, settings, dp)  # no ledger: this round only
    assert one_round.status == "ok" and one_round.epsilon is not None
    assert one_round.sample_rate is not None
    two_rounds = compute_epsilon(
        [DPRound(1.0, one_round.sample_rate, 6)], delta=dp.delta, accountant="rdp"
    )
    budget = (one_round.epsilon + two_rounds) / 2  # room for one round, not two
    ledger = PrivacyLedger(tmp_path, accountant="rdp", epsilon_budget=budget)
    first = trainer.train(None, texts, settings, dp, ledger)
    assert first.status == "ok" and first.epsilon == pytest.approx(one_round.epsilon)

    restarted = PrivacyLedger(tmp_path, accountant="rdp")  # process restart
    second = trainer.train(first.adapter, texts, settings, dp, restarted)
    assert second.status == "budget_exhausted" and second.steps == 0
    assert "budget exhausted" in second.message and f"{first.epsilon:.3f}" in second.message
    assert restarted.spent_epsilon() == pytest.approx(first.epsilon)  # nothing charged
    for name, tensor in first.adapter.items():  # the incoming adapter, untouched
        assert (second.adapter[name] == tensor).all()


def test_dp_settings_budget_caps_without_a_ledger(trainer: LocalTrainer, texts: list[str]) -> None:
    settings = TrainSettings(local_steps=3, batch_size=8, seq_len=32)
    dp = DPSettings(enabled=True, noise_multiplier=0.5, accountant="rdp", epsilon_budget=0.1)
    result = trainer.train(None, texts, settings, dp)
    assert result.status == "budget_exhausted" and result.steps == 0


def test_target_epsilon_over_planned_rounds_stays_within_target(
    trainer: LocalTrainer, texts: list[str], tmp_path: Path
) -> None:
    settings = TrainSettings(local_steps=3, batch_size=8, seq_len=32, planned_rounds=2)
    dp = DPSettings(enabled=True, target_epsilon=6.0, accountant="rdp", epsilon_budget=6.0)
    ledger = PrivacyLedger(tmp_path, accountant="rdp")
    r1 = trainer.train(None, texts, settings, dp, ledger)
    r2 = trainer.train(r1.adapter, texts, settings, dp, ledger)
    assert r1.status == r2.status == "ok"
    assert r1.epsilon is not None and r2.epsilon is not None
    assert r1.epsilon < r2.epsilon <= 6.0
    assert r2.epsilon == pytest.approx(6.0, rel=0.02)  # sigma is calibrated, not loose
    r3 = trainer.train(r2.adapter, texts, settings, dp, ledger)
    assert r3.status == "budget_exhausted"
