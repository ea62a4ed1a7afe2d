"""The Flower ``ServerApp`` of fedota (``[tool.flwr.app.components] serverapp``).

``app`` reads its settings from the run config (``[tool.flwr.app.config]`` plus
``--run-config`` overrides). ``make_server_app`` builds the same app with extra
overrides and a per-round callback, for the simulation and, later, OTA publishing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation.adaptive_clip import AdaptiveClip
from server.federation.config import FederationConfig
from server.federation.optimizers import (
    DEFAULT_SERVER_LR,
    ServerOptimizer,
    ServerOptimizerSettings,
)
from server.federation.rounds import RoundCallback, run_federation
from server.federation.strategy import LoraStrategy
from server.federation.wrappers import CentralDP, ServerOptimization, UpdateValidation

__all__ = ["app", "build_strategy", "make_server_app"]

logger = logging.getLogger(__name__)


def _adaptive_clip(cfg: FederationConfig) -> AdaptiveClip | None:
    if cfg.user_clip_quantile is None:
        return None
    return AdaptiveClip(
        clip=cfg.user_clip,
        quantile=cfg.user_clip_quantile,
        learning_rate=cfg.user_clip_lr,
        count_stddev=cfg.user_clip_count_stddev,
    )


def _server_optimizer(cfg: FederationConfig) -> ServerOptimizer | None:
    if cfg.strategy not in DEFAULT_SERVER_LR:  # fedavg, fedprox: global += Δ
        return None
    return ServerOptimizer(
        ServerOptimizerSettings(
            name=cfg.strategy,
            learning_rate=cfg.server_learning_rate or DEFAULT_SERVER_LR[cfg.strategy],
            momentum=cfg.server_momentum,
            beta1=cfg.server_beta1,
            beta2=cfg.server_beta2,
            tau=cfg.server_tau,
        )
    )


def build_strategy(cfg: FederationConfig) -> UpdateValidation:
    """``UpdateValidation(ServerOptimization?(CentralDP?(LoraStrategy)))`` as the config
    asks: the server optimizer consumes the update DP released (noised), never the raw
    mean.
    """
    user_dp = cfg.dp_mode == "user"
    strategy: Any = LoraStrategy(
        aggregation=cfg.aggregation,
        clients_per_round=cfg.clients_per_round,
        min_clients=cfg.min_clients,
        seed=cfg.seed,
        sampling="poisson" if user_dp else cfg.client_sampling,
        num_rounds=cfg.num_rounds,
        eval_max_clients=cfg.eval_max_clients,
    )
    if user_dp:
        strategy = CentralDP(
            strategy,
            clip=cfg.user_clip,
            noise_multiplier=cfg.user_noise_multiplier or None,
            target_epsilon=cfg.target_epsilon,
            num_rounds=cfg.num_rounds,
            delta=cfg.delta,
            seed=cfg.seed,
            adaptive=_adaptive_clip(cfg),
        )
    optimizer = _server_optimizer(cfg)
    if optimizer is not None:
        strategy = ServerOptimization(strategy, optimizer=optimizer)
    return UpdateValidation(strategy, max_update_norm=cfg.max_update_norm)


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    *,
    on_round_end: RoundCallback | None = None,
) -> ServerApp:
    """A ``ServerApp`` whose run config is overlaid with ``overrides``.

    Args:
        overrides: run-config keys that win over the Flower run config.
        on_round_end: called with each completed round's result (round 0 included).
    """
    server_app = ServerApp()
    extra = dict(overrides or {})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = FederationConfig.from_run_config({**context.run_config, **extra})
        strategy = build_strategy(cfg)
        strategy.summary()
        history = run_federation(grid, cfg, strategy, on_round_end=on_round_end)
        last = history[-1]["evaluate"]
        logger.info("federation finished after round %d: %s", history[-1]["round"], last)

    return server_app


app = make_server_app()
