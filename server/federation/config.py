"""The server's federation settings: its view of the run's ``protocol.RunConfig``.

Keys and defaults are ``protocol.RunConfig``'s (kebab-case in Flower's run config, from
``[tool.flwr.app.config]``, overridden with ``flwr run --run-config`` or by
``simulation.federated``). The keys only the phones use are not kept here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import (
    Aggregation,
    ClientSampling,
    DpMode,
    RunConfig,
    RunConfigError,
    StrategyName,
)
from server.errors import ServerInputError

__all__ = ["AGGREGATIONS", "CLIENT_SAMPLINGS", "DP_MODES", "STRATEGIES", "FederationConfig"]

AGGREGATIONS = tuple(a.value for a in Aggregation)
CLIENT_SAMPLINGS = tuple(c.value for c in ClientSampling)
DP_MODES = tuple(d.value for d in DpMode)
STRATEGIES = tuple(s.value for s in StrategyName)
_RUN = RunConfig()  # the one set of defaults


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
        strategy: ``fedavg``, ``fedavgm``, ``fedadam``, ``fedyogi`` (server
            optimizers) or ``fedprox`` (the phones' proximal term; ``fedavg`` here).
        server_learning_rate: η of the server optimizer (``None``: its default).
        server_momentum, server_beta1, server_beta2, server_tau: the optimizers'
            hyperparameters (``protocol.RunConfig``).
        user_clip_quantile: adapt the user-level clip to leave this share of updates
            unclipped (``None``: fixed ``user_clip``, which is otherwise the initial one).
        user_clip_lr: step of the adaptive clip.
        user_clip_count_stddev: noise on the unclipped count (``None``: cohort / 20).
    """

    num_rounds: int = _RUN.num_server_rounds
    clients_per_round: int = _RUN.clients_per_round
    min_clients: int = _RUN.min_clients
    aggregation: str = _RUN.resolved_aggregation
    dp_mode: str = _RUN.dp_mode
    target_epsilon: float = _RUN.target_epsilon
    delta: float = _RUN.delta
    user_clip: float = _RUN.user_clip
    user_noise_multiplier: float = _RUN.user_noise_multiplier
    max_update_norm: float = _RUN.max_update_norm
    num_nodes: int = _RUN.num_nodes
    round_timeout_s: float = _RUN.round_timeout_s
    connect_timeout_s: float = _RUN.connect_timeout_s
    seed: int = _RUN.seed
    checkpoint_dir: Path | None = None
    eval_max_clients: int = _RUN.eval_max_clients
    client_sampling: str = _RUN.client_sampling
    strategy: str = _RUN.strategy
    server_learning_rate: float | None = _RUN.server_learning_rate
    server_momentum: float = _RUN.server_momentum
    server_beta1: float = _RUN.server_beta1
    server_beta2: float = _RUN.server_beta2
    server_tau: float = _RUN.server_tau
    user_clip_quantile: float | None = _RUN.user_clip_quantile
    user_clip_lr: float = _RUN.user_clip_lr
    user_clip_count_stddev: float | None = _RUN.user_clip_count_stddev
    lora_ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.aggregation not in AGGREGATIONS:
            problems.append(f"aggregation={self.aggregation!r} (need one of {AGGREGATIONS})")
        if self.dp_mode not in DP_MODES:
            problems.append(f"dp-mode={self.dp_mode!r} (need one of {DP_MODES})")
        if self.client_sampling not in CLIENT_SAMPLINGS:
            problems.append(
                f"client-sampling={self.client_sampling!r} (need one of {CLIENT_SAMPLINGS})"
            )
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy={self.strategy!r} (need one of {STRATEGIES})")
        if not problems:
            problems = self.run_config().problems()
        if problems:
            raise ServerInputError(
                "invalid federation config: "
                + "; ".join(problems)
                + ". Fix [tool.flwr.app.config] or the --run-config override."
            )

    def run_config(self) -> RunConfig:
        """These settings as the run's ``RunConfig`` (phone-only keys at their defaults)."""
        return RunConfig(
            num_server_rounds=self.num_rounds,
            clients_per_round=self.clients_per_round,
            min_clients=self.min_clients,
            aggregation=Aggregation(self.aggregation),
            dp_mode=DpMode(self.dp_mode),
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            user_clip=self.user_clip,
            user_noise_multiplier=self.user_noise_multiplier,
            max_update_norm=self.max_update_norm,
            num_nodes=self.num_nodes,
            round_timeout_s=self.round_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            seed=self.seed,
            checkpoint_dir=str(self.checkpoint_dir or ""),
            eval_max_clients=self.eval_max_clients,
            client_sampling=ClientSampling(self.client_sampling),
            strategy=StrategyName(self.strategy),
            server_learning_rate=self.server_learning_rate,
            server_momentum=self.server_momentum,
            server_beta1=self.server_beta1,
            server_beta2=self.server_beta2,
            server_tau=self.server_tau,
            user_clip_quantile=self.user_clip_quantile,
            user_clip_lr=self.user_clip_lr,
            user_clip_count_stddev=self.user_clip_count_stddev,
            lora_ranks=",".join(map(str, self.lora_ranks)),
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Parse the Flower run config (kebab-case keys) into a config.

        Raises:
            ServerInputError: a key is unknown, or a value has the wrong type or range.
        """
        try:
            run = RunConfig.from_flower(run_config)
        except RunConfigError as e:
            raise ServerInputError(f"run config {e}") from e
        return cls.from_run(run)

    @classmethod
    def from_run(cls, run: RunConfig) -> FederationConfig:
        """The server's view of ``run``.

        Raises:
            ServerInputError: a value is out of range.
        """
        return cls(
            num_rounds=run.num_server_rounds,
            clients_per_round=run.clients_per_round,
            min_clients=run.min_clients,
            aggregation=run.resolved_aggregation,
            dp_mode=run.dp_mode,
            target_epsilon=run.target_epsilon,
            delta=run.delta,
            user_clip=run.user_clip,
            user_noise_multiplier=run.user_noise_multiplier,
            max_update_norm=run.max_update_norm,
            num_nodes=run.num_nodes,
            round_timeout_s=run.round_timeout_s,
            connect_timeout_s=run.connect_timeout_s,
            seed=run.seed,
            checkpoint_dir=Path(run.checkpoint_dir) if run.checkpoint_dir else None,
            eval_max_clients=run.eval_max_clients,
            client_sampling=run.client_sampling,
            strategy=run.strategy,
            server_learning_rate=run.server_learning_rate,
            server_momentum=run.server_momentum,
            server_beta1=run.server_beta1,
            server_beta2=run.server_beta2,
            server_tau=run.server_tau,
            user_clip_quantile=run.user_clip_quantile,
            user_clip_lr=run.user_clip_lr,
            user_clip_count_stddev=run.user_clip_count_stddev,
            lora_ranks=run.allowed_ranks,
        )

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint it resumes.

        The strategy, the adaptive clip and the LoRA ranks join it only when they
        differ from the defaults, so checkpoints made before they existed still resume.
        """
        out: dict[str, Any] = {
            "aggregation": self.aggregation,
            "dp_mode": self.dp_mode,
            "clients_per_round": self.clients_per_round,
            "client_sampling": self.client_sampling,
            "seed": self.seed,
            "user_clip": self.user_clip,
            "target_epsilon": self.target_epsilon,
        }
        if self.strategy != StrategyName.FEDAVG:
            out["strategy"] = self.strategy
        if self.user_clip_quantile is not None:
            out["user_clip_quantile"] = self.user_clip_quantile
        if self.lora_ranks:
            out["lora_ranks"] = list(self.lora_ranks)
        return out
