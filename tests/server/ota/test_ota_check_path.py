"""The update check's hot path (one compiled query, cached fleet state), on SQLite and
PostgreSQL: what it reads in that one query is exactly what the slow path would."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import bindparam, select

from server.ota import Database, DeviceRow, make_engine
from server.ota.database import HotRead
from server.ota.schemas import DeviceReportIn
from tests.server.ota.ota_helpers import (
    FP_C,
    Bundle,
    auth,
    bundle_bytes,
    check,
    create_rollout,
    enroll,
    event,
    publish,
)
from tests.server.ota.ota_helpers import report as report_of

V1 = Bundle(1, bundle_bytes("c1"))
V2 = Bundle(2, bundle_bytes("c2"))
V3 = Bundle(3, bundle_bytes("c3"))


def _fail(client, device, version: int, seq: int) -> None:
    response = event(
        client,
        device,
        event_id=f"fail-{version}",
        seq=seq,
        type="failed",
        version=version,
        installed=1,
    )
    assert response.status_code == 200, response.text


def test_every_failed_version_is_withheld(client, tuf_keys) -> None:
    # The outer join yields one row per failed version; each of them must count.
    assert publish(client, tuf_keys, 1, [V1, V2, V3]).status_code == 201
    device = enroll(client, installed=1)
    create_rollout(client, 2, [100], max_failure_rate=1.0)  # never pauses
    assert check(client, device, 1)["to_version"] == 2
    _fail(client, device, 2, seq=1)
    assert check(client, device, 1) is None
    create_rollout(client, 3, [100], max_failure_rate=1.0)
    assert check(client, device, 1)["to_version"] == 3  # v2 failed, v3 did not
    _fail(client, device, 3, seq=2)
    assert check(client, device, 1) is None
    cleared = client.delete(f"/v1/devices/{device.id}/failures/3", headers=auth("operator"))
    assert cleared.status_code == 204
    assert check(client, device, 1)["to_version"] == 3


def test_a_release_adding_a_compatible_base_reaches_its_devices_at_once(client, tuf_keys) -> None:
    # The cached fleet state indexes bundles and rollouts by every base they name; a
    # release naming one more base bumps the generation, so the next check sees it.
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    create_rollout(client, 2, [100])
    gguf = enroll(client, base=FP_C, installed=1)
    assert check(client, gguf, 1, base=FP_C) is None
    both = Bundle(2, V2.data, also=(FP_C,))
    assert publish(client, tuf_keys, 2, [V1, both]).status_code == 201
    update = check(client, gguf, 1, base=FP_C)
    assert update["to_version"] == 2 and update["compatible_bases"] == [FP_C]
    state = client.get(f"/v1/devices/{gguf.id}/assignment", headers=auth(gguf.token))
    assert state.json()["assigned_version"] == 2  # the slow path's SQL agrees


def test_a_changed_report_is_stored_and_answered(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    device = enroll(client, installed=1)
    create_rollout(client, 2, [100])
    assert check(client, device, 1)["to_version"] == 2
    assert check(client, device, 2) is None  # the device says it has v2 now: no re-install
    state = client.get(f"/v1/devices/{device.id}/assignment", headers=auth(device.token))
    assert state.json()["installed_version"] == 2
    assert check(client, device, None)["kind"] == "full"  # reported wiped: full bundle


def test_revocation_applies_to_the_very_next_check(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    device, other = enroll(client, installed=1), enroll(client, installed=1)
    create_rollout(client, 2, [100])
    assert check(client, device, 1)["to_version"] == 2
    assert client.post(f"/v1/devices/{device.id}/revoke", headers=auth("admin")).status_code == 204
    response = client.post(
        f"/v1/devices/{device.id}/check",
        json={"base_fingerprint": "sha256:" + "a" * 64, "memory_budget_bytes": 1},
        headers=auth(device.token),
    )
    assert response.status_code == 401 and "revoked" in response.json()["detail"]
    assert check(client, other, 1)["to_version"] == 2  # others are unaffected


def test_check_answers_json_in_the_documented_shape(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    device = enroll(client, installed=1)
    response = client.post(
        f"/v1/devices/{device.id}/check",
        json={"base_fingerprint": "sha256:" + "a" * 64, "memory_budget_bytes": 1},
        headers=auth(device.token),
    )
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"update": None}
    schema = client.get("/openapi.json").json()
    answer = schema["paths"]["/v1/devices/{device_id}/check"]["post"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CheckOut"
    }


def test_many_concurrent_checks_share_a_small_pool(client, tuf_keys) -> None:
    # More checks in flight than check threads/connections: they queue, none fails.
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    devices = [enroll(client, installed=1) for _ in range(4)]
    create_rollout(client, 2, [100])
    checker = client.app.state.services.checker
    report = DeviceReportIn.model_validate(report_of(installed=1)).to_domain()

    async def burst() -> list[object]:
        return await asyncio.gather(
            *(checker.check_async(d.token, d.id, report) for d in devices * 10)
        )

    answers = asyncio.run(burst())
    assert all(a is not None and a.to_version == 2 for a in answers)


@pytest.mark.parametrize("url_kind", ["sqlite", "postgresql"])
def test_hot_read_binds_parameters_for_the_dialect(url_kind: str, tmp_path) -> None:
    url = (
        f"sqlite:///{tmp_path / 'x.db'}"
        if url_kind == "sqlite"
        else "postgresql+psycopg://nobody@127.0.0.1:1/none"  # never connected
    )
    statement = select(DeviceRow.id).where(
        DeviceRow.token_hash == bindparam("token_hash"), DeviceRow.last_event_seq > 5
    )
    read = Database(make_engine(url)).compile_hot(statement)
    assert read.required == {"token_hash"}
    parameters = read.parameters({"token_hash": "h"})
    if url_kind == "sqlite":
        assert parameters == ("h", 5)  # qmark: in statement order
    else:
        assert isinstance(parameters, dict) and parameters["token_hash"] == "h"
        assert 5 in parameters.values()
    with pytest.raises(KeyError, match="token_hash"):
        read.parameters({})
    assert isinstance(read, HotRead)
