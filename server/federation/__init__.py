"""② aggregate: the Flower ``ServerApp`` and LoRA-aware strategies.

``server_app.app`` is the ``ServerApp`` of ``[tool.flwr.app.components]``;
``rounds.run_federation`` is the orchestrator; ``aggregate`` holds the pure math;
``strategy`` / ``wrappers`` the Flower strategies (validation and central DP compose by
wrapping); ``accountant`` the user-level ε; ``checkpoint`` crash-safe resume.

Import the names below from here: they are what code outside this package uses.
Importing this package loads flwr (the strategies subclass it), not torch.
"""

from server.federation.accountant import UserLevelAccountant, calibrate_noise_multiplier
from server.federation.checkpoint import load_latest
from server.federation.config import FederationConfig
from server.federation.rounds import RoundCallback, RoundResult, run_federation
from server.federation.server_app import build_strategy, make_server_app
from server.federation.strategy import LoraStrategy

__all__ = [
    "FederationConfig",
    "LoraStrategy",
    "RoundCallback",
    "RoundResult",
    "UserLevelAccountant",
    "build_strategy",
    "calibrate_noise_multiplier",
    "load_latest",
    "make_server_app",
    "run_federation",
]
