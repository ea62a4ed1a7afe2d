"""Test helpers for the OTA server: a throwaway TUF key set and signed releases.

Built with python-tuf's Metadata API directly (the release pipeline in
``delta_packager`` produces the same files; these tests must not depend on it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from server.ota import Database, wait_until_ready
from server.ota.domain import bucket_of, stage_of
from server.ota.models import RolloutRow

FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64
FP_C = "sha256:" + "c" * 64  # e.g. a GGUF export of base A
ROLE_KEYS = {
    "admin": "admin-key-0123456789abcdef",
    "operator": "operator-key-0123456789abcdef",
    "publisher": "publisher-key-0123456789abcdef",
}
ENROLLMENT_SECRET = "enroll-secret-0123456789abcdef"


def _expires(days: int = 30) -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=days)


@dataclass
class TufKeys:
    """Offline root/targets signers and the server's online snapshot/timestamp keys."""

    root: CryptoSigner = field(default_factory=CryptoSigner.generate_ed25519)
    targets: CryptoSigner = field(default_factory=CryptoSigner.generate_ed25519)
    snapshot: CryptoSigner = field(default_factory=CryptoSigner.generate_ed25519)
    timestamp: CryptoSigner = field(default_factory=CryptoSigner.generate_ed25519)

    def root_metadata(self, version: int = 1) -> Metadata[Root]:
        root = Root(version=version, expires=_expires(365), consistent_snapshot=True)
        for role in ("root", "targets", "snapshot", "timestamp"):
            root.add_key(getattr(self, role).public_key, role)
        md = Metadata(root)
        md.sign(self.root)
        return md

    def write(self, directory: Path) -> dict[str, Path]:
        """Write root.json and the two online key PEMs (the server's configuration)."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "root": directory / "root.json",
            "snapshot": directory / "snapshot.pem",
            "timestamp": directory / "timestamp.pem",
        }
        paths["root"].write_bytes(self.root_metadata().to_bytes())
        paths["snapshot"].write_bytes(self.snapshot.private_bytes)
        paths["timestamp"].write_bytes(self.timestamp.private_bytes)
        return paths


@dataclass(frozen=True)
class Bundle:
    """A fake bundle: bytes plus the custom metadata the contract requires."""

    to_version: int
    data: bytes
    kind: str = "full"
    from_version: int | None = None
    base: str = FP_A
    also: tuple[str, ...] = ()  # compatible bases (custom.fedota.compatible_bases)
    privacy: dict[str, str] | None = None  # the signed spend (custom.fedota.privacy)

    @property
    def path(self) -> str:
        suffix = f"delta-{self.from_version}" if self.kind == "delta" else "full"
        return f"adapters/{self.to_version}/{self.base[7:15]}-{suffix}.fedota"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def target_file(self) -> TargetFile:
        custom: dict[str, Any] = {
            "fedota": {
                "format_version": 1,
                "kind": self.kind,
                "from_version": self.from_version,
                "to_version": self.to_version,
                "release_counter": self.to_version,
                "base_fingerprint": self.base,
                "uncompressed_bytes": len(self.data) * 2,
            }
        }
        if self.also:
            custom["fedota"]["compatible_bases"] = list(self.also)
        if self.privacy is not None:
            custom["fedota"]["privacy"] = dict(self.privacy)
        return TargetFile(
            length=len(self.data),
            hashes={"sha256": self.sha256},
            path=self.path,
            unrecognized_fields={"custom": custom},
        )


def sign_targets(signer: CryptoSigner, version: int, bundles: list[Bundle]) -> bytes:
    """Targets metadata v``version`` naming ``bundles``, signed by ``signer``."""
    targets = Targets(version=version, expires=_expires())
    for bundle in bundles:
        targets.targets[bundle.path] = bundle.target_file()
    md = Metadata(targets)
    md.sign(signer)
    return md.to_bytes()


def bundle_bytes(tag: str, size: int = 10_000) -> bytes:
    """Deterministic pseudo-random bytes (distinct per tag)."""
    seed = hashlib.sha256(tag.encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def settings_env(db_url: str, storage: Path, key_paths: dict[str, Path]) -> dict[str, str]:
    """Environment that configures a server process."""
    env = {
        "FEDOTA_OTA_DATABASE_URL": db_url,
        "FEDOTA_OTA_STORAGE_DIR": str(storage),
        "FEDOTA_OTA_TRUSTED_ROOT": str(key_paths["root"]),
        "FEDOTA_OTA_SNAPSHOT_KEY": str(key_paths["snapshot"]),
        "FEDOTA_OTA_TIMESTAMP_KEY": str(key_paths["timestamp"]),
        "FEDOTA_OTA_ENROLLMENT_SECRET": ENROLLMENT_SECRET,
    }
    for role, key in ROLE_KEYS.items():
        env[f"FEDOTA_OTA_{role.upper()}_KEY"] = key
    return {**os.environ, **env}


def auth(role_or_token: str) -> dict[str, str]:
    """Authorization header for a role name or a device token."""
    token = ROLE_KEYS.get(role_or_token, role_or_token)
    return {"Authorization": f"Bearer {token}"}


# ---- driving a server through its HTTP API --------------------------------------------


@dataclass(frozen=True)
class Device:
    id: str
    token: str


def upload(client: Any, bundle: Bundle) -> None:
    response = client.put(
        f"/v1/blobs/{bundle.sha256}", content=bundle.data, headers=auth("publisher")
    )
    assert response.status_code == 201, response.text


def publish(client: Any, keys: TufKeys, version: int, bundles: list[Bundle]) -> Any:
    """Upload every bundle and publish targets v``version`` naming them; returns the response."""
    for bundle in bundles:
        upload(client, bundle)
    return client.post(
        "/v1/releases",
        content=sign_targets(keys.targets, version, bundles),
        headers={**auth("publisher"), "Content-Type": "application/json"},
    )


def report(base: str = FP_A, installed: int | None = None, **caps: Any) -> dict[str, Any]:
    return {
        "base_fingerprint": base,
        "installed_version": installed,
        "capabilities": {"supports_delta": True, "format_versions": [1], **caps},
        "memory_budget_bytes": 512 * 2**20,
    }


def enroll(client: Any, base: str = FP_A, installed: int | None = None) -> Device:
    response = client.post(
        "/v1/devices", json={**report(base, installed), "enrollment_secret": ENROLLMENT_SECRET}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return Device(body["device_id"], body["token"])


def check(client: Any, device: Device, installed: int | None, base: str = FP_A, **caps: Any) -> Any:
    response = client.post(
        f"/v1/devices/{device.id}/check",
        json=report(base, installed, **caps),
        headers=auth(device.token),
    )
    assert response.status_code == 200, response.text
    return response.json()["update"]


def event(
    client: Any,
    device: Device,
    *,
    event_id: str,
    seq: int,
    type: str,
    version: int,
    installed: int | None,
) -> Any:
    return client.post(
        f"/v1/devices/{device.id}/events",
        json={
            "event_id": event_id,
            "seq": seq,
            "type": type,
            "version": version,
            "installed_version": installed,
        },
        headers=auth(device.token),
    )


def create_rollout(
    client: Any,
    to_version: int,
    stages: list[int],
    *,
    base: str = FP_A,
    max_failure_rate: float = 0.2,
    min_reports: int = 1,
) -> dict[str, Any]:
    response = client.post(
        "/v1/rollouts",
        json={
            "base_fingerprint": base,
            "to_version": to_version,
            "stages": stages,
            "max_failure_rate": max_failure_rate,
            "min_reports": min_reports,
        },
        headers=auth("operator"),
    )
    assert response.status_code == 201, response.text
    return response.json()


def first_stage(db: Database, rollout_id: str, devices: list[Device]) -> list[Device]:
    """The ``devices`` a rollout's first stage holds (its salt and stages read from ``db``)."""
    with db.read() as session:
        row = session.get(RolloutRow, rollout_id)
        assert row is not None
        salt, stages = row.salt, tuple(row.stages)
    return [d for d in devices if stage_of(stages, bucket_of(salt, d.id)) == 0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """The app under uvicorn on loopback (configured by ``env``), SIGKILLed on exit."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "server.ota.app:app_from_env",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    if not wait_until_ready(url, timeout_s=30, alive=lambda: proc.poll() is None):
        proc.kill()
        raise AssertionError(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
