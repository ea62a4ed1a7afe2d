"""Fleets of simulated phones for the end-to-end scenario (⑤ download → ⑨ report).

* ``config`` — tiers, fault shares, rollout policy (``FleetConfig``);
* ``ota_client`` — the embedded ``fedota serve`` on loopback and the operator client;
* ``bases`` — the base models the fleet's tiers run (NF4 checkpoint, GGUF file);
* ``publisher`` — package, measure the golden loss, sign, publish, start a rollout;
* ``device`` / ``fleet`` — simulated phones running the real update agent;
* ``runtimes`` — one shared quantized runtime per (base, budget);
* ``faults`` — killed mid-apply, corrupted mirror, other base, bad release;
* ``summary`` / ``report`` — the ``fleet`` and ``rollouts`` summary, the plots,
  ``fleet.md`` and the rollout table.

The orchestrator that ties them to federated rounds is ``simulation.ota_rollout``.

Import the names below from here: they are what code outside this package uses.
Importing any part of this package loads the embedded OTA server (FastAPI, SQLAlchemy,
TUF: ``ota_client``), so ``simulation.cli`` imports it inside its commands.
"""

from simulation.fleet.bases import prepare_bases
from simulation.fleet.config import (
    DEFAULT_TIERS,
    FaultShares,
    FleetConfig,
    FleetMode,
    RolloutPolicy,
    Tier,
    auto_stages,
    with_device_runtime,
    with_lora_ranks,
)
from simulation.fleet.faults import (
    DeviceFault,
    corrupt_adapter,
    planted_devices,
    planted_faults,
    planted_release,
)
from simulation.fleet.fleet import Fleet, SweepResult
from simulation.fleet.ota_client import EmbeddedServer, Endpoint, Operator
from simulation.fleet.publisher import Publisher, Release, ReleaseRole
from simulation.fleet.rank_release import RankedPublisher
from simulation.fleet.report import (
    PLOTS,
    TABLE_KEYS,
    TextTable,
    format_value,
    rollout_table,
    write_fleet_report,
)
from simulation.fleet.runtimes import RuntimePool
from simulation.fleet.summary import (
    FleetOutcome,
    FleetSummary,
    OtaRoundSummary,
    RolloutSummary,
    fleet_outcome,
)

__all__ = [
    "DEFAULT_TIERS",
    "PLOTS",
    "TABLE_KEYS",
    "DeviceFault",
    "EmbeddedServer",
    "Endpoint",
    "FaultShares",
    "Fleet",
    "FleetConfig",
    "FleetMode",
    "FleetOutcome",
    "FleetSummary",
    "Operator",
    "OtaRoundSummary",
    "Publisher",
    "RankedPublisher",
    "Release",
    "ReleaseRole",
    "RolloutPolicy",
    "RolloutSummary",
    "RuntimePool",
    "SweepResult",
    "TextTable",
    "Tier",
    "auto_stages",
    "corrupt_adapter",
    "fleet_outcome",
    "format_value",
    "planted_devices",
    "planted_faults",
    "planted_release",
    "prepare_bases",
    "rollout_table",
    "with_device_runtime",
    "with_lora_ranks",
    "write_fleet_report",
]
