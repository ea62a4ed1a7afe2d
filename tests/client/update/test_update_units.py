"""Small invariants of the agent's parts: retry timing, the verifier's type, state
housekeeping and the CLI's refusals."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from client.cli import device_app
from client.update import (
    ActivePointer,
    DeviceState,
    DeviceStateError,
    Retrier,
    RetryPolicy,
    VerifiedBundle,
)
from client.update.transport import _retry_after
from delta_packager import AdapterState
from tests.client.update.helpers import FakeClock, World


@given(
    failures=st.integers(1, 12),
    retry_after=st.one_of(st.none(), st.floats(0, 1000)),
    seed=st.integers(0, 2**32),
)
def test_delay_is_backoff_or_retry_after_plus_bounded_jitter(
    failures: int, retry_after: float | None, seed: int
) -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=60, jitter=0.5)
    retrier = Retrier(policy, clock=FakeClock(), rng=random.Random(seed))
    floor = min(60.0, 0.5 * 2 ** (failures - 1))
    if retry_after is not None:
        floor = max(floor, min(retry_after, 60.0))
    assert floor <= retrier.delay_s(failures, retry_after) <= floor * 1.5


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert _retry_after("7") == 7.0
    assert _retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert _retry_after("soon") is None and _retry_after(None) is None


def test_only_the_verifier_constructs_a_verified_bundle() -> None:
    with pytest.raises(TypeError, match="only client.update.verify"):
        VerifiedBundle(bundle=None, target=None)  # type: ignore[arg-type]


def test_stale_temp_files_and_incomplete_slots_are_cleaned_on_start(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    adapter = AdapterState(1, 1, "sha256:" + "0" * 64, {"w": np.ones((2, 2), np.float32)})
    state.write_slot("a", adapter)
    state.set_active(ActivePointer("a", 1, 1))
    (tmp_path / ".active.json.123.fedota-tmp").write_bytes(b"half")
    (tmp_path / "slot-b").mkdir()
    (tmp_path / "slot-b" / "adapter.safetensors").write_bytes(b"half")  # no slot.json
    assert state.clean_stale() == 2
    assert not (tmp_path / "slot-b").exists()
    assert not list(tmp_path.glob("*.fedota-tmp"))
    restored = state.read_active()
    assert restored is not None and np.array_equal(restored.tensors["w"], np.ones((2, 2)))
    with pytest.raises(DeviceStateError, match="active slot"):
        state.write_slot("a", adapter)


def test_a_corrupt_slot_is_detected(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    state.write_slot("a", AdapterState(1, 1, "sha256:x", {"w": np.zeros(4, np.float32)}))
    path = tmp_path / "slot-a" / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DeviceStateError, match="damaged"):
        state.read_slot("a")


def test_cli_refuses_unenrolled_state_and_a_bad_root(world: World, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(device_app, ["status", "--state", str(tmp_path / "nowhere")])
    assert isinstance(result.exception, DeviceStateError)
    assert "fedota device enroll" in str(result.exception)
    bad_root = tmp_path / "root.json"
    bad_root.write_text('{"signed": {}}')
    result = runner.invoke(
        device_app,
        [
            "enroll",
            "--server",
            world.ota.url,
            "--state",
            str(tmp_path / "dev"),
            "--root",
            str(bad_root),
            "--base",
            str(world.base_dir),
            "--enroll-secret",
            "s",
        ],
    )
    assert isinstance(result.exception, DeviceStateError)
    assert "not a valid TUF root.json" in str(result.exception)
    ok = runner.invoke(
        device_app,
        [
            "enroll",
            "--server",
            world.ota.url,
            "--state",
            str(tmp_path / "dev"),
            "--root",
            str(world.pipeline.keys / "1.root.json"),
            "--base",
            str(world.base_dir),
            "--enroll-secret",
            "s",
        ],
    )
    assert ok.exit_code == 0, ok.output
    status = runner.invoke(device_app, ["status", "--state", str(tmp_path / "dev")])
    assert "active_version: None" in status.output and world.pipeline.fp in status.output
