"""Operations surface: health, readiness, metrics, OpenAPI, structured logs, load shedding."""

from __future__ import annotations

import json
import logging

from server.ota.observability import JsonFormatter
from tests.server.ota.ota_helpers import (
    Bundle,
    auth,
    bundle_bytes,
    check,
    create_rollout,
    enroll,
    publish,
)


def test_health_ready_and_openapi(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    paths = client.get("/openapi.json").json()["paths"]
    api = [p for p in paths if p not in ("/healthz", "/readyz", "/metrics")]
    assert api and all(p.startswith(("/v1/", "/tuf/")) for p in api)
    assert "/v1/devices/{device_id}/check" in paths and "/v1/releases" in paths


def test_metrics_count_checks_downloads_latency_and_rollout_state(client, tuf_keys) -> None:
    bundle = Bundle(1, bundle_bytes("m"))
    assert publish(client, tuf_keys, 1, [bundle]).status_code == 201
    rollout = create_rollout(client, 1, [100])
    device = enroll(client)
    offer = check(client, device, None)
    assert client.get(offer["url"]).status_code == 200
    client.post(f"/v1/rollouts/{rollout['id']}/pause", headers=auth("operator"))
    text = client.get("/metrics").text
    assert 'fedota_update_checks_total{result="offered"} 1.0' in text
    assert 'fedota_downloads_total{status="200"} 1.0' in text
    assert f"fedota_download_bytes_total {float(len(bundle.data))}" in text
    assert 'fedota_rollouts{state="paused"} 1.0' in text
    assert (
        'fedota_http_request_duration_seconds_count{method="POST",'
        'route="/v1/devices/{device_id}/check",status="200"} 1.0'
    ) in text


def test_load_shedding_answers_503_with_retry_after(make_client, sqlite_url) -> None:
    client = make_client(sqlite_url, max_concurrent_requests=1)
    middleware = client.app.middleware_stack
    while not hasattr(middleware, "in_flight"):
        middleware = middleware.app
    middleware.in_flight = 1  # one request already in progress
    response = client.get("/healthz")
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    middleware.in_flight = 0
    assert client.get("/healthz").status_code == 200


def test_logs_are_json_lines() -> None:
    record = logging.LogRecord(
        "server.ota.access", logging.INFO, __file__, 1, "request", None, None
    )
    record.fields = {"route": "/v1/x", "status": 200}
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "request" and line["route"] == "/v1/x" and line["status"] == 200
