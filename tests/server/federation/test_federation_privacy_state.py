"""User-level accountant and crash-safe checkpoints (THREATS G34, G35 for user-level ε)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server import ServerInputError
from server.federation import UserLevelAccountant, calibrate_noise_multiplier, load_latest
from server.federation.accountant import RoundEvent
from server.federation.checkpoint import Checkpoint, save_checkpoint


@pytest.mark.parametrize(
    ("q", "sigma", "rounds"),
    [(0.5, 1.0, 3), (0.01, 0.8, 100)],
    ids=["6-clients", "1-percent"],
)
def test_user_epsilon_agrees_with_opacus_prv_within_5_percent(
    q: float, sigma: float, rounds: int
) -> None:
    """Cross-check: dp-accounting's PLD vs Opacus' independent PRV accountant."""
    from opacus.accountants import PRVAccountant

    ours = UserLevelAccountant(delta=1e-5, events=[RoundEvent(q, sigma)] * rounds).epsilon()
    theirs = PRVAccountant()
    theirs.history = [(sigma, q, rounds)]
    assert ours == pytest.approx(theirs.get_epsilon(1e-5), rel=0.05)
    assert ours >= theirs.get_epsilon(1e-5) * 0.99  # never optimistic beyond rounding


def test_epsilon_grows_with_rounds_and_calibration_meets_the_target() -> None:
    sigma = calibrate_noise_multiplier(target_epsilon=8.0, sample_rate=0.5, rounds=3, delta=1e-5)
    acc = UserLevelAccountant(delta=1e-5)
    eps = [acc.record_round(sample_rate=0.5, noise_multiplier=sigma) for _ in range(3)]
    assert eps == sorted(eps) and eps[0] > 0
    assert 7.9 < eps[-1] <= 8.0
    looser = calibrate_noise_multiplier(target_epsilon=8.0, sample_rate=0.05, rounds=3, delta=1e-5)
    assert looser < sigma  # subsampling amplifies privacy: a bigger population needs less noise


def test_accountant_state_round_trips_through_json() -> None:
    acc = UserLevelAccountant(delta=1e-6)
    acc.record_round(sample_rate=0.2, noise_multiplier=1.3)
    back = UserLevelAccountant.from_state(json.loads(json.dumps(acc.state())))
    assert back.epsilon() == acc.epsilon() and back.delta == 1e-6


def test_checkpoint_round_trip_and_only_the_last_two_are_kept(tmp_path: Path) -> None:
    for r in range(4):
        adapter = {"b": np.full((2, 3), r, dtype=np.float32)}
        save_checkpoint(tmp_path, Checkpoint(r, adapter, {"history": [r]}))
    ckpt = load_latest(tmp_path)
    assert ckpt is not None and ckpt.round == 3 and ckpt.state == {"history": [3]}
    np.testing.assert_array_equal(ckpt.adapter["b"], np.full((2, 3), 3, dtype=np.float32))
    assert sorted(p.name for p in tmp_path.glob("round-*")) == ["round-0002", "round-0003"]


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, Checkpoint(1, {"b": np.ones(2, np.float32)}, {}))
    # what a crash during the next save leaves behind: a half-written temp directory
    half = tmp_path / ".round-0002.crashed"
    half.mkdir()
    (half / "global.safetensors").write_bytes(b"\x00garbage")
    ckpt = load_latest(tmp_path)
    assert ckpt is not None and ckpt.round == 1


def test_no_checkpoint_and_a_broken_one_are_told_apart(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None
    save_checkpoint(tmp_path, Checkpoint(1, {"b": np.ones(2, np.float32)}, {}))
    (tmp_path / "round-0001" / "global.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ServerInputError, match="delete"):
        load_latest(tmp_path)
