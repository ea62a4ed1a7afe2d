"""The operator console over HTTP, in process (issue 24 item 5): sign-in, session
cookie, CSRF on every POST, rollout actions through the same services as the API, and
keyset pages over a fleet of 100,000 devices. The browser tests are in
``test_console_browser.py``."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert

from server.ota import Database, make_engine
from server.ota.console.session import COOKIE, ConsoleSession, encode, signing_key
from server.ota.models import DeviceRow
from tests.server.ota.console_helpers import OPERATOR_KEY, csrf_of, seed_fleet
from tests.server.ota.ota_helpers import (
    FP_A,
    FP_B,
    ROLE_KEYS,
    Bundle,
    auth,
    bundle_bytes,
    publish,
)

PAGES = ("/console/fleet", "/console/devices", "/console/releases", "/console/rollouts",
         "/console/rollouts/1", "/console/audit")  # fmt: skip


def sign_in(client: TestClient, key: str = OPERATOR_KEY) -> str:
    """Sign in; returns the session's CSRF token."""
    token = csrf_of(client.get("/console/login").text)
    response = client.post(
        "/console/login", data={"csrf": token, "key": key}, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    return csrf_of(client.get("/console/fleet").text)


@pytest.fixture
def console(make_client, sqlite_url, tuf_keys) -> TestClient:
    client: TestClient = make_client(sqlite_url)
    seed_fleet(client, tuf_keys, devices=24)
    return client


def test_every_page_sends_a_visitor_without_a_valid_session_to_sign_in(console) -> None:
    forged = ConsoleSession("operator", "operator:x", "t", time.time() + 3600)
    expired = ConsoleSession("operator", "operator:x", "t", time.time() - 1)
    key = b"not the server's signing key"
    for cookie in (None, encode(key, forged), "garbage", "a.b"):
        console.cookies.clear()
        if cookie:
            console.cookies.set(COOKIE, cookie, path="/console")
        for page in PAGES:
            response = console.get(page, follow_redirects=False)
            assert response.status_code == 303, (page, cookie)
            assert response.headers["location"] == "/console/login"
    real = signing_key(console.app.state.services.settings)
    console.cookies.set(COOKIE, encode(real, expired), path="/console")
    assert console.get("/console/fleet", follow_redirects=False).status_code == 303
    console.cookies.set(COOKIE, encode(real, forged), path="/console")  # the control
    assert console.get("/console/fleet", follow_redirects=False).status_code == 200


def test_sign_in_checks_the_key_as_the_api_does_and_sets_a_strict_cookie(console) -> None:
    token = csrf_of(console.get("/console/login").text)
    for key in ("", "wrong-key-0123456789abcdef", ROLE_KEYS["publisher"]):
        refused = console.post("/console/login", data={"csrf": token, "key": key})
        assert refused.status_code == 401, key
        assert "not an operator or admin key" in refused.text
    response = console.post(
        "/console/login", data={"csrf": token, "key": ROLE_KEYS["admin"]}, follow_redirects=False
    )
    assert response.status_code == 303 and response.headers["location"] == "/console/fleet"
    cookie = response.headers["set-cookie"].lower()
    for flag in ("httponly", "samesite=strict", "path=/console", "max-age=28"):
        assert flag in cookie, cookie
    page = console.get("/console/fleet")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    fresh = csrf_of(page.text)
    assert fresh != token  # signing in never keeps the anonymous session's token
    assert "admin:" in console.get("/console/fleet").text  # the audit actor is shown


def test_wrong_keys_are_throttled_per_client(console) -> None:
    token = csrf_of(console.get("/console/login").text)
    codes = [
        console.post("/console/login", data={"csrf": token, "key": f"wrong-{n:020d}"}).status_code
        for n in range(12)
    ]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    good = console.post("/console/login", data={"csrf": token, "key": OPERATOR_KEY})
    assert good.status_code == 429  # the right key waits out the window too


def test_every_post_needs_the_sessions_csrf_token(console, make_client, sqlite_url) -> None:
    anonymous = csrf_of(console.get("/console/login").text)
    no_token = console.post("/console/login", data={"key": OPERATOR_KEY}, follow_redirects=False)
    assert no_token.status_code == 403
    token = sign_in(console)
    assert token != anonymous
    for body in ({}, {"csrf": ""}, {"csrf": anonymous}, {"csrf": token + "x"}):
        for path in ("/console/rollouts/1/pause", "/console/rollouts/1/cancel", "/console/logout"):
            assert console.post(path, data=body).status_code == 403, (path, body)
    state = console.get("/v1/rollouts/1", headers=auth("operator")).json()["state"]
    assert state == "active"  # nothing refused ran
    assert console.get("/console/fleet", follow_redirects=False).status_code == 200  # still in

    ok = console.post("/console/rollouts/1/pause", data={"csrf": token}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/console/rollouts/1?did=pause"
    assert console.get("/v1/rollouts/1", headers=auth("operator")).json()["state"] == "paused"
    out = console.post("/console/logout", data={"csrf": token}, follow_redirects=False)
    assert out.status_code == 303 and COOKIE in out.headers["set-cookie"]
    assert console.get("/console/fleet", follow_redirects=False).status_code == 303


def test_rollout_actions_go_through_the_services_and_are_audited(console) -> None:
    token = sign_in(console)
    advance = console.post("/console/rollouts/1/advance", data={"csrf": token})
    assert advance.status_code == 409  # at its last stage: refused, and the page says why
    assert "cannot advance" in advance.text
    resume = console.post("/console/rollouts/2/resume", data={"csrf": token})
    assert resume.status_code == 200 and "Done: resume." in resume.text
    back = console.post("/console/rollouts/2/rollback", data={"csrf": token})
    assert "Rolled back: the rollout is cancelled" in back.text
    assert console.get("/v1/rollouts/2", headers=auth("operator")).json()["state"] == "cancelled"
    assert console.post("/console/rollouts/2/explode", data={"csrf": token}).status_code == 404
    audit = console.get("/console/audit?action=rollout").text
    assert "rollout.resume" in audit and "rollout.cancel" in audit
    actors = console.get("/console/audit?actor=operator").text
    assert actors.count("rollout.") >= 2 and "system:" not in actors


def test_a_bundle_whose_manifest_cannot_be_read_says_so(make_client, sqlite_url, tuf_keys) -> None:
    client: TestClient = make_client(sqlite_url)
    assert publish(client, tuf_keys, 1, [Bundle(1, bundle_bytes("opaque"))]).status_code == 201
    sign_in(client)
    page = client.get("/console/releases").text
    assert "manifest unreadable" in page and "adapters/1/" in page


@pytest.mark.slow
def test_pages_walk_a_fleet_of_100000_devices(make_client, sqlite_url) -> None:
    client: TestClient = make_client(sqlite_url)
    db = Database(make_engine(sqlite_url))
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "id": f"{n:032x}",
            "token_hash": f"{n:064x}",
            "created_at": now,
            "revoked_at": now if n % 1000 == 0 else None,
            "base_fingerprint": FP_A if n % 2 else FP_B,
            "installed_version": None,
            "capabilities": {},
            "memory_budget_bytes": (32 + 64 * (n % 20)) * 2**20,
            "last_event_seq": 0,
            "last_seen_at": now,
        }
        for n in range(100_000)
    ]
    with db.write() as session:
        session.execute(insert(DeviceRow), rows)
    db.dispose()
    sign_in(client)
    fleet = client.get("/console/fleet").text
    assert 'id="total-devices">100,000<' in fleet
    assert 'id="state-count-revoked">100<' in fleet
    seen: list[str] = []
    url = "/console/devices?base=" + FP_B
    for _ in range(3):
        page = client.get(url)
        assert page.status_code == 200
        ids = [
            line.split("<code>")[1][:32] for line in page.text.split('href="/console/devices/')[1:]
        ]
        assert len(ids) == 25
        seen += ids
        url = page.text.split('id="next-page" href="')[1].split('"')[0].replace("&amp;", "&")
    assert seen == sorted(seen) and len(set(seen)) == 75
    assert all(int(i, 16) % 2 == 0 for i in seen)  # base B only
    found = client.get(f"/console/devices?q={99_999:032x}")  # an id opens its device
    assert found.url.path == f"/console/devices/{99_999:032x}"
    assert 'id="device-state">ok<' in found.text
