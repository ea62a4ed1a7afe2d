"""User-level privacy accounting for central DP-FedAvg.

The guarantee is *user-level*: neighbouring data sets differ by all the data of one
client (add/remove one user). Each round is one Poisson-subsampled Gaussian mechanism
with sampling rate ``q`` (the rate the server actually sampled with) and noise
multiplier ``σ``; rounds compose. ε comes from Google's maintained ``dp-accounting``
privacy-loss-distribution (PLD) accountant — tight, and checked against Opacus' PRV
accountant, an independent implementation (THREATS G35, docs/threats.md) — rebuilt
from the recorded events, so the state is a small JSON value that a checkpoint can
carry.

This is never mixed up with the *record-level* ε that each phone's Opacus ledger
reports: the summary carries both, under different names.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RoundEvent", "UserLevelAccountant", "calibrate_noise_multiplier"]

#: PLD discretisation: ε is over-estimated by at most about this much per composition.
_DISCRETIZATION = 1e-3


def _fresh(*, coarse: bool = False) -> Any:
    from dp_accounting import pld

    return pld.PLDAccountant(
        value_discretization_interval=10 * _DISCRETIZATION if coarse else _DISCRETIZATION
    )


@dataclass(frozen=True)
class RoundEvent:
    """One round's mechanism: Poisson client sampling at ``sample_rate``, Gaussian noise."""

    sample_rate: float
    noise_multiplier: float


def _epsilon(events: list[RoundEvent], delta: float) -> float:
    import dp_accounting

    if not events:
        return 0.0
    if any(ev.noise_multiplier <= 0 for ev in events):
        return math.inf
    accountant = _fresh()
    # Runs of identical rounds are composed at once (self-composition of the PLD).
    for ev, run in itertools.groupby(events):
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(
                ev.sample_rate, dp_accounting.GaussianDpEvent(ev.noise_multiplier)
            ),
            sum(1 for _ in run),
        )
    return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(
    *, target_epsilon: float, sample_rate: float, rounds: int, delta: float
) -> float:
    """The smallest σ whose ε after ``rounds`` rounds at ``sample_rate`` is ≤ target.

    Raises:
        ValueError: a non-positive target ε or rounds, or ``sample_rate`` outside (0, 1].
    """
    import dp_accounting

    if target_epsilon <= 0 or rounds <= 0 or not 0 < sample_rate <= 1:
        raise ValueError(
            f"cannot calibrate noise for ε={target_epsilon}, rounds={rounds}, "
            f"q={sample_rate}: need ε > 0, rounds > 0 and 0 < q ≤ 1"
        )

    def event(sigma: float) -> Any:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(sigma)),
            rounds,
        )

    # Bisect with a coarse (pessimistic, fast) PLD, then confirm with the reporting one.
    sigma = float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _fresh(coarse=True),
            event,
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(0.1, 1.0),
            tol=1e-3,
        )
    )
    while _epsilon([RoundEvent(sample_rate, sigma)] * rounds, delta) > target_epsilon:
        sigma *= 1.005
    return sigma


@dataclass
class UserLevelAccountant:
    """The server's running user-level ε: one :class:`RoundEvent` per noised round.

    Attributes:
        delta: the δ every ε is reported at.
        events: the mechanisms composed so far, in round order.
    """

    delta: float
    events: list[RoundEvent] = field(default_factory=list)

    def record_round(self, *, sample_rate: float, noise_multiplier: float) -> float:
        """Compose one more round and return the cumulative ε."""
        self.events.append(RoundEvent(sample_rate, noise_multiplier))
        return self.epsilon()

    def epsilon(self) -> float:
        """Cumulative ε at ``delta`` over every recorded round (0.0 before any)."""
        return _epsilon(self.events, self.delta)

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot for checkpoints."""
        return {
            "delta": self.delta,
            "events": [[e.sample_rate, e.noise_multiplier] for e in self.events],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> UserLevelAccountant:
        """Rebuild from :meth:`state` output.

        Raises:
            KeyError: the snapshot lacks ``delta`` or ``events``.
        """
        return cls(
            delta=float(state["delta"]),
            events=[RoundEvent(float(q), float(s)) for q, s in state["events"]],
        )
