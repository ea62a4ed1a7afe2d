"""Fixtures for the update agent tests: a fake OTA server, a release pipeline, a device."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib

from update_fakes import FakeOta, Pipeline, enroll_device, make_base

from client.update.health import GoldenLossChecker, Measurement
from client.update.state import DeviceState
from client.update.transport import Retrier, RetryPolicy
from delta_packager.apply import AdapterState
from delta_packager.manifest import Manifest


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
    ota: FakeOta
    pipeline: Pipeline
    state: DeviceState
    clock: FakeClock
    base_dir: Path

    def retrier(self, **policy: float) -> Retrier:
        return Retrier(RetryPolicy(**policy), clock=self.clock)  # type: ignore[arg-type]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    ota = FakeOta()
    base_dir = tmp_path / "base"
    fp = make_base(base_dir)
    pipeline = Pipeline(tmp_path, ota, fp)
    state = enroll_device(tmp_path / "device", ota, pipeline.keys, base_dir, fp)
    try:
        yield World(ota, pipeline, state, FakeClock(), base_dir)
    finally:
        ota.close()
