"""The operator console's routes: thin, like the API's — read a page through
:mod:`server.ota.console.views` (or act through the same service functions the API
calls) and render a template.

Every page needs a signed-in operator (or admin) session; every POST is checked
against the session's CSRF token first (:mod:`server.ota.console.session`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from server.ota import audit, fleet_stats, inventory, rollouts
from server.ota.audit import AuditFilter, role_actor
from server.ota.auth import ROLE_GRANTS, client_address, role_of_key
from server.ota.console import views
from server.ota.console.charts import adoption_chart
from server.ota.console.formatting import install_filters
from server.ota.console.session import (
    ConsoleSession,
    checked_form,
    clear_cookie,
    new_session,
    session_of,
    set_cookie,
    signed_in,
)
from server.ota.errors import OtaError, RequestError, TooManyRequestsError
from server.ota.services import services_of

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/console", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
install_filters(templates.env)
Operator = Depends(signed_in)
ACTIONS = ("advance", "pause", "resume", "cancel", "rollback")
STATES = tuple(inventory.DeviceState)
PAGE_HEADERS = {
    # inline style attributes only (bar widths); scripts and styles from this server
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def render(
    request: Request, name: str, session: ConsoleSession, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """A page, with the session's CSRF token for its forms, that no other site may frame
    (clickjacking the action buttons) and that loads nothing from elsewhere."""
    response = templates.TemplateResponse(
        request, name, {"session": session, **context}, status_code=status_code
    )
    response.headers.update(PAGE_HEADERS)
    return response


@router.get("")
def home() -> RedirectResponse:
    """The console starts at the fleet overview."""
    return RedirectResponse("/console/fleet", status_code=303)


@router.get("/login")
def login_form(request: Request) -> HTMLResponse:
    """The sign-in form (an anonymous session carries its CSRF token)."""
    session = session_of(request) or new_session()
    response = render(request, "login.html", session)
    set_cookie(request, response, session)
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    """Sign in with the operator (or admin) key, checked as the API checks it."""
    session = session_of(request)
    form = await checked_form(request, session)
    assert session is not None  # checked_form refuses a POST without one
    services = services_of(request)
    keys = (f"console {client_address(request)}",)
    try:
        services.token_failures.refuse_if_blocked(keys)
    except TooManyRequestsError as exc:
        return render(request, "login.html", session, 429, error=str(exc))
    key = form.get("key", "")
    role = role_of_key(services, key) if key else None
    if role is None or "operator" not in ROLE_GRANTS[role]:
        services.token_failures.record_failure(keys)
        error = "that key is not an operator or admin key of this server"
        return render(request, "login.html", session, 401, error=error)
    fresh = new_session(role, role_actor(role, key))
    response = RedirectResponse("/console/fleet", status_code=303)
    set_cookie(request, response, fresh)
    logger.info("console sign-in by %s", fresh.actor)
    return response


@router.post("/logout")
async def logout(request: Request, session: ConsoleSession = Operator) -> Response:
    """End the session."""
    await checked_form(request, session)
    response = RedirectResponse("/console/login", status_code=303)
    clear_cookie(response)
    return response


@router.get("/fleet")
def fleet(request: Request, session: ConsoleSession = Operator) -> HTMLResponse:
    """Devices per version, base, tier and state; adoption over time."""
    services = services_of(request)
    services.seen.flush()
    stale_after_s = services.settings.stale_after_s
    breakdown = fleet_stats.fleet_breakdown(services.db, stale_after_s=stale_after_s)
    chart = adoption_chart(fleet_stats.adoption(services.db))
    return render(request, "fleet.html", session, fleet=breakdown, chart=chart, nav="fleet")


@router.get("/devices")
def devices(
    request: Request,
    q: str = "",
    base: str = "",
    version: str = "",
    runtime: str = "",
    rollout: str = "",
    state: str = "",
    cursor: str | None = None,
    session: ConsoleSession = Operator,
) -> Response:
    """The inventory, filtered by base, installed version, runtime, rollout and state,
    paged; a device id typed in the search box opens that device."""
    services = services_of(request)
    if q.strip():
        return RedirectResponse(f"/console/devices/{quote(q.strip()[:32])}", status_code=303)
    services.seen.flush()  # this worker's pending last-seen times, as the API does
    where = inventory.DeviceFilter(
        base_fingerprint=base.strip()[:80] or None,
        installed_version=_number(version, "version"),
        runtime=runtime.strip()[:64] or None,
        rollout_id=_number(rollout, "rollout"),
        state=inventory.DeviceState(state) if state in STATES else None,
    )
    stale_after_s = services.settings.stale_after_s
    page = views.device_page(services.db, where, cursor or None, stale_after_s=stale_after_s)
    return render(
        request, "devices.html", session, page=page, where=where, states=STATES, nav="devices"
    )


def _number(text: str, what: str) -> int | None:
    text = text.strip().lower().lstrip("v")
    if not text:
        return None
    if not text.isdigit() or len(text) > 9:
        raise RequestError(f"{what} {text[:12]!r} is not a number; leave it empty for any")
    return int(text)


@router.get("/devices/{device_id}")
def device(
    request: Request, device_id: str, cursor: str | None = None, session: ConsoleSession = Operator
) -> HTMLResponse:
    """One device and its history."""
    services = services_of(request)
    services.seen.flush()
    stale_after_s = services.settings.stale_after_s
    detail = views.device_detail(
        services.db, device_id[:32], cursor or None, stale_after_s=stale_after_s
    )
    return render(request, "device.html", session, detail=detail, nav="devices")


@router.get("/releases")
def releases(
    request: Request, cursor: str | None = None, session: ConsoleSession = Operator
) -> HTMLResponse:
    """Releases with the signed provenance of each bundle."""
    services = services_of(request)
    page = views.release_page(services.db, services.blobs, cursor or None)
    return render(request, "releases.html", session, page=page, nav="releases")


@router.get("/rollouts")
def rollout_list(
    request: Request, cursor: str | None = None, session: ConsoleSession = Operator
) -> HTMLResponse:
    """Rollouts with per-stage progress and their controls."""
    page = views.rollout_page(services_of(request).db, cursor or None)
    return render(request, "rollouts.html", session, page=page, nav="rollouts", actions=ACTIONS)


@router.get("/rollouts/{rollout_id}")
def rollout_detail(
    request: Request, rollout_id: int, did: str = "", session: ConsoleSession = Operator
) -> HTMLResponse:
    """One rollout: stages, controls, every transition."""
    db = services_of(request).db
    view = rollouts.get_rollout(db, rollout_id)
    return render(
        request,
        "rollout.html",
        session,
        rollout=view,
        events=rollouts.rollout_event_log(db, rollout_id),
        did=did if did in ACTIONS else "",
        nav="rollouts",
        actions=ACTIONS,
    )


@router.post("/rollouts/{rollout_id}/{action}")
async def rollout_action(
    request: Request, rollout_id: int, action: str, session: ConsoleSession = Operator
) -> Response:
    """Advance, pause, resume or cancel through the service the API uses. Rollback stops
    the rollout (cancel): rolling back is publishing the old adapter as a new, higher
    release (ADR 0004), which needs the offline keys and so cannot happen here."""
    await checked_form(request, session)
    if action not in ACTIONS:
        raise HTTPException(404, f"no rollout action {action[:20]!r}")
    db = services_of(request).db
    act = {
        "advance": rollouts.advance_rollout,
        "pause": rollouts.pause_rollout,
        "resume": rollouts.resume_rollout,
        "cancel": rollouts.cancel_rollout,
        "rollback": rollouts.cancel_rollout,
    }[action]
    try:
        act(db, rollout_id, actor=session.actor or "console")
    except OtaError as exc:
        view = rollouts.get_rollout(db, rollout_id)
        events = rollouts.rollout_event_log(db, rollout_id)
        return render(
            request,
            "rollout.html",
            session,
            exc.http_status,
            rollout=view,
            events=events,
            error=str(exc),
            nav="rollouts",
            actions=ACTIONS,
        )
    logger.info("console: %s %s rollout %d", session.actor, action, rollout_id)
    return RedirectResponse(f"/console/rollouts/{rollout_id}?did={action}", status_code=303)


@router.get("/audit")
def audit_log(
    request: Request,
    action: str = "",
    actor: str = "",
    cursor: str | None = None,
    session: ConsoleSession = Operator,
) -> HTMLResponse:
    """The audit log, newest first, filtered by action or actor."""
    where = AuditFilter(action=action.strip()[:32] or None, actor=actor.strip()[:80] or None)
    page = audit.list_audit(services_of(request).db, where, cursor=cursor or None, limit=views.PAGE)
    return render(request, "audit.html", session, page=page, where=where, nav="audit")
