"""Errors raised by the OTA service, grouped by who is at fault.

Each class carries the HTTP status it maps to (``http_status``) so that one handler in
:mod:`server.ota.app` turns any of them into a JSON error, and the ``exit_code`` the
``fedota`` CLI exits with when one reaches it.
"""

from __future__ import annotations

from server.errors import ServerError


class OtaError(ServerError):
    """Root of every error the OTA service raises on purpose."""

    http_status = 500
    exit_code = 1


class OtaConfigError(OtaError):
    """The service is misconfigured (missing secret, bad key file, unmigrated database)."""

    http_status = 500
    exit_code = 2


class DatabaseNotMigratedError(OtaConfigError):
    """The database schema is not at the revision this code expects."""


class RequestError(OtaError):
    """The caller sent something the service cannot use."""

    http_status = 400
    exit_code = 2


class AuthenticationError(RequestError):
    """No credential, an unknown one, or a revoked one."""

    http_status = 401


class PermissionDeniedError(RequestError):
    """A valid credential that may not do this (device A acting as B, device on admin route)."""

    http_status = 403


class NotFoundError(RequestError):
    """The named resource does not exist."""

    http_status = 404


class ConflictError(RequestError):
    """The request contradicts the current state (older release, rollout already ended)."""

    http_status = 409


class PayloadTooLargeError(RequestError):
    """The request body is larger than the configured bound."""

    http_status = 413


class RangeNotSatisfiableError(RequestError):
    """A ``Range`` header that does not overlap the resource."""

    http_status = 416

    def __init__(self, message: str, *, length: int) -> None:
        super().__init__(message)
        self.length = length


class TooManyRequestsError(RequestError):
    """Too many failed credentials from this client; it may retry after ``retry_after_s``."""

    http_status = 429

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ReleaseRejectedError(RequestError):
    """A release whose signature, hashes or custom metadata do not verify.

    400 rather than 422: 422 is reserved for request-shape validation (one schema).
    """

    http_status = 400
    exit_code = 3


class ReleaseGateError(ReleaseRejectedError):
    """A release refused by the operator's release gate: its signed provenance spent more
    privacy than the server's policy allows (ADR 0014)."""


class OverloadedError(OtaError):
    """Too many requests in flight; the caller should retry after ``retry_after_s``."""

    http_status = 503
    exit_code = 4

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServerUnreachableError(OtaError):
    """The CLI could not reach the OTA server (network trouble; trying later may work)."""

    http_status = 503
    exit_code = 4


class RemoteRejectedError(OtaError):
    """The OTA server refused a CLI request; the message is the server's."""

    exit_code = 2

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.http_status = status
        self.exit_code = 3 if status in (400, 401, 403) else 2
