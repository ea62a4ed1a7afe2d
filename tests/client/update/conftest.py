"""Fixtures for the update agent tests: a fake OTA server, a release pipeline, a device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.update.helpers import FakeClock, World
from tests.client.update.update_fakes import FakeOta, Pipeline, enroll_device, make_base


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
