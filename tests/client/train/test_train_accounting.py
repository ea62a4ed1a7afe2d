"""Accounting: Opacus' epsilon vs Google's dp-accounting (THREATS G35), monotonicity."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from client.train import DPRound, TrainConfigError, compute_epsilon, noise_multiplier_for

DELTA = 1e-5


def _event(r: DPRound) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            r.sample_rate, dp_accounting.GaussianDpEvent(r.noise_multiplier)
        ),
        r.steps,
    )


def _independent(rounds: list[DPRound], accountant: str) -> float:
    acc = (
        pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
        if accountant == "prv"
        else rdp_privacy_accountant.RdpAccountant()
    )
    acc.compose(dp_accounting.ComposedDpEvent([_event(r) for r in rounds]))
    return float(acc.get_epsilon(DELTA))


# (sigma, q, steps): the regimes a phone sees (few blocks => large q, few local steps),
# plus one round-composition case. PRV is compared with PLD (both numerically tight),
# Opacus RDP with dp-accounting RDP.
CASES = [
    pytest.param([DPRound(1.0, 0.25, 10)], id="sigma1-q.25-10steps"),
    pytest.param([DPRound(0.8, 0.5, 20)], id="sigma.8-q.5-20steps"),
    pytest.param([DPRound(1.5, 0.1, 50)], id="sigma1.5-q.1-50steps"),
    pytest.param([DPRound(1.2, 0.25, 10)] * 3 + [DPRound(1.0, 0.5, 5)], id="four-rounds"),
]


@pytest.mark.parametrize("rounds", CASES)
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_g35_epsilon_agrees_with_dp_accounting_within_5_percent(
    rounds: list[DPRound], accountant: str
) -> None:
    ours = compute_epsilon(rounds, delta=DELTA, accountant=accountant)
    theirs = _independent(rounds, accountant)
    assert ours == pytest.approx(theirs, rel=0.05)


def test_noise_multiplier_for_reaches_the_target() -> None:
    sigma = noise_multiplier_for(8.0, delta=DELTA, sample_rate=0.25, steps=30, accountant="rdp")
    eps = compute_epsilon([DPRound(sigma, 0.25, 30)], delta=DELTA, accountant="rdp")
    assert 7.9 <= eps <= 8.0
    # a slightly smaller sigma would exceed the target: sigma is (near) the smallest
    assert compute_epsilon([DPRound(sigma * 0.97, 0.25, 30)], delta=DELTA, accountant="rdp") > 8.0


def test_unreachable_target_is_a_clear_error() -> None:
    with pytest.raises(TrainConfigError, match="raise target_epsilon"):
        noise_multiplier_for(1e-6, delta=DELTA, sample_rate=1.0, steps=1000, accountant="rdp")


def test_no_rounds_is_zero_epsilon() -> None:
    assert compute_epsilon([], delta=DELTA) == 0.0


@settings(max_examples=15, deadline=None)
@given(
    sigma=st.floats(0.5, 3.0),
    q=st.floats(0.01, 1.0),
    steps=st.integers(1, 200),
    extra=st.integers(1, 50),
)
def test_epsilon_is_monotonic_in_steps(sigma: float, q: float, steps: int, extra: int) -> None:
    fewer = compute_epsilon([DPRound(sigma, q, steps)], delta=DELTA, accountant="rdp")
    more = compute_epsilon([DPRound(sigma, q, steps + extra)], delta=DELTA, accountant="rdp")
    assert more >= fewer > 0
