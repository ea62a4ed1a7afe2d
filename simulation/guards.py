"""Refusals around a federated run, so that a run which cannot or did not train is
never reported as a result.

* ``user_dp_cohort_problem`` — before the run: user-level DP samples every client
  independently each round (Poisson, rate ``q = clients-per-round / N``; ADR 0006), so
  a small population draws too few clients in many rounds, and such a round changes
  nothing while its ε is spent all the same.
* ``require_training`` — after the run: at least one round must have changed the
  global adapter (none sampled, all failed or all rejected are refused).
"""

from __future__ import annotations

import math
from typing import Any

from simulation.errors import NothingTrainedError

__all__ = ["MAX_SHORT_ROUND_CHANCE", "require_training", "user_dp_cohort_problem"]

# Under user-level DP each client is sampled independently (Poisson): at most this
# share of rounds may draw fewer clients than a round needs to change the model.
MAX_SHORT_ROUND_CHANCE = 0.01
_MAX_ROUNDS_LISTED = 3


def _short_round_chance(num_clients: int, rate: float, min_clients: int) -> float:
    """P(Binomial(num_clients, rate) < min_clients): a round draws too few clients."""
    return math.fsum(
        math.comb(num_clients, k) * rate**k * (1 - rate) ** (num_clients - k)
        for k in range(min(min_clients, num_clients + 1))
    )


def user_dp_cohort_problem(
    num_clients: int, clients_per_round: int, min_clients: int, *, clients_from: str = "--clients"
) -> str | None:
    """Why user-level DP's Poisson sampling would too often train too few clients.

    Each of ``num_clients`` clients trains in a round with probability
    ``q = min(1, clients_per_round / num_clients)`` (as ``LoraStrategy`` samples), so
    the cohort is Binomial(N, q): with small populations whole rounds draw fewer than
    ``min_clients`` and change nothing, while ε is spent all the same.

    Returns:
        ``None`` when at most ``MAX_SHORT_ROUND_CHANCE`` of rounds would fall short,
        else one line: the expected cohort, the chance, and what to change.
    """
    need = max(min_clients, 1)
    rate = min(1.0, clients_per_round / num_clients)
    chance = _short_round_chance(num_clients, rate, need)
    if chance <= MAX_SHORT_ROUND_CHANCE:
        return None
    head = (
        f"--dp-mode user samples each of the {num_clients} clients ({clients_from}) "
        f"independently each round at rate {rate:.3g}: the expected cohort is "
        f"{rate * num_clients:.3g} clients, and {100 * chance:.2g}% of rounds would draw "
        f"fewer than the {need} a round needs (at most {100 * MAX_SHORT_ROUND_CHANCE:g}% "
        "allowed); "
    )
    enough = next(
        (
            m
            for m in range(clients_per_round + 1, num_clients + 1)
            if _short_round_chance(num_clients, m / num_clients, need) <= MAX_SHORT_ROUND_CHANCE
        ),
        None,
    )
    if enough is None:
        return head + f"user-level DP needs at least {need} clients; use --dp-mode record"
    return head + f"raise --clients-per-round to at least {enough}, or use --dp-mode record"


def require_training(history: list[dict[str, Any]]) -> None:
    """Refuse a finished run in which no round changed the global adapter.

    Args:
        history: The server's per-round history (round 0 = the baseline).

    Raises:
        NothingTrainedError: every round trained too few clients (none sampled, all
            failed or rejected), so the model is the base and any ε was spent for nothing.
    """
    rounds = [h for h in history if int(h.get("round", 0)) >= 1]
    train = [h.get("train", {}) for h in rounds]
    if any(t.get("round-applied", t.get("clients-trained", 0)) for t in train):
        return
    per_round = "; ".join(
        f"round {int(h['round'])}: {int(t.get('clients-sampled', 0))} sampled, "
        f"{int(t.get('clients-trained', 0))} trained, {int(t.get('clients-rejected', 0))} "
        "rejected"
        for h, t in list(zip(rounds, train, strict=True))[:_MAX_ROUNDS_LISTED]
    )
    more = len(rounds) - _MAX_ROUNDS_LISTED
    per_round += f"; {more} more rounds alike" if more > 0 else ""
    raise NothingTrainedError(
        f"no round changed the model ({per_round or 'no rounds'}), so this run is not a "
        "result and no summary was written; a round needs enough clients sampled and "
        "trained: raise --clients-per-round, or see the warnings above for failed or "
        "rejected clients"
    )
