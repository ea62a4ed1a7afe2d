"""④ publish, from the simulation's side: a client of the OTA server, and the server
it talks to when none is given.

``EmbeddedServer`` runs the real ``fedota serve`` (SQLite + local blob store) as a
child process bound to 127.0.0.1 only, with fresh random role secrets; ``Endpoint``
names a server that already runs (``--server URL``). ``Operator`` publishes releases
and drives rollouts over the real HTTP API with the publisher and operator keys.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.ota import OtaRemote, RemoteRejectedError, ServerUnreachableError, wait_until_ready
from simulation.errors import SimulationError

__all__ = ["EmbeddedServer", "Endpoint", "Operator", "ServerStartError"]

logger = logging.getLogger(__name__)


class ServerStartError(SimulationError):
    """The embedded OTA server did not come up."""

    exit_code = 4


@dataclass(frozen=True)
class Endpoint:
    """An OTA server and the secrets the simulation uses on it.

    Attributes:
        url: Base URL (``http://127.0.0.1:PORT``).
        publisher_key: Publisher role key (uploads and releases).
        operator_key: Operator role key (rollouts).
        enrollment_secret: Fleet enrollment secret.
    """

    url: str
    publisher_key: str
    operator_key: str
    enrollment_secret: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedServer:
    """``fedota serve`` on loopback with SQLite in ``work_dir`` (a context manager).

    Args:
        work_dir: Holds ``ota.db``, ``storage/`` and the server log.
        keys_dir: The release pipeline's keys (root.json and the online PEMs).
        start_timeout_s: How long to wait for ``/readyz``.
        seed: Makes the server derive device ids and rollout salts from it
            (``OtaSettings.simulation_seed``), so the same devices land in the same
            rollout stages on every run of a seed; ``None``: random, as in production.
    """

    def __init__(
        self,
        work_dir: Path,
        keys_dir: Path,
        *,
        start_timeout_s: float = 90.0,
        seed: int | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.seed = seed
        self.keys_dir = keys_dir
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self.endpoint: Endpoint | None = None

    def start(self) -> Endpoint:
        """Start the server and wait until it is ready.

        Raises:
            ServerStartError: the process exited or did not become ready in time.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        keys = {role: secrets.token_hex(16) for role in ("admin", "operator", "publisher")}
        enroll = secrets.token_hex(16)
        env = {
            **os.environ,
            **{f"FEDOTA_OTA_{r.upper()}_KEY": k for r, k in keys.items()},
            "FEDOTA_OTA_ENROLLMENT_SECRET": enroll,
            **({} if self.seed is None else {"FEDOTA_OTA_SIMULATION_SEED": str(self.seed)}),
        }
        port = _free_port()
        log = (self.work_dir / "server.log").open("ab")
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedota.cli",
                "serve",
                "--database-url",
                f"sqlite:///{self.work_dir / 'ota.db'}",
                "--storage",
                str(self.work_dir / "storage"),
                "--trusted-root",
                str(self.keys_dir / "root.json"),
                "--snapshot-key",
                str(self.keys_dir / "private" / "snapshot.pem"),
                "--timestamp-key",
                str(self.keys_dir / "private" / "timestamp.pem"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--migrate",
                "--text-logs",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        url = f"http://127.0.0.1:{port}"
        self._wait_ready(url)
        self.endpoint = Endpoint(url, keys["publisher"], keys["operator"], enroll)
        logger.info("embedded OTA server ready at %s (pid %d)", url, self._proc.pid)
        return self.endpoint

    def _wait_ready(self, url: str) -> None:
        proc = self._proc
        assert proc is not None
        if not wait_until_ready(
            url, timeout_s=self.start_timeout_s, alive=lambda: proc.poll() is None
        ):
            self.stop()
            tail = (self.work_dir / "server.log").read_text(errors="replace")[-1500:]
            raise ServerStartError(
                f"the embedded OTA server did not become ready at {url}: {tail.strip()} "
                f"(full log: {self.work_dir / 'server.log'})"
            )

    def stop(self) -> None:
        """Terminate the server process (and kill it if it does not exit)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> Endpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Operator:
    """Release pipeline and rollout operator on one server (publisher + operator keys)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._publisher = OtaRemote(endpoint.url, endpoint.publisher_key)
        self._operator = OtaRemote(endpoint.url, endpoint.operator_key)

    def publish(self, bundles: list[Path], targets_metadata: Path) -> dict[str, Any]:
        """Upload ``bundles`` and publish the signed targets metadata.

        Raises:
            RemoteRejectedError: the server refused a bundle or the release.
            ServerUnreachableError: the server is down.
        """
        for bundle in bundles:
            self._publisher.upload_bundle(bundle)
        return self._publisher.publish(targets_metadata.read_bytes())

    def create_rollout(self, version: int, base_fingerprint: str, **policy: Any) -> dict[str, Any]:
        """Start a staged rollout (``policy``: stages, max_failure_rate, min_reports,
        quality_tolerance).

        Raises:
            RemoteRejectedError: no full bundle of that version, or a newer rollout exists.
        """
        body = {"base_fingerprint": base_fingerprint, "to_version": version, **policy}
        result: dict[str, Any] = self._operator.request("POST", "/v1/rollouts", json=body)
        return result

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        """One rollout with its per-stage outcomes.

        Raises:
            RemoteRejectedError: no such rollout.
        """
        result: dict[str, Any] = self._operator.request("GET", f"/v1/rollouts/{rollout_id}")
        return result

    def action(self, rollout_id: int, action: str) -> dict[str, Any]:
        """``pause``, ``resume``, ``advance`` or ``cancel`` a rollout.

        Raises:
            RemoteRejectedError: the transition is not allowed in the rollout's state.
        """
        result: dict[str, Any] = self._operator.request(
            "POST", f"/v1/rollouts/{rollout_id}/{action}"
        )
        return result

    def events(self, rollout_id: int) -> list[dict[str, Any]]:
        """The rollout's transitions, oldest first."""
        result: list[dict[str, Any]] = self._operator.request(
            "GET", f"/v1/rollouts/{rollout_id}/events"
        )
        return result

    def fleet(self) -> dict[str, Any]:
        """Versions installed across the fleet and every rollout."""
        result: dict[str, Any] = self._operator.request("GET", "/v1/fleet")
        return result

    def close(self) -> None:
        """Close both connection pools."""
        self._publisher.close()
        self._operator.close()


__all__ += ["RemoteRejectedError", "ServerUnreachableError"]
