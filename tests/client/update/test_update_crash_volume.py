"""THREATS E20 with real volume: SIGKILL inside the download stream and inside the commit.

``test_update_crash`` kills the updater at the steps the agent announces, with bundles
of a few kilobytes that arrive in one read. Here the bundle is several megabytes (a
larger random adapter, which zstd cannot shrink), and the kills land where the steps
do their work:

* download: the fake server streams part of the body and stalls; once those bytes are
  on disk in the partial file the test SIGKILLs the updater from outside, while it is
  blocked reading the rest. A restart resumes from that byte (``Range`` + ``If-Range``),
  starts over when the server will not resume, and drops the partial file when another
  release is offered instead.
* commit: the updater SIGKILLs itself just before the K-th file operation (a file
  opened for writing, a rename, a removal) after the health check started — every
  point between the journal, pointer, floor, telemetry and cleanup writes.

Each time the device is left with exactly the old or exactly the new adapter, and a
restart completes the update.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from delta_packager import PackagePolicy
from tests.client.update.helpers import PROC, FakeClock, World, exactly, run
from tests.client.update.update_fakes import FakeOta, Pipeline, Released, enroll_device, make_base

pytestmark = pytest.mark.slow

WIDTH = 16_384  # rank-4 LoRA, 4 layers x q/v x A/B of 4 x 16384 float32: 4 MiB
# fp32 (random values: ~4 MiB a bundle); v1 full, v2 a delta from it, v3 full again
FP32 = PackagePolicy(delta_encoding="fp32", full_encoding="fp32", chain_limit=1)
HELD_BYTES = 1_500_000  # what the server streams before it stalls
COMMIT_FILE_OPS = 18  # file operations from the health check to the end of a clean update


@pytest.fixture
def big_world(tmp_path: Path) -> Iterator[World]:
    ota = FakeOta()
    base_dir = tmp_path / "base"
    fp = make_base(base_dir)
    pipeline = Pipeline(tmp_path, ota, fp)
    rng = np.random.default_rng(11)
    pipeline.adapter = {
        name: rng.normal(size=(4, WIDTH) if "lora_A" in name else (WIDTH, 4)).astype(np.float32)
        for name in pipeline.adapter
    }
    state = enroll_device(tmp_path / "device", ota, pipeline.keys, base_dir, fp)
    try:
        yield World(ota, pipeline, state, FakeClock(), base_dir)
    finally:
        ota.faults.release_hold.set()
        ota.close()


def v1_installed_v2_offered(world: World) -> tuple[Released, Released]:
    v1 = world.pipeline.next_version(policy=FP32)
    world.pipeline.publish(v1)
    world.pipeline.offer(v1)
    assert run(world).status == "updated"
    v2 = world.pipeline.next_version(policy=FP32)
    world.pipeline.publish(v2)
    world.pipeline.offer(v2)
    return v1, v2


def updater(world: World, kill_step: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(PROC), str(world.state.root), kill_step],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_partial(world: World, proc: subprocess.Popen[str], size: int) -> Path:
    """The partial download file, once ``size`` bytes of it are on disk."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list(world.state.downloads_dir.glob("*.part"))
        if parts and parts[0].stat().st_size >= size:
            return parts[0]
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"the partial file never reached {size} bytes: {proc.communicate()}")


def assert_clean_after(world: World, version: int) -> None:
    assert world.state.journal() == {"step": "idle"}
    assert not [p for p in world.state.root.rglob("*") if p.name.endswith(".fedota-tmp")]
    assert not list(world.state.downloads_dir.glob("*"))
    assert world.state.release_floor() == version


@pytest.mark.parametrize("restart", ["resumed", "server_will_not_resume", "superseded"])
def test_e20_killed_mid_download_stream(big_world: World, restart: str) -> None:
    world = big_world
    v1, v2 = v1_installed_v2_offered(world)
    assert len(v2.data) > 2 * HELD_BYTES  # several reads: the kill lands inside the stream
    world.ota.faults.hold_at = [HELD_BYTES]
    proc = updater(world, "never")
    part = wait_for_partial(world, proc, HELD_BYTES)
    os.kill(proc.pid, signal.SIGKILL)  # blocked reading the rest of the body
    proc.communicate()
    world.ota.faults.release_hold.set()
    assert proc.returncode == -9

    assert part.stat().st_size == HELD_BYTES  # what arrived is kept, nothing more
    assert exactly(world.state.read_active(), v1)
    assert world.state.journal()["step"] == "download"
    assert not world.state.slot_dir(world.state.inactive_slot()).exists()

    gets = len(world.ota.target_gets())
    expected = v2
    if restart == "server_will_not_resume":
        world.ota.faults.ignore_range = True  # answers 200 with the whole body
    elif restart == "superseded":
        expected = world.pipeline.next_version(policy=FP32)
        world.pipeline.publish(expected)
        world.pipeline.offer(expected)
    outcome = run(world)
    assert (outcome.status, outcome.version) == ("updated", expected.version)
    assert exactly(world.state.read_active(), expected)
    assert_clean_after(world, expected.version)

    (_, path, headers), *others = world.ota.target_gets()[gets:]
    assert not others  # one request completed the download
    if restart == "superseded":
        assert path.endswith(Path(expected.path).name) and "Range" not in headers
    else:
        assert headers["Range"] == f"bytes={HELD_BYTES}-{len(v2.data) - 1}"
        assert headers["If-Range"]  # resumed only against the validator it started with
    installed = [e for e in world.ota.events.values() if e["type"] == "installed"]
    assert [e["version"] for e in installed] == [1, expected.version]


@pytest.mark.parametrize("k", range(1, COMMIT_FILE_OPS + 1))
def test_e20_killed_between_the_file_operations_of_commit(big_world: World, k: int) -> None:
    world = big_world
    v1, v2 = v1_installed_v2_offered(world)
    proc = updater(world, f"file-op:{k}")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, f"not killed at file operation {k}: {out}{err[-2000:]}"

    active = world.state.read_active()
    assert exactly(active, v1) or exactly(active, v2), f"killed at file operation {k}: mixed"
    outcome = run(world)
    # Killed once the update had ended: the restart finds v2 installed and stops there.
    assert (outcome.status, outcome.version) in (("updated", 2), ("no_update", 2))
    assert exactly(world.state.read_active(), v2)
    assert_clean_after(world, 2)
    installed = [e for e in world.ota.events.values() if e["type"] == "installed"]
    assert [e["version"] for e in installed] == [1, 2]  # reported once, not per restart


def test_the_commit_kill_points_cover_every_file_operation(big_world: World) -> None:
    """One past the last kill point the update runs to its end (else raise the count)."""
    world = big_world
    v1_installed_v2_offered(world)
    proc = updater(world, f"file-op:{COMMIT_FILE_OPS + 1}")
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out.strip()) == (0, "updated"), err[-2000:]
    assert exactly(world.state.read_active(), world.pipeline.released[2])
