"""② aggregate: the Flower ``ServerApp`` and LoRA-aware strategies.

``server_app.app`` is the ``ServerApp`` of ``[tool.flwr.app.components]``;
``rounds.run_federation`` is the orchestrator; ``aggregate`` holds the pure math;
``strategy`` / ``wrappers`` the Flower strategies (validation and central DP compose by
wrapping); ``accountant`` the user-level ε; ``checkpoint`` crash-safe resume.
"""

from server.federation.accountant import UserLevelAccountant, calibrate_noise_multiplier
from server.federation.config import FederationConfig
from server.federation.rounds import RoundResult, run_federation
from server.federation.server_app import build_strategy, make_server_app
from server.federation.strategy import LoraStrategy
from server.federation.wrappers import CentralDP, UpdateValidation

__all__ = [
    "CentralDP",
    "FederationConfig",
    "LoraStrategy",
    "RoundResult",
    "UpdateValidation",
    "UserLevelAccountant",
    "build_strategy",
    "calibrate_noise_multiplier",
    "make_server_app",
    "run_federation",
]
