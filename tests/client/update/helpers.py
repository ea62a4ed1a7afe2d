"""Helpers the update agent tests share: a fake clock, a loss-table checker, the world,
and what the crash tests need (the updater process, its kill steps, exact comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.update import (
    DeviceState,
    GoldenLossChecker,
    Measurement,
    Retrier,
    RetryPolicy,
    check_and_update,
)
from delta_packager import AdapterState, Manifest
from tests.client.update.update_fakes import FakeOta, Pipeline, Released

__all__ = [
    "AFTER_SWAP",
    "BEFORE_SWAP",
    "PROC",
    "FakeClock",
    "World",
    "exactly",
    "measured_losses",
    "run",
]

#: The updater process the crash tests SIGKILL (``updater_proc.py``).
PROC = Path(__file__).with_name("updater_proc.py")
#: Steps the agent announces, before and after the active pointer moves to the new slot.
BEFORE_SWAP = ["download", "verify", "stage", "write_slot", "fsync", "swap_pointer", "health_check"]
AFTER_SWAP = ["commit", "cleanup"]


class FakeClock:
    """Monotonic time that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def measured_losses(losses: dict[int, float]) -> GoldenLossChecker:
    """The real decision rule with a runtime fake: loss per adapter version (default 1.0)."""

    def measure(adapter: AdapterState, manifest: Manifest) -> Measurement:
        return Measurement(loss=losses.get(adapter.version, 1.0), peak_bytes=10_000)

    return GoldenLossChecker(measure=measure, budget_bytes=512 * 2**20)


@dataclass
class World:
    """What the ``world`` fixture builds: a fake OTA server, a release pipeline, a device."""

    ota: FakeOta
    pipeline: Pipeline
    state: DeviceState
    clock: FakeClock
    base_dir: Path

    def retrier(self, **policy: float) -> Retrier:
        return Retrier(RetryPolicy(**policy), clock=self.clock)  # type: ignore[arg-type]


def run(world: World, checker: GoldenLossChecker | None = None):  # type: ignore[no-untyped-def]
    return check_and_update(
        world.state, checker=checker or measured_losses({}), retrier=world.retrier()
    )


def exactly(adapter: AdapterState | None, release: Released) -> bool:
    return (
        adapter is not None
        and adapter.version == release.version
        and set(adapter.tensors) == set(release.tensors)
        and all(np.array_equal(adapter.tensors[k], v) for k, v in release.tensors.items())
    )
