"""THREATS F31: schema-driven fuzz of every route — no 5xx, no schema violations.

schemathesis generates valid and invalid requests from ``/openapi.json`` and checks
each answer against the documented status codes, content types, headers and schemas.
Device routes are called as a real enrolled device (so fuzzed bodies reach the domain
code, not just the auth check); every other route with the admin key.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from tests.server.ota.ota_helpers import (
    Bundle,
    auth,
    bundle_bytes,
    create_rollout,
    enroll,
    publish,
    report,
)


@pytest.fixture
def fuzz_target(make_client, database_url, tuf_keys) -> dict[str, Any]:
    client = make_client(database_url)
    bundle = Bundle(1, bundle_bytes("fuzz"))
    assert publish(client, tuf_keys, 1, [bundle]).status_code == 201
    create_rollout(client, 1, [50, 100])
    device = enroll(client)
    return {"app": client.app, "device": device}


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
DEVICE_ROUTES = (
    "/v1/devices/{device_id}/check",
    "/v1/devices/{device_id}/events",
    "/v1/devices/{device_id}/assignment",
)


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    headers: dict[str, str],
    path_parameters: dict[str, str] | None,
    failures: list[str],
    statuses: dict[int, int],
) -> None:
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.headers = {
            k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"
        }
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    try:
        run()
    except Unsatisfiable:
        # An operation with no free parameter and no body has no invalid input to generate.
        free = [p for p in operation.iter_parameters() if p.name not in (path_parameters or {})]
        assert mode is GenerationMode.NEGATIVE and not free and not list(operation.body), (
            operation.label
        )
    except Exception as exc:  # collect, so that one run reports every route that fails
        failures.append(f"{operation.label} [{mode.value}]: {str(exc)[:1500]}")


EXAMPLES = 12


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_every_route_survives_fuzzing(fuzz_target, mode) -> None:
    app = fuzz_target["app"]
    # Auth is covered by test_ota_auth; without the bearer scheme in the schema the fuzzer
    # does not invent tokens, and every call carries a real credential to reach the domain.
    spec = app.openapi()
    spec.get("components", {}).pop("securitySchemes", None)
    for methods in spec["paths"].values():
        for operation in methods.values():
            operation.pop("security", None)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    device = fuzz_target["device"]
    failures: list[str] = []
    statuses: dict[int, int] = {}
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        _fuzz(operation, mode, auth("admin"), None, failures, statuses)
        if operation.path in DEVICE_ROUTES:
            _fuzz(operation, mode, auth(device.token), {"device_id": device.id}, failures, statuses)
    assert len(labels) >= 20, labels  # every route was generated for
    assert failures == [], "\n".join(failures)
    if mode is GenerationMode.POSITIVE:  # valid requests got past auth into the domain code
        # (which refuses most fuzzed values too: e.g. an event about a version never released)
        past_the_edge = sum(n for code, n in statuses.items() if code not in (401, 403, 422, 429))
        assert past_the_edge >= 30 and statuses.get(200, 0) >= 10, statuses


def test_oversized_and_malformed_bodies_are_4xx(make_client, sqlite_url) -> None:
    client = make_client(sqlite_url, max_body_bytes=2048)
    huge = b'{"base_fingerprint": "' + b"a" * 10_000 + b'"}'
    response = client.post(
        "/v1/devices", content=huge, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    bad_json = client.post(
        "/v1/devices", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 422
    nested = b"[" * 1500 + b"]" * 1500
    deep = client.post(
        "/v1/rollouts",
        content=nested,
        headers={**auth("operator"), "Content-Type": "application/json"},
    )
    assert deep.status_code in (413, 422)
    big_int = client.post(
        "/v1/rollouts",
        json={"base_fingerprint": "sha256:" + "a" * 64, "to_version": 10**30},
        headers=auth("operator"),
    )
    assert big_int.status_code == 422
    lying = client.post(
        "/v1/devices",
        content=b"{}",
        headers={"Content-Type": "application/json", "Content-Length": "-5"},
    )
    assert 400 <= lying.status_code < 500


@pytest.mark.parametrize(
    "text, status",
    [
        pytest.param("a\x00b", 422, id="nul"),
        pytest.param("bell\x07", 422, id="control"),
        pytest.param("\u202e\u0301 rtl", 200, id="odd-unicode"),
        pytest.param("x" * 500, 200, id="longest"),
    ],
)
def test_stored_text_is_4xx_or_stored_never_500(client, tuf_keys, text, status) -> None:
    # PostgreSQL text cannot hold NUL (this test found it: it was a 500 there); SQLite can.
    assert publish(client, tuf_keys, 1, [Bundle(1, bundle_bytes("text"))]).status_code == 201
    device = enroll(client)
    response = client.post(
        f"/v1/devices/{device.id}/events",
        json={
            "event_id": "e1",
            "seq": 1,
            "type": "failed",
            "version": 1,
            "installed_version": None,
            "detail": text,
        },
        headers=auth(device.token),
    )
    assert response.status_code == status, response.text
    check = client.post(
        f"/v1/devices/{device.id}/check",
        json={**report(), "capabilities": {"runtime": text[:64]}},
        headers=auth(device.token),
    )
    assert check.status_code == status, check.text
