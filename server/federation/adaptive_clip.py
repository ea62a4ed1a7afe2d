"""② aggregate: the adaptive clip of user-level DP (Andrew et al. 2021, "Differentially
Private Learning with Adaptive Clipping", NeurIPS), pure numpy.

Each round the server clips every client's delta to the current clip ``C`` and counts
the updates it left unclipped (``‖Δᵢ‖ ≤ C``). The count is privatised and used to move
``C`` geometrically toward the target quantile ``γ`` of the update norms::

    b̃ = (Σᵢ (bᵢ − ½) + N(0, σ_b²)) / m + ½        bᵢ = [‖Δᵢ‖ ≤ C],  m = q·N
    C ← C · exp(−η_C · (b̃ − γ))

The centred indicators ``bᵢ − ½`` make the count's sensitivity ½ under adding or
removing one user, and the fixed denominator ``m`` (the expected cohort) keeps the
actual cohort size out of the release. The update sum (sensitivity ``C``, noise
``σ_Δ·C``) and the count (sensitivity ½, noise ``σ_b``) together are one Gaussian
mechanism with noise multiplier ``z`` where ``z⁻² = σ_Δ⁻² + (2σ_b)⁻²`` (the paper's
§3, Theorem 1). So the accountant composes ``z`` — the σ calibrated for the target ε —
and the updates get the slightly larger::

    σ_Δ = (z⁻² − (2σ_b)⁻²)^(−½)

which needs ``2σ_b > z``. The paper's default ``σ_b = m / 20`` costs little:
at ``m = 50`` and ``z = 1`` it is ``σ_Δ = 1.02``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["AdaptiveClip", "update_noise_multiplier"]


def update_noise_multiplier(z: float, count_stddev: float) -> float:
    """σ_Δ, the noise multiplier of the updates when the count takes its share of ``z``.

    Raises:
        ValueError: ``2·count_stddev ≤ z``: the count alone would spend the whole budget.
    """
    if not 2 * count_stddev > z:
        raise ValueError(
            f"the noise on the unclipped count (σ_b={count_stddev:.4g}) must exceed half "
            f"the calibrated noise multiplier (z={z:.4g}) for adaptive clipping; raise "
            "user-clip-count-stddev or clients-per-round"
        )
    return (z**-2 - (2 * count_stddev) ** -2) ** -0.5


@dataclass
class AdaptiveClip:
    """The clip of user-level DP and its quantile rule.

    Attributes:
        clip: the current clip ``C`` (the initial one until the first update).
        quantile: γ, the share of updates the clip should leave unclipped.
        learning_rate: η_C of the geometric update.
        count_stddev: σ_b, the noise on the centred unclipped count; ``None`` until
            :meth:`resolve_count_stddev` sets the paper's ``m / 20``.
    """

    clip: float
    quantile: float
    learning_rate: float
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        if not (self.clip > 0 and 0 < self.quantile < 1 and self.learning_rate > 0):
            raise ValueError("need clip > 0, 0 < quantile < 1 and learning_rate > 0")
        if self.count_stddev is not None and not self.count_stddev > 0:
            raise ValueError(f"count_stddev must be > 0, got {self.count_stddev}")

    def resolve_count_stddev(self, expected_clients: float) -> float:
        """σ_b: the one set, else ``expected_clients / 20`` (Andrew et al. 2021, §3)."""
        if self.count_stddev is None:
            self.count_stddev = expected_clients / 20.0
        return self.count_stddev

    def noisy_unclipped_share(
        self, norms: Iterable[float], *, expected_clients: float, rng: np.random.Generator
    ) -> float:
        """b̃: the privatised share of ``norms`` at most the current clip."""
        centred = math.fsum((1.0 if n <= self.clip else 0.0) - 0.5 for n in norms)
        noisy = centred + float(rng.normal(0.0, self.resolve_count_stddev(expected_clients)))
        return noisy / expected_clients + 0.5

    def update(
        self, norms: Iterable[float], *, expected_clients: float, rng: np.random.Generator
    ) -> float:
        """Move the clip toward the target quantile; returns b̃ (the noisy share)."""
        share = self.noisy_unclipped_share(norms, expected_clients=expected_clients, rng=rng)
        self.clip *= math.exp(-self.learning_rate * (share - self.quantile))
        return share

    def state(self) -> dict[str, Any]:
        """The current clip (the rest is configuration)."""
        return {"clip": self.clip}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` output."""
        if "clip" in state:
            self.clip = float(state["clip"])
