"""THREATS E20–E23: crash-consistent apply, disk full, failed health, two updaters."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from client.update import (
    GoldenLossChecker,
    UpdateBusyError,
    UpdateTransientError,
    default_checker,
)
from client.update import state as state_module
from delta_packager import AdapterState
from tests.client.update.helpers import (
    AFTER_SWAP,
    BEFORE_SWAP,
    PROC,
    World,
    exactly,
    measured_losses,
    run,
)
from tests.client.update.update_fakes import Released


def v1_installed_v2_offered(world: World) -> tuple[Released, Released]:
    v1 = world.pipeline.next_version()
    world.pipeline.publish(v1)
    world.pipeline.offer(v1)
    assert run(world).status == "updated"
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    world.pipeline.offer(v2)
    return v1, v2


def kill_updater_at(world: World, step: str, loss: float = 1.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROC), str(world.state.root), step, str(loss)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("step", BEFORE_SWAP + AFTER_SWAP)
def test_e20_killed_at_every_step_leaves_old_or_new_exactly(world: World, step: str) -> None:
    v1, v2 = v1_installed_v2_offered(world)
    proc = kill_updater_at(world, step)
    assert proc.returncode == -9, proc.stderr[-2000:]
    active = world.state.read_active()
    expected = v1 if step in BEFORE_SWAP else v2
    assert exactly(active, expected), f"killed at {step}: active is not exactly v{expected.version}"
    # Restart: the update is finished (or redone) and nothing stale is left behind.
    outcome = run(world)
    assert (outcome.status, outcome.version) == ("updated", 2)
    assert exactly(world.state.read_active(), v2)
    assert world.state.journal() == {"step": "idle"}
    assert not [p for p in world.state.root.rglob("*") if p.name.endswith(".fedota-tmp")]
    assert not list(world.state.downloads_dir.glob("*"))
    assert world.state.release_floor() == 2
    installed = [e for e in world.ota.events.values() if e["type"] == "installed"]
    assert [e["version"] for e in installed] == [1, 2]  # reported once, not per restart


def test_e20_killed_while_cleaning_up_a_rollback(world: World) -> None:
    v1, _ = v1_installed_v2_offered(world)
    assert kill_updater_at(world, "cleanup", loss=9.0).returncode == -9
    assert exactly(world.state.read_active(), v1)
    outcome = run(world)
    assert outcome.status == "rolled_back" and "golden loss" in outcome.reason
    assert exactly(world.state.read_active(), v1)
    assert not world.state.slot_dir(world.state.inactive_slot()).exists()
    failed = [e for e in world.ota.events.values() if e["type"] == "failed"]
    assert len(failed) == 1 and '"measured_loss":9.0' in failed[0]["detail"]


def test_e20_crash_loop_on_a_new_adapter_rolls_back_after_k_starts(world: World) -> None:
    v1, _ = v1_installed_v2_offered(world)
    for _ in range(3):  # the runtime dies while loading the new adapter, three times
        assert kill_updater_at(world, "health_check").returncode == -9
    outcome = run(world)
    assert outcome.status == "rolled_back" and "crash loop" in outcome.reason
    assert exactly(world.state.read_active(), v1)
    failed = [e for e in world.ota.events.values() if e["type"] == "failed"]
    assert failed and "crash loop" in failed[-1]["detail"]


def test_e21_disk_full_while_staging_aborts_cleanly(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, _ = v1_installed_v2_offered(world)
    real = state_module.atomic_write

    def full(path: Path, data: bytes, *, mode: int = 0o644) -> None:
        if path.name == "adapter.safetensors":
            (path.parent / "partial.fedota-tmp").write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, mode=mode)

    monkeypatch.setattr(state_module, "atomic_write", full)
    with pytest.raises(UpdateTransientError, match="space"):
        run(world)
    assert exactly(world.state.read_active(), v1)
    assert not world.state.slot_dir(world.state.inactive_slot()).exists()
    assert not list(world.state.downloads_dir.glob("*"))
    assert world.state.journal() == {"step": "idle"}
    last = list(world.ota.events.values())[-1]
    assert last["type"] == "retry" and "disk_full" in last["detail"]  # ADR 0007: not failed


def test_e22_health_check_outside_tolerance_rolls_back_with_measured_values(
    world: World,
) -> None:
    v1, _ = v1_installed_v2_offered(world)
    outcome = run(world, measured_losses({2: 5.0}))
    assert outcome.status == "rolled_back"
    assert outcome.health is not None and outcome.health.measured_loss == 5.0
    assert outcome.health.expected_loss == 1.0
    assert exactly(world.state.read_active(), v1)
    failed = [e for e in world.ota.events.values() if e["type"] == "failed"][-1]
    assert '"measured_loss":5.0' in failed["detail"] and '"expected_loss":1.0' in failed["detail"]
    assert not world.state.slot_dir(world.state.inactive_slot()).exists()


def test_e22_runtime_crashing_on_load_rolls_back(world: World) -> None:
    v1, _ = v1_installed_v2_offered(world)

    def crash(adapter: AdapterState, manifest: object) -> object:
        raise RuntimeError("CUDA error: illegal memory access")

    checker = GoldenLossChecker(measure=crash, budget_bytes=2**30)  # type: ignore[arg-type]
    outcome = run(world, checker)
    assert outcome.status == "rolled_back" and "illegal memory access" in outcome.reason
    assert exactly(world.state.read_active(), v1)


def test_e22_peak_memory_over_budget_rolls_back(world: World) -> None:
    v1, _ = v1_installed_v2_offered(world)
    checker = measured_losses({})
    checker = GoldenLossChecker(measure=checker.measure, budget_bytes=100)
    outcome = run(world, checker)
    assert outcome.status == "rolled_back" and "budget" in outcome.reason
    assert exactly(world.state.read_active(), v1)


def test_default_checker_fails_closed_until_a_runtime_is_wired(world: World) -> None:
    v1, _ = v1_installed_v2_offered(world)
    outcome = run(world, default_checker(world.state))  # type: ignore[arg-type]
    assert outcome.status == "rolled_back" and "failing closed" in outcome.reason
    assert exactly(world.state.read_active(), v1)


def test_e23_a_second_updater_is_refused_and_nothing_is_applied_twice(world: World) -> None:
    v1, _ = v1_installed_v2_offered(world)
    gets = len(world.ota.target_gets())
    with world.state.lock(), pytest.raises(UpdateBusyError, match="another fedota update"):
        run(world)
    assert exactly(world.state.read_active(), v1)
    assert len(world.ota.target_gets()) == gets
