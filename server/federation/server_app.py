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

from server.federation.config import FederationConfig
from server.federation.rounds import RoundCallback, run_federation
from server.federation.strategy import LoraStrategy
from server.federation.wrappers import CentralDP, UpdateValidation

__all__ = ["app", "build_strategy", "make_server_app"]

logger = logging.getLogger(__name__)


def build_strategy(cfg: FederationConfig) -> UpdateValidation:
    """``UpdateValidation(CentralDP?(LoraStrategy))`` as the config asks."""
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
        )
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
