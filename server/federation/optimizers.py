"""② aggregate: server optimizers that apply the aggregated update to the global adapter.

Pure numpy, no Flower: each optimizer maps (global adapter, aggregated delta) to the
next global adapter and keeps its moments as state a checkpoint can carry.

The aggregated delta ``Δ`` (the weighted mean of the clients' deltas, or under
user-level DP the clipped, noised mean) is the negative of a pseudo-gradient
(Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 1-2). Every rule below
works per coordinate, in float64, and casts back to the global adapter's dtype:

* ``fedavg``  ``x ← x + Δ`` (exactly ``aggregate.add_delta``; no state);
* ``fedavgm`` ``v ← μ·v + Δ`` (``v = Δ`` in the first round), ``x ← x + η·v``: SGD
  with momentum on the pseudo-gradient ``−Δ`` (Hsu et al. 2019; Flower's ``FedAvgM``);
* ``fedadam`` ``m ← β₁m + (1−β₁)Δ``, ``v ← β₂v + (1−β₂)Δ²``, ``x ← x + η·m / (√v + τ)``;
* ``fedyogi`` as ``fedadam`` but ``v ← v − (1−β₂)·Δ²·sign(v − Δ²)``.

``m`` starts at 0 and ``v`` at ``τ²`` (Reddi et al., Alg. 2: ``v₋₁ ≥ τ²``); there is no
bias correction, as in the paper. Invariants: the state is keyed by tensor name and
replayed exactly from :meth:`ServerOptimizer.state`, so a resumed run takes the same
steps as an uninterrupted one. Tensors that ``Δ`` does not hold (FFA-LoRA's frozen A)
are copied unchanged.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol import StrategyName
from server.federation.aggregate import Adapter, add_delta

__all__ = ["DEFAULT_SERVER_LR", "ServerOptimizer", "ServerOptimizerSettings"]

#: η when the run config leaves ``server-learning-rate`` at 0.
DEFAULT_SERVER_LR: Mapping[str, float] = {
    StrategyName.FEDAVGM: 1.0,
    StrategyName.FEDADAM: 1e-2,
    StrategyName.FEDYOGI: 1e-2,
}
_OPTIMIZERS = (StrategyName.FEDAVGM, StrategyName.FEDADAM, StrategyName.FEDYOGI)


@dataclass(frozen=True)
class ServerOptimizerSettings:
    """The hyperparameters of one server optimizer.

    Attributes:
        name: ``fedavgm``, ``fedadam`` or ``fedyogi``.
        learning_rate: η.
        momentum: μ of ``fedavgm``.
        beta1: β₁ of the adaptive ones.
        beta2: β₂ of the adaptive ones.
        tau: τ of the adaptive ones.
    """

    name: str
    learning_rate: float
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in _OPTIMIZERS:
            raise ValueError(f"server optimizer {self.name!r} is not one of {_OPTIMIZERS}")
        if not self.learning_rate > 0:
            raise ValueError(f"server learning rate must be > 0, got {self.learning_rate}")
        if not (0 <= self.momentum < 1 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("momentum, beta1 and beta2 must lie in [0, 1)")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


def _encode(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {
        k: {"shape": list(v.shape), "f64": base64.b64encode(v.astype("<f8").tobytes()).decode()}
        for k, v in sorted(arrays.items())
    }


def _decode(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {
        k: np.frombuffer(base64.b64decode(v["f64"]), dtype="<f8").reshape(v["shape"]).copy()
        for k, v in state.items()
    }


class ServerOptimizer:
    """A server optimizer's rule and moments (see the module docstring for the rules).

    Args:
        settings: which optimizer, and its hyperparameters.
    """

    def __init__(self, settings: ServerOptimizerSettings) -> None:
        self.settings = settings
        self.m: dict[str, np.ndarray] = {}  # fedavgm: the momentum buffer v
        self.v: dict[str, np.ndarray] = {}
        self.steps = 0

    def step(self, glob: Adapter, delta: Adapter) -> dict[str, np.ndarray]:
        """The next global adapter from ``glob`` and the aggregated ``delta``.

        Raises:
            KeyError: ``delta`` holds a tensor that ``glob`` lacks.
        """
        s = self.settings
        update: dict[str, np.ndarray] = {}
        for name in sorted(delta):
            d = np.asarray(delta[name], dtype=np.float64)
            if s.name == StrategyName.FEDAVGM:
                prev = self.m.get(name)
                self.m[name] = d.copy() if prev is None else s.momentum * prev + d
                update[name] = s.learning_rate * self.m[name]
                continue
            m = self.m.get(name, np.zeros_like(d))
            v = self.v.get(name, np.full_like(d, s.tau**2))
            self.m[name] = s.beta1 * m + (1 - s.beta1) * d
            sq = np.square(d)
            if s.name == StrategyName.FEDADAM:
                self.v[name] = s.beta2 * v + (1 - s.beta2) * sq
            else:  # fedyogi
                self.v[name] = v - (1 - s.beta2) * sq * np.sign(v - sq)
            update[name] = s.learning_rate * self.m[name] / (np.sqrt(self.v[name]) + s.tau)
        self.steps += 1
        return add_delta(glob, update)

    def state(self) -> dict[str, Any]:
        """JSON-serialisable moments (float64, exact)."""
        return {"steps": self.steps, "m": _encode(self.m), "v": _encode(self.v)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state` output."""
        self.steps = int(state.get("steps", 0))
        self.m = _decode(state.get("m", {}))
        self.v = _decode(state.get("v", {}))
