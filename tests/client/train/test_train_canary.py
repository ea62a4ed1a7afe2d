"""Canary audit at the trainer level (THREATS G36): DP is actually applied.

Three secrets are planted 3 times each in one client's data. Without DP the trainer
memorises them (exposure near the maximum log2(R) bits: each ranks first among R
same-format candidates); with DP-SGD at epsilon=8 the same training leaves them near
chance (mean exposure near 1/ln 2 = 1.44 bits). Seeded; the gap is the test's power.

Why 3 copies: record-level epsilon is per text, so a secret written k times is
protected only at group level (about k * epsilon). Ten copies (epsilon ~ 80) is beyond
what the guarantee covers; once DP-SGD sampled one text per block (not packed blocks)
it got enough signal to partly learn a 10-copy canary (3.2 bits), while 3 copies are
memorised fully without DP (6.0 bits) and stay near chance with it (1.9 bits).
"""

from __future__ import annotations

import math
import random

import pytest

from client.train import DPSettings, LocalTrainer, TrainSettings, canary_exposure
from tests.client.train.helpers import background_texts

PREFIXES = ("alice pin is", "bob code is", "carol key number is")
CANDIDATES = 63  # R = 64 texts per audit: max exposure 6 bits
COPIES = 3  # see the module docstring
SETTINGS = TrainSettings(local_steps=60, learning_rate=2e-2, batch_size=8, seq_len=32, seed=0)


def _secret(rng: random.Random) -> str:
    return " ".join(str(rng.randrange(10)) for _ in range(6))


@pytest.fixture(scope="module")
def planted() -> tuple[list[str], list[tuple[str, list[str]]]]:
    rng = random.Random(2026)
    audits = []
    for prefix in PREFIXES:
        canary = f"{prefix} {_secret(rng)} ."
        others: set[str] = set()
        while len(others) < CANDIDATES:
            text = f"{prefix} {_secret(rng)} ."
            if text != canary:
                others.add(text)
        audits.append((canary, sorted(others)))
    data = background_texts(60, seed=5) + [c for c, _ in audits for _ in range(COPIES)]
    random.Random(0).shuffle(data)
    return data, audits


def _mean_exposure(trainer: LocalTrainer, adapter, audits) -> float:  # type: ignore[no-untyped-def]
    return sum(canary_exposure(trainer, adapter, c, o) for c, o in audits) / len(audits)


def test_g36_canary_memorised_without_dp_and_not_with_dp(
    trainer: LocalTrainer, planted: tuple[list[str], list[tuple[str, list[str]]]]
) -> None:
    data, audits = planted
    top = math.log2(CANDIDATES + 1)
    before = _mean_exposure(trainer, None, audits)
    plain = trainer.train(None, data, SETTINGS, DPSettings())
    private = trainer.train(
        None, data, SETTINGS, DPSettings(enabled=True, target_epsilon=8.0, max_grad_norm=1.0)
    )
    exposed = _mean_exposure(trainer, plain.adapter, audits)
    protected = _mean_exposure(trainer, private.adapter, audits)
    assert private.epsilon is not None and private.epsilon <= 8.0
    assert before < 3.5, "the untrained model must not already favour the canaries"
    assert exposed >= top - 1.0, f"no power: without DP exposure is only {exposed:.2f} bits"
    assert protected <= 3.0, f"DP run memorised the canaries: {protected:.2f} bits"
