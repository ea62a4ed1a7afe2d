"""The agent and ``fedota device ...`` against a real ``fedota serve`` on loopback.

The release goes through the real pipeline: ``delta_packager`` bundles and TUF keys,
``fedota publish``, ``fedota rollout create``; the device enrolls with the CLI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from client.update import DeviceState, check_and_update
from delta_packager import PackagerState, Provenance, build_bundle, package_version
from delta_packager.trust import init_keys, release
from server.ota import wait_until_ready
from tests.client.update.helpers import measured_losses
from tests.client.update.update_fakes import CONFIG, make_base

pytestmark = pytest.mark.slow
SECRETS = {
    "FEDOTA_OTA_ADMIN_KEY": "admin-key-0123456789abcdef",
    "FEDOTA_OTA_OPERATOR_KEY": "operator-key-0123456789abcdef",
    "FEDOTA_OTA_PUBLISHER_KEY": "publisher-key-0123456789abcdef",
    "FEDOTA_OTA_ENROLLMENT_SECRET": "enroll-secret-0123456789abcdef",
}


def fedota(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedota.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Live:
    url: str
    keys: Path
    env: dict[str, str]
    tmp: Path
    fp: str
    base: Path
    proc: subprocess.Popen[bytes]
    packager: PackagerState | None = None

    def release(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        adapter = {
            f"layers.0.self_attn.{m}.lora_{ab}.weight": rng.normal(
                size=(4, 32) if ab == "A" else (32, 4)
            ).astype(np.float32)
            for m in ("q_proj", "v_proj")
            for ab in ("A", "B")
        }
        result = package_version(
            adapter,
            previous=self.packager,
            base_fingerprint=self.fp,
            adapter_config=CONFIG,
            provenance=Provenance(eval_metrics={"loss": 1.0}),
        )
        self.packager = result.state
        version = result.state.latest_version
        path = self.tmp / f"adapter-v{version}.fedota"
        path.write_bytes(result.bundle_bytes)
        paths = [path]
        if version > 1:  # the server also wants a full bundle of every version
            paths.append(self.tmp / f"adapter-v{version}-full.fedota")
            paths[1].write_bytes(build_bundle(result.state, from_version=None))
        release(paths, self.keys)
        published = fedota(
            "publish",
            *map(str, paths),
            "--keys",
            str(self.keys),
            "--server",
            self.url,
            env=self.env,
        )
        assert published.returncode == 0, published.stderr
        rollout = fedota(
            "rollout",
            "create",
            "--version",
            str(version),
            "--base",
            self.fp,
            "--stages",
            "100",
            "--server",
            self.url,
            env=self.env,
        )
        assert rollout.returncode == 0, rollout.stderr
        return dict(result.state.current.tensors)


def enroll(live: Live, state: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``fedota device enroll`` of a device with state directory ``state`` on ``live``."""
    return fedota(
        "device",
        "enroll",
        "--server",
        live.url,
        "--state",
        str(state),
        "--root",
        str(live.keys / "1.root.json"),
        "--base",
        str(live.base),
        env=env,
    )


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    keys = tmp_path / "KEYS"
    init_keys(keys)
    port = free_port()
    env = {
        **os.environ,
        **SECRETS,
        "FEDOTA_PUBLISHER_KEY": SECRETS["FEDOTA_OTA_PUBLISHER_KEY"],
        "FEDOTA_OPERATOR_KEY": SECRETS["FEDOTA_OTA_OPERATOR_KEY"],
        "FEDOTA_ENROLLMENT_SECRET": SECRETS["FEDOTA_OTA_ENROLLMENT_SECRET"],
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedota.cli",
            "serve",
            "--database-url",
            f"sqlite:///{tmp_path / 'ota.db'}",
            "--storage",
            str(tmp_path / "storage"),
            "--trusted-root",
            str(keys / "root.json"),
            "--snapshot-key",
            str(keys / "private/snapshot.pem"),
            "--timestamp-key",
            str(keys / "private/timestamp.pem"),
            "--port",
            str(port),
            "--migrate",
            "--text-logs",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    if not wait_until_ready(url, timeout_s=60, alive=lambda: proc.poll() is None):
        proc.kill()
        raise RuntimeError(proc.stderr.read().decode()[-3000:] if proc.stderr else "")
    base = tmp_path / "base"
    fp = make_base(base)
    try:
        yield Live(url, keys, env, tmp_path, fp, base, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_enroll_update_status_and_exit_codes_against_fedota_serve(live: Live) -> None:
    state = live.tmp / "device"
    enrolled = enroll(live, state, live.env)
    assert enrolled.returncode == 0, enrolled.stderr
    device = DeviceState(state)

    nothing = fedota("device", "update", "--state", str(state), env=live.env)
    assert nothing.returncode == 10, nothing.stderr  # no release yet

    v1 = live.release(seed=1)
    outcome = check_and_update(device, checker=measured_losses({}))
    assert (outcome.status, outcome.version) == ("updated", 1)
    active = device.read_active()
    assert active is not None
    assert all(np.array_equal(active.tensors[k], v) for k, v in v1.items())

    live.release(seed=2)
    # The CLI's default checker has no runtime measurement yet: it fails closed.
    rolled = fedota("device", "update", "--state", str(state), env=live.env)
    assert rolled.returncode == 3, rolled.stderr
    assert "rolled back" in rolled.stderr and "failing closed" in rolled.stderr

    status = fedota("device", "status", "--state", str(state), "--json", env=live.env)
    info = json.loads(status.stdout)
    assert info["active_version"] == 1 and info["base_fingerprint"] == live.fp
    assert info["release_floor"] == 1 and info["pending_telemetry"] == 0

    token = json.loads((state / "device.json").read_text())["token"]
    assignment = httpx.get(
        f"{live.url}/v1/devices/{info['device_id']}/assignment",
        headers={"Authorization": f"Bearer {token}"},
    ).json()
    assert assignment["installed_version"] == 1 and assignment["failed_versions"] == [2]
    again = fedota("device", "update", "--state", str(state), env=live.env)
    assert again.returncode == 10, again.stderr  # a failed version is not re-offered

    with device.lock():
        busy = fedota("device", "update", "--state", str(state), env=live.env)
    assert busy.returncode == 4 and "another fedota update" in busy.stderr

    live.proc.terminate()
    live.proc.wait(timeout=30)
    down = fedota("device", "update", "--state", str(state), "--retry-budget-s", "1", env=live.env)
    assert down.returncode == 4 and "retry budget" in down.stderr


def test_a_damaged_active_adapter_is_reported_and_repaired_from_the_signed_release(
    live: Live,
) -> None:
    # Issue 22 item 5: storage rot in the active slot after a commit.
    state = live.tmp / "device"
    enrolled = enroll(live, state, live.env)
    assert enrolled.returncode == 0, enrolled.stderr
    device = DeviceState(state)
    live.release(seed=1)
    v2 = live.release(seed=2)
    assert check_and_update(device, checker=measured_losses({})).version == 2
    pointer = device.active()
    assert pointer is not None and pointer.version == 2

    def status() -> dict[str, object]:
        shown = fedota("device", "status", "--state", str(state), "--json", env=live.env)
        assert shown.returncode == 0, shown.stderr
        return dict(json.loads(shown.stdout))

    assert status()["active_adapter"] == "intact"
    adapter = device.slot_dir(pointer.slot) / "adapter.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-10] ^= 0x40  # one flipped bit in a tensor
    adapter.write_bytes(bytes(data))

    damaged = status()
    assert str(damaged["active_adapter"]).startswith("damaged: ")
    assert "fedota device update" in str(damaged["active_adapter"])

    outcome = check_and_update(device, checker=measured_losses({}))
    assert (outcome.status, outcome.version, outcome.reason) == ("updated", 2, "repaired")
    repaired = device.read_active()
    assert repaired is not None and repaired.version == 2
    assert all(np.allclose(repaired.tensors[k], v, atol=1e-3) for k, v in v2.items())
    assert status()["active_adapter"] == "intact" and device.release_floor() == 2
    again = fedota("device", "update", "--state", str(state), env=live.env)
    assert again.returncode == 10, again.stderr  # repaired: nothing left to do


def test_a_wrong_enrollment_secret_is_named_as_such(live: Live) -> None:
    env = {**live.env, "FEDOTA_ENROLLMENT_SECRET": "not-the-fleet-secret-0123456789"}
    result = enroll(live, live.tmp / "device", env)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "enrollment secret" in lines[0], result.stderr
    assert "re-enroll" not in lines[0]  # there is no enrollment to redo
    assert not (live.tmp / "device" / "device.json").exists()
