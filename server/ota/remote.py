"""A small HTTP client for the ``fedota publish`` and ``fedota rollout`` commands."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx

from server.ota.errors import RemoteRejectedError, ServerUnreachableError


class OtaRemote:
    """Calls one OTA server with one role key."""

    def __init__(self, server: str, key: str, *, timeout_s: float = 60.0) -> None:
        self._client = httpx.Client(
            base_url=server.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout_s,
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
