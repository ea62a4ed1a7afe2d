"""HTTP edge cases a red-team pass found (issue 22 item 3; THREATS F30, F31).

Non-finite JSON literals are a 422, not a 500; validation errors have the error shape
of every other error (ADR 0004) and never echo the offending value; wrong enrollment
secrets and unknown device tokens are throttled per client; telemetry ``seq`` is a
bounded JSON integer and events about versions never released are refused.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.ota.errors import TooManyRequestsError
from server.ota.schemas import MAX_SEQ
from server.ota.throttle import FailureThrottle
from tests.server.ota.ota_helpers import (
    ENROLLMENT_SECRET,
    Bundle,
    auth,
    bundle_bytes,
    enroll,
    event,
    publish,
    report,
)

JSON = {"Content-Type": "application/json"}


def _as(client: TestClient, address: str) -> TestClient:
    """Another client of the same app, connecting from ``address``."""
    return TestClient(client.app, client=(address, 40000), raise_server_exceptions=False)


def _event_body(seq: str, version: str = "1") -> bytes:
    return (f'{{"event_id": "e1", "seq": {seq}, "type": "failed", "version": {version}}}').encode()


def _assert_error_shape(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and isinstance(body["detail"], str), body
    return str(body["detail"])


# ---- (a) NaN / Infinity literals, (b) one error shape --------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_422_not_500(make_client, sqlite_url, literal) -> None:
    # FastAPI's default handler echoed the parsed float back and could not serialize it.
    app = make_client(sqlite_url).app
    client = TestClient(app, raise_server_exceptions=False)
    device = enroll(client)
    bodies = {
        f"/v1/devices/{device.id}/events": (_event_body(literal), "seq"),
        f"/v1/devices/{device.id}/check": (
            f'{{"base_fingerprint": "sha256:{"a" * 64}", "memory_budget_bytes": {literal}}}',
            "memory_budget_bytes",
        ),
        "/v1/devices": (
            f'{{"enrollment_secret": "x", "base_fingerprint": "sha256:{"a" * 64}", '
            f'"memory_budget_bytes": {literal}}}',
            "memory_budget_bytes",
        ),
    }
    for path, (body, field) in bodies.items():
        response = client.post(path, content=body, headers={**auth(device.token), **JSON})
        assert f"body.{field}:" in _assert_error_shape(response, 422), path


@pytest.mark.parametrize(
    "body, expected",
    [
        pytest.param(b"{not json", "body is not valid JSON", id="unparsable"),
        pytest.param(b'{"base_fingerprint": "nope"}', "body.base_fingerprint:", id="pattern"),
        pytest.param(b'{"memory_budget_bytes": 1}', "body.base_fingerprint: Field required",
                     id="missing"),
        pytest.param(b"[1, 2]", "body:", id="not-an-object"),
    ],
)  # fmt: skip
def test_validation_errors_have_the_error_shape(client, body, expected) -> None:
    response = client.post("/v1/devices", content=body, headers=JSON)
    assert expected in _assert_error_shape(response, 422)
    assert response.json()["error"] == "ValidationError"


def test_validation_errors_never_echo_the_value(client) -> None:
    secret = "my-real-secret-" + "s" * 300  # too long: invalid, and must not come back
    response = client.post("/v1/devices", json={**report(), "enrollment_secret": secret})
    detail = _assert_error_shape(response, 422)
    assert "body.enrollment_secret:" in detail and "my-real-secret" not in response.text


def test_openapi_documents_the_422_shape(client) -> None:
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/v1/devices"]["post"]["responses"]
    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorOut")
    assert "Retry-After" in responses["429"]["headers"]


# ---- (c) throttling credential failures -----------------------------------------------


def _wrong_enrollment(client: TestClient) -> Any:
    return client.post("/v1/devices", json={**report(), "enrollment_secret": "wrong-secret"})


def test_a_burst_of_wrong_enrollment_secrets_is_throttled(make_client, sqlite_url) -> None:
    client = make_client(sqlite_url)  # default limits
    limit = client.app.state.services.settings.max_auth_failures
    statuses = [_wrong_enrollment(client).status_code for _ in range(60)]
    assert statuses == [401] * limit + [429] * (60 - limit)


def test_enrollment_throttle_is_per_address_and_says_when(make_client, sqlite_url) -> None:
    # A window of an hour: the test cannot outlast it, however slow the machine is.
    client = make_client(sqlite_url, max_auth_failures=3, auth_failure_window_s=3600)
    assert [_wrong_enrollment(client).status_code for _ in range(3)] == [401] * 3
    refused = _wrong_enrollment(client)
    assert "too many failed credentials" in _assert_error_shape(refused, 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600
    correct = {**report(), "enrollment_secret": ENROLLMENT_SECRET}
    assert client.post("/v1/devices", json=correct).status_code == 429  # this address waits
    elsewhere = _as(client, "10.0.0.2")
    assert elsewhere.post("/v1/devices", json=correct).status_code == 201
    assert _wrong_enrollment(elsewhere).status_code == 401  # its own count starts at zero


def test_unknown_device_tokens_are_throttled_per_address_and_device(
    make_client, sqlite_url
) -> None:
    client = make_client(sqlite_url, max_auth_failures=2, auth_failure_window_s=3600)
    a, b = enroll(client), enroll(client)
    wrong = auth("fdt_" + "x" * 43)
    path = f"/v1/devices/{a.id}/check"
    assert [client.post(path, json=report(), headers=wrong).status_code for _ in range(2)] == [
        401,
        401,
    ]
    assert client.post(path, json=report(), headers=wrong).status_code == 429
    events = client.post(f"/v1/devices/{a.id}/events", json={}, headers=auth(a.token))
    assert events.status_code in (422, 429)  # body validation may answer first
    assignment = client.get(f"/v1/devices/{a.id}/assignment", headers=auth(a.token))
    assert assignment.status_code == 429 and "Retry-After" in assignment.headers
    # The real device, from its own address, is not locked out by the guesser.
    real = _as(client, "10.0.0.7")
    assert real.post(path, json=report(), headers=auth(a.token)).status_code == 200
    # Another device from the guesser's address is not affected either.
    b_check = client.post(f"/v1/devices/{b.id}/check", json=report(), headers=auth(b.token))
    assert b_check.status_code == 200


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_window_slides_and_refused_attempts_do_not_count() -> None:
    clock = _Clock()
    throttle = FailureThrottle(max_failures=3, window_s=60, clock=clock)
    for at in (0, 10, 20):
        clock.now = 1000 + at
        throttle.refuse_if_blocked(["k"])
        throttle.record_failure(["k"])
    clock.now = 1030
    with pytest.raises(TooManyRequestsError) as refused:
        throttle.refuse_if_blocked(["other", "k"])
    assert refused.value.retry_after_s == 30  # the failure at 1000 leaves the window at 1060
    throttle.refuse_if_blocked(["other"])
    clock.now = 1059.5
    with pytest.raises(TooManyRequestsError) as refused:
        throttle.refuse_if_blocked(["k"])
    assert refused.value.retry_after_s == 1
    clock.now = 1060  # one failure expired: one more try
    throttle.refuse_if_blocked(["k"])
    throttle.record_failure(["k"])
    with pytest.raises(TooManyRequestsError):
        throttle.refuse_if_blocked(["k"])
    clock.now = 1081  # all of them out of the window
    throttle.refuse_if_blocked(["k"])


def test_failure_throttle_forgets_the_oldest_keys_beyond_its_bound() -> None:
    throttle = FailureThrottle(max_failures=1, window_s=60, clock=_Clock(), max_keys=2)
    for key in ("a", "b", "c"):
        throttle.record_failure([key])
    throttle.refuse_if_blocked(["a"])  # evicted
    for key in ("b", "c"):
        with pytest.raises(TooManyRequestsError):
            throttle.refuse_if_blocked([key])


# ---- (d) telemetry: bounded seq, released versions only -------------------------------


def _with_v1(client: TestClient, tuf_keys: Any) -> tuple[TestClient, Any]:
    assert publish(client, tuf_keys, 1, [Bundle(1, bundle_bytes("v1"))]).status_code == 201
    return client, enroll(client)


@pytest.fixture
def released(make_client, sqlite_url, tuf_keys) -> tuple[TestClient, Any]:
    return _with_v1(make_client(sqlite_url), tuf_keys)


@pytest.mark.parametrize(
    "seq, status",
    [
        pytest.param("-1", 422, id="negative"),
        pytest.param(str(MAX_SEQ + 1), 422, id="above-max"),
        pytest.param(str(2**63), 422, id="beyond-bigint"),
        pytest.param("1.5", 422, id="fraction"),
        pytest.param("NaN", 422, id="nan"),
        pytest.param("1e400", 422, id="infinite"),
        pytest.param(str(MAX_SEQ), 200, id="max"),
        pytest.param("0", 200, id="zero"),
    ],
)
def test_seq_is_a_bounded_json_integer(released, seq, status) -> None:
    client, device = released
    response = client.post(
        f"/v1/devices/{device.id}/events",
        content=_event_body(seq),
        headers={**auth(device.token), **JSON},
    )
    assert response.status_code == status, response.text
    if status == 422:
        assert "body.seq:" in _assert_error_shape(response, 422)


def test_events_about_versions_never_released_are_refused(client, tuf_keys) -> None:
    client, device = _with_v1(client, tuf_keys)
    unknown = event(client, device, event_id="e9", seq=1, type="failed", version=9, installed=1)
    assert "version 9 was never released" in _assert_error_shape(unknown, 404)
    state = client.get(f"/v1/devices/{device.id}/assignment", headers=auth(device.token)).json()
    assert state["failed_versions"] == [] and state["installed_version"] is None
    known = event(client, device, event_id="e1", seq=2, type="failed", version=1, installed=None)
    assert known.status_code == 200 and known.json() == {"stored": True}
