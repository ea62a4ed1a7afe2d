"""Release gates through the real entry points (ADR 0014): ``fedota serve
--max-record-epsilon`` refuses a publish with one line naming the numbers, ``fedota
rollout create --quality-tolerance`` sets the quality gate, and ``fedota device enroll
--max-record-epsilon`` persists the device's own budget."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from delta_packager.trust import init_keys, load_signer
from server.ota import wait_until_ready
from tests.client.update.update_fakes import make_base
from tests.repo_helpers import fedota_cli
from tests.server.ota.ota_helpers import (
    ENROLLMENT_SECRET,
    ROLE_KEYS,
    Bundle,
    bundle_bytes,
    free_port,
    settings_env,
    sign_targets,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """``fedota serve --max-record-epsilon 8 --max-delta 1e-5`` on loopback."""
    keys = tmp_path / "KEYS"
    init_keys(keys)
    db_url = f"sqlite:///{tmp_path / 'ota.db'}"
    paths = {
        "root": keys / "root.json",
        "snapshot": keys / "private" / "snapshot.pem",
        "timestamp": keys / "private" / "timestamp.pem",
    }
    env = settings_env(db_url, tmp_path / "storage", paths)
    port = free_port()
    args = ["--database-url", db_url, "--storage", str(tmp_path / "storage")]
    args += ["--trusted-root", str(paths["root"]), "--snapshot-key", str(paths["snapshot"])]
    args += ["--timestamp-key", str(paths["timestamp"]), "--port", str(port), "--migrate"]
    args += ["--text-logs", "--max-record-epsilon", "8", "--max-delta", "1e-5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedota.cli", "serve", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    if not wait_until_ready(url, timeout_s=60, alive=lambda: proc.poll() is None):
        proc.kill()
        raise AssertionError(proc.stderr.read().decode()[-2000:] if proc.stderr else "")
    cli_env = {
        **env,
        "FEDOTA_PUBLISHER_KEY": ROLE_KEYS["publisher"],
        "FEDOTA_OPERATOR_KEY": ROLE_KEYS["operator"],
        "FEDOTA_ENROLLMENT_SECRET": ENROLLMENT_SECRET,
    }
    try:
        yield url, keys, cli_env
    finally:
        proc.kill()
        proc.wait()


def _publish(url: str, keys: Path, env: dict[str, str], tmp: Path, bundle: Bundle, version: int):  # type: ignore[no-untyped-def]
    data = tmp / f"v{bundle.to_version}.fedota"
    data.write_bytes(bundle.data)
    metadata = tmp / f"targets-{version}.json"
    metadata.write_bytes(
        sign_targets(load_signer(keys / "private" / "targets.pem"), version, [bundle])
    )
    return fedota_cli("publish", str(data), "--metadata", str(metadata), "--server", url, env=env)


def test_serve_policy_publish_rollout_and_device_enroll(gated, tmp_path: Path) -> None:
    url, keys, env = gated
    over = Bundle(
        4, bundle_bytes("over"), privacy={"record_epsilon": "9.1", "record_delta": "1e-05"}
    )
    refused = _publish(url, keys, env, tmp_path, over, 2)
    assert refused.returncode == 3, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "release v4 spent record-level ε=9.1 > policy max_record_epsilon=8" in lines[0]

    within = Bundle(
        4, bundle_bytes("ok"), privacy={"record_epsilon": "7.9", "record_delta": "1e-05"}
    )
    accepted = _publish(url, keys, env, tmp_path, within, 2)
    assert accepted.returncode == 0, accepted.stderr
    create = fedota_cli(
        "rollout", "create", "--version", "4", "--base", within.base, "--stages", "10,100",
        "--quality-tolerance", "0.05", "--server", url, env=env,
    )  # fmt: skip
    assert create.returncode == 0, create.stderr
    view = httpx.get(
        f"{url}/v1/rollouts/1", headers={"Authorization": f"Bearer {ROLE_KEYS['operator']}"}
    ).json()
    assert view["quality_tolerance"] == 0.05

    base = tmp_path / "base"
    make_base(base)
    state = tmp_path / "device"
    enrolled = fedota_cli(
        "device", "enroll", "--server", url, "--state", str(state), "--root",
        str(keys / "1.root.json"), "--base", str(base), "--max-record-epsilon", "8",
        "--max-delta", "1e-5", env=env,
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    config = json.loads((state / "device.json").read_text())
    assert config["privacy_policy"] == {"max_record_epsilon": 8.0, "max_delta": 1e-5}


def test_serve_refuses_a_nonpositive_policy_in_one_line(tmp_path: Path) -> None:
    keys = tmp_path / "KEYS"
    init_keys(keys)
    db_url = f"sqlite:///{tmp_path / 'ota.db'}"
    paths = {
        "root": keys / "root.json",
        "snapshot": keys / "private" / "snapshot.pem",
        "timestamp": keys / "private" / "timestamp.pem",
    }
    env = settings_env(db_url, tmp_path / "storage", paths)
    result = fedota_cli(
        "serve", "--database-url", db_url, "--storage", str(tmp_path / "storage"),
        "--trusted-root", str(paths["root"]), "--snapshot-key", str(paths["snapshot"]),
        "--timestamp-key", str(paths["timestamp"]), "--max-record-epsilon", "0", env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_record_epsilon" in lines[0], result.stderr
