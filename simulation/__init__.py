"""Fleets of simulated phones on one workstation or a Ray cluster.

Owns the base-model bootstrap, federated data (synthetic and JSONL), device profiles,
the Flower simulation run and the end-to-end scenario with its report.
"""

from simulation.errors import SimulationError, SimulationInputError

__all__ = ["SimulationError", "SimulationInputError"]
