"""Console sessions: a signed, expiring cookie and a CSRF token per session.

The cookie holds ``{role, actor, csrf, exp}`` as base64url JSON with an HMAC-SHA256 over
it. The signing key is derived from the server's role keys, so every worker (and every
host behind one database) accepts the same cookies without shared state, and rotating
a role key ends every session. It is ``HttpOnly`` (no script reads it),
``SameSite=Strict`` (no other site's page sends it) and scoped to ``/console``.

Every visitor gets a session, signed in or not, so the login form carries a CSRF token
too; signing in issues a fresh session (new token), never reusing the anonymous one.
Every POST must echo the session's token in its ``csrf`` field (a constant-time
compare), or it is refused with 403 before anything runs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request, Response
from starlette.exceptions import HTTPException

from server.ota.services import services_of
from server.ota.settings import OtaSettings

COOKIE = "fedota_console"
SESSION_TTL_S = 8 * 3600
ANONYMOUS_TTL_S = 3600
MAX_FORM_BYTES = 16 * 1024


@dataclass(frozen=True)
class ConsoleSession:
    """Who is signed in (``role`` None: nobody yet), and the session's CSRF token."""

    role: str | None
    actor: str | None
    csrf: str
    expires_at: float


def _signing_key(request: Request) -> bytes:
    return signing_key(services_of(request).settings)


def signing_key(settings: OtaSettings) -> bytes:
    """The key session cookies are signed with (derived from the role keys)."""
    material = "\0".join(settings.secret(f"{r}_key") for r in ("admin", "operator", "publisher"))
    return hashlib.sha256(b"fedota-console-session\0" + material.encode()).digest()


def encode(key: bytes, session: ConsoleSession) -> str:
    """The cookie value of ``session`` signed with ``key``."""
    body = json.dumps(
        [session.role, session.actor, session.csrf, session.expires_at], separators=(",", ":")
    )
    payload = base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
    mac = hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}.{mac}"


def _decode(key: bytes, value: str) -> ConsoleSession | None:
    payload, _, mac = value.partition(".")
    expected = hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, expected):
        return None
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        role, actor, csrf, expires_at = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        return None
    if not isinstance(csrf, str) or not isinstance(expires_at, int | float):
        return None
    if expires_at < time.time():
        return None
    return ConsoleSession(role=role, actor=actor, csrf=csrf, expires_at=float(expires_at))


def new_session(role: str | None = None, actor: str | None = None) -> ConsoleSession:
    """A fresh session with a new CSRF token."""
    ttl = SESSION_TTL_S if role else ANONYMOUS_TTL_S
    return ConsoleSession(role, actor, secrets.token_urlsafe(32), time.time() + ttl)


def session_of(request: Request) -> ConsoleSession | None:
    """The request's valid, unexpired session (None: absent, forged or expired)."""
    value = request.cookies.get(COOKIE)
    return _decode(_signing_key(request), value) if value else None


def set_cookie(request: Request, response: Response, session: ConsoleSession) -> None:
    """Send ``session`` as the console cookie (``Secure`` when served over HTTPS)."""
    response.set_cookie(
        COOKIE,
        encode(_signing_key(request), session),
        max_age=max(int(session.expires_at - time.time()), 1),
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(response: Response) -> None:
    """Forget the session in the browser."""
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict")


def signed_in(request: Request) -> ConsoleSession:
    """The signed-in session, or a redirect to the login form (303).

    Raises:
        HTTPException: 303 to ``/console/login`` when nobody is signed in.
    """
    session = session_of(request)
    if session is None or session.role is None:
        raise HTTPException(303, "sign in first", headers={"Location": "/console/login"})
    return session


async def checked_form(request: Request, session: ConsoleSession | None) -> dict[str, str]:
    """The POSTed form, once its CSRF token matches the session's.

    Raises:
        HTTPException: 403 without a session or with a missing or wrong token; 413
            beyond ``MAX_FORM_BYTES``.
    """
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, f"form over {MAX_FORM_BYTES} bytes")
    form = _parse_form(body)
    given = form.get("csrf", "")
    if session is None or not hmac.compare_digest(given.encode(), session.csrf.encode()):
        raise HTTPException(403, "CSRF token missing or wrong; reload the page and try again")
    return form


def _parse_form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise HTTPException(400, "form is not UTF-8") from exc
    parsed: dict[str, Any] = parse_qs(text, keep_blank_values=True, max_num_fields=20)
    return {k: v[0] for k, v in parsed.items()}
