"""The OTA server's device API (``/v1/devices``), as the agent uses it.

Shapes follow ``server/ota/schemas.py``: enrollment returns ``device_id`` and a token
shown once; ``POST /v1/devices/{id}/check`` returns ``{"update": target | null}``;
``POST /v1/devices/{id}/events`` stores an event once per ``event_id``. The offer is a
hint only: what is installed is decided from verified TUF metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx

from client.update.errors import UpdateRejectedError, UpdateTransientError
from client.update.transport import Retrier, check_response

__all__ = ["DeviceReport", "Offer", "check_for_update", "enroll", "post_event"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceReport:
    """What the device tells the server about itself."""

    base_fingerprint: str
    installed_version: int | None
    memory_budget_bytes: int

    def to_json(self) -> dict[str, Any]:
        """Request body."""
        return {
            "base_fingerprint": self.base_fingerprint,
            "installed_version": self.installed_version,
            "capabilities": {"supports_delta": True, "format_versions": [1], "runtime": "fedota"},
            "memory_budget_bytes": self.memory_budget_bytes,
        }


@dataclass(frozen=True)
class Offer:
    """The server's (unauthenticated-content) suggestion of what to install next."""

    path: str
    to_version: int


def _fail(response: httpx.Response, what: str) -> UpdateRejectedError | UpdateTransientError:
    detail = response.text[:300]
    if response.status_code in (401, 403):
        return UpdateRejectedError(
            f"{what}: the server refused this device ({response.status_code}: {detail}); "
            "its token may be revoked: re-enroll it",
            reason="unauthorized",
        )
    return UpdateTransientError(f"{what}: server answered {response.status_code}: {detail}")


def enroll(
    http: httpx.Client, retrier: Retrier, *, report: DeviceReport, enrollment_secret: str
) -> tuple[str, str]:
    """Enroll; return ``(device_id, token)``.

    Raises:
        UpdateRejectedError: wrong enrollment secret.
        UpdateTransientError: the server is unavailable.
    """
    body = {**report.to_json(), "enrollment_secret": enrollment_secret}
    response = retrier.run(
        lambda: check_response(http.post("/v1/devices", json=body)), what="enroll"
    )
    if response.status_code in (401, 403):
        raise UpdateRejectedError(
            f"enroll: the server refused the enrollment secret ({response.status_code}): "
            "check the fleet's secret with its operator (--enroll-secret-env names the "
            "variable that holds it)",
            reason="unauthorized",
        )
    if response.status_code != 201:
        raise _fail(response, "enroll")
    data = response.json()
    return str(data["device_id"]), str(data["token"])


def check_for_update(
    http: httpx.Client, retrier: Retrier, *, device_id: str, token: str, report: DeviceReport
) -> Offer | None:
    """Ask the server what to install next.

    Raises:
        UpdateRejectedError: the token was refused.
        UpdateTransientError: the server is unavailable or answered nonsense.
    """
    headers = {"Authorization": f"Bearer {token}"}
    response = retrier.run(
        lambda: check_response(
            http.post(f"/v1/devices/{device_id}/check", json=report.to_json(), headers=headers)
        ),
        what="check for update",
    )
    if response.status_code != 200:
        raise _fail(response, "check for update")
    try:
        update = response.json()["update"]
        if update is None:
            return None
        return Offer(path=str(update["path"]), to_version=int(update["to_version"]))
    except (ValueError, KeyError, TypeError) as e:
        raise UpdateTransientError(f"check for update: unreadable answer ({e})") from e


def post_event(
    http: httpx.Client, retrier: Retrier, *, device_id: str, token: str, event: dict[str, Any]
) -> bool:
    """Post one telemetry event; ``True`` when the server has it (stored now or before),
    ``False`` when it refused it for good (4xx: the event is dropped).

    Raises:
        UpdateTransientError: the server is unavailable (the event stays queued).
    """
    headers = {"Authorization": f"Bearer {token}"}
    response = retrier.run(
        lambda: check_response(
            http.post(f"/v1/devices/{device_id}/events", json=event, headers=headers)
        ),
        what="post telemetry",
    )
    if response.status_code == 200:
        return True
    if 400 <= response.status_code < 500:
        logger.warning("server refused event %s: %s", event.get("event_id"), response.text[:200])
        return False
    raise UpdateTransientError(f"post telemetry: server answered {response.status_code}")
