"""Who may call what: role keys for people and pipelines, bearer tokens for devices.

Roles: ``admin`` may do everything; ``operator`` runs rollouts and reads fleet state;
``publisher`` uploads bundles and releases. A device token is valid only for the device
it was issued to, and never for a role route.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.ota import audit, devices
from server.ota.errors import AuthenticationError, PermissionDeniedError
from server.ota.schemas import DEVICE_ID_PATTERN
from server.ota.services import Services, services_of

bearer = HTTPBearer(auto_error=False, description="A role key or a device token.")
ROLE_GRANTS = {
    "admin": {"admin", "operator", "publisher"},
    "operator": {"operator"},
    "publisher": {"publisher"},
}


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: a role, or a device acting as itself."""

    role: str | None
    device_id: str | None
    actor: str  # as the audit log names it (server.ota.audit)


def bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    """The bearer token of a request.

    Raises:
        AuthenticationError: no ``Authorization: Bearer`` header.
    """
    if credentials is None or not credentials.credentials:
        raise AuthenticationError("missing 'Authorization: Bearer <key or device token>' header")
    return credentials.credentials


def role_of_key(services: Services, key: str) -> str | None:
    """The role a key is configured for (constant-time compares), or None; the operator
    console's login checks keys with it, as the API does."""
    return _role_of(services, key)


def _role_of(services: Services, token: str) -> str | None:
    for role in ("admin", "operator", "publisher"):
        expected = services.settings.secret(f"{role}_key")
        if hmac.compare_digest(token.encode(), expected.encode()):
            return role
    return None


def require_role(needed: str):  # type: ignore[no-untyped-def]
    """A dependency admitting callers whose role grants ``needed``."""

    def dependency(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> Caller:
        token = bearer_token(credentials)
        role = _role_of(services_of(request), token)
        if role is None:
            if token.startswith(devices.TOKEN_PREFIX):
                raise PermissionDeniedError(f"device tokens cannot call {needed} routes")
            raise AuthenticationError("unknown key; use the key configured for this role")
        if needed not in ROLE_GRANTS[role]:
            raise PermissionDeniedError(f"the {role} key cannot call {needed} routes")
        return Caller(role=role, device_id=None, actor=audit.role_actor(role, token))

    return dependency


def client_address(request: Request) -> str:
    """The peer address (behind a reverse proxy, the client's own only if uvicorn trusts
    the proxy's ``X-Forwarded-For``: ``FORWARDED_ALLOW_IPS``, default 127.0.0.1)."""
    return request.client.host if request.client else "unknown"


def enrollment_throttle_keys(request: Request) -> tuple[str, ...]:
    """Wrong enrollment secrets count per client address."""
    return (client_address(request),)


def token_throttle_keys(request: Request, device_id: str) -> tuple[str, ...]:
    """Unknown device tokens count per (client address, claimed device id): a guesser is
    slowed down without letting it lock the real device out from elsewhere."""
    return (f"{client_address(request)} {device_id}",)


@contextmanager
def counting_token_failures(request: Request, device_id: str) -> Iterator[None]:
    """Refuse a throttled caller up front; count an unknown or revoked token it sends.

    Raises:
        TooManyRequestsError: this caller sent too many unknown tokens for this device.
    """
    throttle = services_of(request).token_failures
    keys = token_throttle_keys(request, device_id)
    throttle.refuse_if_blocked(keys)
    try:
        yield
    except AuthenticationError:
        throttle.record_failure(keys)
        raise


def require_device(
    request: Request,
    device_id: str = Path(pattern=DEVICE_ID_PATTERN),
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
) -> Caller:
    """Admit only the device named in the path, with its own live token."""
    token = bearer_token(credentials)
    with counting_token_failures(request, device_id):
        devices.authenticate(services_of(request).db, token, device_id)
    return Caller(role=None, device_id=device_id, actor=f"device:{device_id}")


def require_device_or_operator(
    request: Request,
    device_id: str = Path(pattern=DEVICE_ID_PATTERN),
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
) -> Caller:
    """The device itself, or an operator."""
    token = bearer_token(credentials)
    role = _role_of(services_of(request), token)
    if role is not None:
        if "operator" not in ROLE_GRANTS[role]:
            raise PermissionDeniedError(f"the {role} key cannot read device state")
        return Caller(role=role, device_id=None, actor=audit.role_actor(role, token))
    with counting_token_failures(request, device_id):
        devices.authenticate(services_of(request).db, token, device_id)
    return Caller(role=None, device_id=device_id, actor=f"device:{device_id}")
