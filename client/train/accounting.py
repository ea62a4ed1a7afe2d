"""Record-level privacy accounting for DP-SGD rounds (Opacus accountants).

A device's privacy loss is fully described by the list of Gaussian mechanisms it ran:
(noise multiplier sigma, Poisson sampling rate q, number of steps) per round. Storing
that list, not an epsilon, is what lets the ledger recompose epsilon exactly with any
accountant after a restart. The PRV accountant (Gopi et al. 2021) is tight; RDP
(Mironov 2017) is an upper bound that is looser by typically 10-30%.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from client.train.errors import TrainConfigError

__all__ = ["DPRound", "compute_epsilon", "noise_multiplier_for"]

#: Absolute epsilon error the PRV accountant is asked for.
PRV_EPS_ERROR = 0.01


@dataclass(frozen=True)
class DPRound:
    """One DP-SGD round: ``steps`` Poisson-subsampled Gaussian mechanisms."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise TrainConfigError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise TrainConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise TrainConfigError(f"steps must be >= 0, got {self.steps}")


def _accountant(name: str, rounds: Sequence[DPRound]):  # type: ignore[no-untyped-def]
    from opacus.accountants import create_accountant

    if name not in ("prv", "rdp"):
        raise TrainConfigError(f"accountant must be 'prv' or 'rdp', got {name!r}")
    # Rounds with the same (sigma, q) compose like one longer round; merging them keeps
    # the PRV accountant's cost independent of the number of rounds.
    merged: dict[tuple[float, float], int] = {}
    for r in rounds:
        if r.steps > 0:
            key = (r.noise_multiplier, r.sample_rate)
            merged[key] = merged.get(key, 0) + r.steps
    acc = create_accountant(mechanism=name)
    acc.history = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    return acc


def compute_epsilon(rounds: Sequence[DPRound], *, delta: float, accountant: str = "prv") -> float:
    """Epsilon of the composition of ``rounds`` at ``delta``.

    Args:
        rounds: every DP round the device ran, in any order.
        delta: target delta.
        accountant: ``"prv"`` or ``"rdp"``.

    Returns:
        Epsilon (0.0 for no rounds).

    Raises:
        TrainConfigError: an unknown accountant name.
    """
    return _cached_epsilon(tuple(rounds), delta, accountant)


@functools.lru_cache(maxsize=256)
def _cached_epsilon(rounds: tuple[DPRound, ...], delta: float, accountant: str) -> float:
    acc = _accountant(accountant, rounds)
    if not acc.history:
        return 0.0
    if accountant == "prv":
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)
def noise_multiplier_for(
    target_epsilon: float,
    *,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
) -> float:
    """Smallest sigma such that ``steps`` steps at ``sample_rate`` stay within target epsilon.

    Args:
        target_epsilon: epsilon the whole run of ``steps`` steps may spend.
        delta: target delta.
        sample_rate: Poisson sampling rate actually used.
        steps: total steps the epsilon must cover.
        accountant: ``"prv"`` or ``"rdp"``.

    Returns:
        The noise multiplier (Opacus ``get_noise_multiplier``, tolerance 0.01).

    Raises:
        TrainConfigError: the target cannot be reached (e.g. epsilon too small).
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        )
    except ValueError as e:
        raise TrainConfigError(
            f"cannot reach epsilon={target_epsilon} at delta={delta} with sampling rate "
            f"{sample_rate:.4g} over {steps} steps: {e}; raise target_epsilon or lower steps"
        ) from e
