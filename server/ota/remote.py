"""A small HTTP client for the ``fedota publish`` and ``fedota rollout`` commands, and
``wait_until_ready`` for whoever starts a ``fedota serve`` process."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from server.ota.errors import RemoteRejectedError, ServerUnreachableError


def wait_until_ready(
    url: str, *, timeout_s: float, alive: Callable[[], bool] = lambda: True
) -> bool:
    """Poll ``GET url/readyz`` until it answers 200.

    Args:
        url: The server's base URL.
        timeout_s: Give up after this long.
        alive: Checked between polls; polling stops early when it turns false (e.g.
            ``lambda: proc.poll() is None`` for a server child process).

    Returns:
        Whether the server became ready (``False``: timed out or no longer alive).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url.rstrip('/')}/readyz", timeout=1.0).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.2)


# Idle pooled connections are dropped after this long, well before any server closes
# them (``fedota serve``: 15 s; uvicorn's default: 5 s). Reusing a connection the server
# is closing at that moment fails with "Server disconnected without sending a
# response", and a publish (POST) is not safe to retry blindly.
KEEPALIVE_EXPIRY_S = 1.0


class OtaRemote:
    """Calls one OTA server with one role key."""

    def __init__(self, server: str, key: str, *, timeout_s: float = 60.0) -> None:
        self._client = httpx.Client(
            base_url=server.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout_s,
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request; returns the decoded JSON body (None for 204).

        Raises:
            ServerUnreachableError: connection trouble.
            RemoteRejectedError: a 4xx/5xx answer (with the server's explanation).
        """
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachableError(
                f"cannot reach {self._client.base_url}: {exc}; check --server and try again"
            ) from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except (json.JSONDecodeError, AttributeError):
                detail = response.text
            raise RemoteRejectedError(
                f"{method} {path} -> {response.status_code}: {detail}", status=response.status_code
            )
        return None if response.status_code == 204 else response.json()

    def upload_bundle(self, path: Path) -> dict[str, Any]:
        """Upload one bundle file (content-addressed; re-uploading is harmless)."""
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        with path.open("rb") as handle:
            result: dict[str, Any] = self.request(
                "PUT",
                f"/v1/blobs/{digest.hexdigest()}",
                content=handle,
                headers={"Content-Type": "application/octet-stream"},
            )
        return result

    def publish(self, targets_metadata: bytes) -> dict[str, Any]:
        """Publish a release from signed targets metadata bytes (sent exactly as signed)."""
        result: dict[str, Any] = self.request(
            "POST",
            "/v1/releases",
            content=targets_metadata,
            headers={"Content-Type": "application/json"},
        )
        return result

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()
