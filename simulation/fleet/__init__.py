"""Fleets of simulated phones for the end-to-end scenario (⑤ download → ⑨ report).

* ``config`` — tiers, fault shares, rollout policy (``FleetConfig``);
* ``server`` — the embedded ``fedota serve`` on loopback and the operator client;
* ``publisher`` — package, measure the golden loss, sign, publish, start a rollout;
* ``device`` / ``fleet`` — simulated phones running the real update agent;
* ``runtimes`` — one shared quantized runtime per (base, budget);
* ``faults`` — killed mid-apply, corrupted mirror, other base, bad release;
* ``summary`` / ``report`` — the ``fleet`` and ``rollouts`` summary and the plots.

The orchestrator that ties them to federated rounds is ``simulation.e2e``.
"""

from simulation.fleet.config import DEFAULT_TIERS, FaultShares, FleetConfig, RolloutPolicy, Tier
from simulation.fleet.server import EmbeddedServer, Endpoint, ServerStartError

__all__ = [
    "DEFAULT_TIERS",
    "EmbeddedServer",
    "Endpoint",
    "FaultShares",
    "FleetConfig",
    "RolloutPolicy",
    "ServerStartError",
    "Tier",
]
