"""THREATS D15–D19 and offline telemetry, through the agent against the fake server."""

from __future__ import annotations

import hashlib

import pytest

from client.update import UpdateTransientError, check_and_update
from tests.client.update.helpers import World, measured_losses
from tests.client.update.update_fakes import Released


def run(world: World, **policy: float) -> str:
    return check_and_update(
        world.state, checker=measured_losses({}), retrier=world.retrier(**policy)
    ).status


def offered(world: World) -> Released:
    v1 = world.pipeline.next_version()
    world.pipeline.publish(v1)
    world.pipeline.offer(v1)
    assert len(v1.data) > 4097, "the bundle must be larger than the cut offsets"
    return v1


def payload_requests(world: World) -> list[dict[str, str]]:
    return [headers for _, _, headers in world.ota.target_gets()]


@pytest.mark.parametrize("cut", [0, 1, 4095, 4096, -1], ids=["0", "1", "4095", "4096", "n-1"])
def test_d15_cut_download_resumes_from_the_byte_it_stopped_at(world: World, cut: int) -> None:
    v1 = offered(world)
    n = len(v1.data)
    offset = n - 1 if cut == -1 else cut
    world.ota.faults.cut_at = [offset]
    assert run(world) == "updated"
    first, second = payload_requests(world)
    assert "Range" not in first
    etag = f'"{hashlib.sha256(v1.data).hexdigest()}"'
    if offset == 0:
        assert "Range" not in second  # nothing held: a plain request
    else:  # nothing already held is fetched again
        assert second["Range"] == f"bytes={offset}-{n - 1}"
        assert second["If-Range"] == etag


def test_d16_changed_etag_discards_the_partial_file(world: World) -> None:
    v1 = offered(world)
    world.ota.faults.payload_override = [b"x" * len(v1.data)]
    world.ota.faults.etag_override = ['"stale"']
    world.ota.faults.cut_at = [3000]
    assert run(world) == "updated"  # the hash matched, so the stale bytes were discarded
    second = payload_requests(world)[1]
    assert second["If-Range"] == '"stale"'


@pytest.mark.parametrize("fault", ["no-range-support", "bad-content-range", "416"])
def test_d17_range_trouble_is_handled_cleanly(world: World, fault: str) -> None:
    offered(world)
    faults = world.ota.faults
    faults.cut_at = [2000]
    if fault == "no-range-support":
        faults.ignore_range = True
    elif fault == "bad-content-range":
        faults.bad_content_range = 1
    else:
        faults.answer_416 = 1
    assert run(world) == "updated"
    assert len(payload_requests(world)) >= 2


def test_d18_every_second_request_failing_still_completes(world: World) -> None:
    offered(world)
    world.ota.faults.fail_every_second = True
    assert run(world) == "updated"
    assert world.clock.sleeps, "failures must have been retried with backoff"


def test_d18_a_server_that_stays_down_fails_cleanly_within_the_budget(world: World) -> None:
    offered(world)
    world.ota.faults.down = 10_000
    with pytest.raises(UpdateTransientError, match="retry budget"):
        run(world, budget_s=60.0, max_attempts=50)
    assert sum(world.clock.sleeps) <= 60.0
    assert world.state.active() is None


def test_d18_down_then_up_again(world: World) -> None:
    offered(world)
    world.ota.faults.down = 3
    assert run(world) == "updated"
    delays = world.clock.sleeps
    # Retry-After: 1 is a floor; the backoff (0.5, 1, 2 s, +0-50% jitter) grows past it.
    assert len(delays) == 3 and min(delays) >= 1.0 and 2.0 <= delays[2] <= 3.0


def test_d19_retry_after_is_honoured_with_jitter(world: World) -> None:
    offered(world)
    world.ota.faults.retry_after = (2, "7")
    assert run(world, jitter=0.5) == "updated"
    first, second = world.clock.sleeps[:2]
    assert 7.0 <= first <= 10.5 and 7.0 <= second <= 10.5
    assert first != second  # jittered


def test_telemetry_is_queued_while_offline_and_stored_once(world: World) -> None:
    offered(world)
    world.ota.faults.fail_suffix = "/events"
    assert run(world, max_attempts=2) == "updated"
    queued = list(world.state.telemetry_dir.glob("event-*.json"))
    assert len(queued) == 1 and not world.ota.events
    world.ota.faults.fail_suffix = None
    world.pipeline.offer(None)
    assert run(world) == "no_update"
    assert [e["type"] for e in world.ota.events.values()] == ["installed"]
    assert not list(world.state.telemetry_dir.glob("event-*.json"))
