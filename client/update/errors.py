"""Errors of the update agent, grouped by who is at fault.

* ``UpdateRejectedError`` — the release or the server is at fault: bad signature,
  stale metadata, wrong base, rollback, health check failed. Nothing was applied.
  Exit code 3.
* ``UpdateTransientError`` — the network or server is unavailable, or another updater
  holds the lock; trying again later may work. Exit code 4.
* ``DeviceStateError`` — the device's state directory is missing, not enrolled or
  corrupt; the operator must re-provision it. Exit code 2.
"""

from __future__ import annotations

from client.errors import ClientError, ClientInputError

__all__ = [
    "DeviceStateError",
    "UpdateBusyError",
    "UpdateError",
    "UpdateRejectedError",
    "UpdateTransientError",
]


class UpdateError(ClientError):
    """Root of the update agent's errors."""

    exit_code = 2


class UpdateRejectedError(UpdateError):
    """A release was refused for safety; ``reason`` is a short machine-readable code."""

    exit_code = 3

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UpdateTransientError(UpdateError):
    """Network or server trouble; nothing was applied and a later attempt may work."""

    exit_code = 4


class UpdateRetryError(UpdateTransientError):
    """A device-local or transport problem with an offered release; not the release's fault.

    The disk filled while staging, or the payload did not match its signed length or hash
    (a corrupt mirror or CDN edge, a truncated or swapped file). The device reports a
    ``retry`` outcome (ADR 0007): the server keeps offering the release and does not count
    it as a failed install; ``reason`` is a short machine-readable code.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UpdateBusyError(UpdateTransientError):
    """Another update process holds this device's lock."""


class DeviceStateError(UpdateError, ClientInputError):
    """The device state directory is missing, not enrolled, or corrupt."""

    exit_code = 2
