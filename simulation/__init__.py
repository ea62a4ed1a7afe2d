"""Fleets of simulated phones on one workstation or a Ray cluster.

Owns the base-model bootstrap, federated data (synthetic and JSONL), device profiles,
the Flower simulation run and the end-to-end scenario with its report.

Import the names below from here: they are what code outside this package uses.
``base_model`` and ``federated`` keep torch, transformers, flwr and ray inside the
functions that need them, so importing this package stays cheap: ``fedota --help``
imports it (``simulation.cli``). ``simulation.ota_rollout`` is not re-exported: it loads
the embedded OTA server (FastAPI, SQLAlchemy, TUF) at import; import it directly.
"""

from simulation.base_model import PRESETS, BasePreset, ensure_base_model, init_base_model
from simulation.errors import SimulationInputError
from simulation.federated import FederatedConfig, load_data, run_federated

__all__ = [
    "PRESETS",
    "BasePreset",
    "FederatedConfig",
    "SimulationInputError",
    "ensure_base_model",
    "init_base_model",
    "load_data",
    "run_federated",
]
