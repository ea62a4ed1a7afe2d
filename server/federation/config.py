"""The server's federation settings, parsed once from the Flower run config.

Keys are those of ``[tool.flwr.app.config]`` in ``pyproject.toml`` (kebab-case); any
key may be overridden with ``flwr run --run-config`` or by ``simulation.federated``.
Unknown keys are ignored here (the ``ClientApp`` reads its own).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import ServerInputError

__all__ = ["AGGREGATIONS", "CLIENT_SAMPLINGS", "DP_MODES", "FederationConfig"]

AGGREGATIONS = ("fedavg", "ffa")
CLIENT_SAMPLINGS = ("balanced", "uniform")
DP_MODES = ("none", "record", "user")


@dataclass(frozen=True)
class FederationConfig:
    """Validated server-side settings of one federated run.

    Attributes:
        num_rounds: rounds to train (``num-server-rounds``).
        clients_per_round: clients sampled per round (expected number under user DP).
        min_clients: fewest accepted updates for a round to change the global adapter.
        aggregation: ``fedavg`` or ``ffa``.
        dp_mode: ``none``, ``record`` (Opacus on each phone) or ``user`` (central).
        target_epsilon: ε the run aims at (record: per phone; user: whole run).
        delta: δ at which ε is reported.
        user_clip: L2 bound on one client's update under user-level DP.
        user_noise_multiplier: σ for user DP; 0 means "calibrate from target ε".
        max_update_norm: updates with a larger L2 norm are rejected (0 disables).
        num_nodes: nodes to wait for before starting (training + held-out clients).
        round_timeout_s: how long to wait for replies; late replies are dropouts.
        connect_timeout_s: how long to wait for ``num_nodes`` to connect, and the
            longest silence between replies while discovering nodes.
        seed: seeds client sampling and the central noise.
        checkpoint_dir: where to checkpoint after each round (``None``: no checkpoints).
        eval_max_clients: training clients evaluated per round (seeded subset; 0 = all).
        client_sampling: ``balanced`` (fewest rounds trained first) or ``uniform``
            (independently each round); user-level DP always samples Poisson.
    """

    num_rounds: int = 3
    clients_per_round: int = 3
    min_clients: int = 2
    aggregation: str = "ffa"
    dp_mode: str = "record"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    user_clip: float = 1.0
    user_noise_multiplier: float = 0.0
    max_update_norm: float = 100.0
    num_nodes: int = 0
    round_timeout_s: float = 600.0
    connect_timeout_s: float = 120.0
    seed: int = 0
    checkpoint_dir: Path | None = None
    eval_max_clients: int = 0
    client_sampling: str = "balanced"

    def __post_init__(self) -> None:
        problems = []
        if self.num_rounds < 1:
            problems.append(f"num-server-rounds={self.num_rounds} (need ≥ 1)")
        if self.clients_per_round < 1:
            problems.append(f"clients-per-round={self.clients_per_round} (need ≥ 1)")
        if self.min_clients < 0:
            problems.append(f"min-clients={self.min_clients} (need ≥ 0)")
        if self.aggregation not in AGGREGATIONS:
            problems.append(f"aggregation={self.aggregation!r} (need one of {AGGREGATIONS})")
        if self.dp_mode not in DP_MODES:
            problems.append(f"dp-mode={self.dp_mode!r} (need one of {DP_MODES})")
        if self.dp_mode != "none" and not (
            self.target_epsilon > 0 and math.isfinite(self.target_epsilon)
        ):
            problems.append(f"target-epsilon={self.target_epsilon} (need a finite ε > 0)")
        if not 0 < self.delta < 1:
            problems.append(f"delta={self.delta} (need 0 < δ < 1)")
        if self.client_sampling not in CLIENT_SAMPLINGS:
            problems.append(
                f"client-sampling={self.client_sampling!r} (need one of {CLIENT_SAMPLINGS})"
            )
        if self.user_clip <= 0:
            problems.append(f"user-clip={self.user_clip} (need > 0)")
        if problems:
            raise ServerInputError(
                "invalid federation config: "
                + "; ".join(problems)
                + ". Fix [tool.flwr.app.config] or the --run-config override."
            )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Parse the Flower run config (kebab-case keys) into a config.

        Raises:
            ServerInputError: a value has the wrong type or is out of range.
        """

        def get(key: str, default: Any, kind: type) -> Any:
            raw = run_config.get(key, default)
            try:
                return kind(raw)
            except (TypeError, ValueError) as e:
                raise ServerInputError(
                    f"run config {key}={raw!r} is not a valid {kind.__name__}"
                ) from e

        d = cls()
        ckpt = str(run_config.get("checkpoint-dir", "") or "")
        return cls(
            num_rounds=get("num-server-rounds", d.num_rounds, int),
            clients_per_round=get("clients-per-round", d.clients_per_round, int),
            min_clients=get("min-clients", d.min_clients, int),
            aggregation=get("aggregation", d.aggregation, str),
            dp_mode=get("dp-mode", d.dp_mode, str),
            target_epsilon=get("target-epsilon", d.target_epsilon, float),
            delta=get("delta", d.delta, float),
            user_clip=get("user-clip", d.user_clip, float),
            user_noise_multiplier=get("user-noise-multiplier", d.user_noise_multiplier, float),
            max_update_norm=get("max-update-norm", d.max_update_norm, float),
            num_nodes=get("num-nodes", d.num_nodes, int),
            round_timeout_s=get("round-timeout-s", d.round_timeout_s, float),
            connect_timeout_s=get("connect-timeout-s", d.connect_timeout_s, float),
            seed=get("seed", d.seed, int),
            checkpoint_dir=Path(ckpt) if ckpt else None,
            eval_max_clients=get("eval-max-clients", d.eval_max_clients, int),
            client_sampling=get("client-sampling", d.client_sampling, str),
        )

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint it resumes."""
        return {
            "aggregation": self.aggregation,
            "dp_mode": self.dp_mode,
            "clients_per_round": self.clients_per_round,
            "client_sampling": self.client_sampling,
            "seed": self.seed,
            "user_clip": self.user_clip,
            "target_epsilon": self.target_epsilon,
        }
