"""The agent end to end against the fake server: install, delta, no update, report."""

from __future__ import annotations

import numpy as np
import pytest

from client.update import DeviceStateError, check_and_update
from tests.client.update.helpers import World, measured_losses


def run(world: World, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("checker", measured_losses({}))
    kw.setdefault("retrier", world.retrier())
    return check_and_update(world.state, **kw)


def test_full_then_delta_then_no_update_and_events_reported(world: World) -> None:
    v1 = world.pipeline.next_version()
    world.pipeline.publish(v1)
    world.pipeline.offer(v1)
    out = run(world)
    assert (out.status, out.version) == ("updated", 1)
    active = world.state.read_active()
    assert active is not None and active.version == 1
    for name, arr in v1.tensors.items():
        np.testing.assert_array_equal(active.tensors[name], arr)

    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    world.pipeline.offer(v2)
    assert run(world).status == "updated"
    active = world.state.read_active()
    assert active is not None and active.version == 2 and world.state.release_floor() == 2
    for name, arr in v2.tensors.items():  # closed loop: bit-identical to the packager
        np.testing.assert_array_equal(active.tensors[name], arr)

    world.pipeline.offer(None)
    assert run(world).status == "no_update"
    installed = [e for e in world.ota.events.values() if e["type"] == "installed"]
    assert sorted(e["version"] for e in installed) == [1, 2]
    assert world.state.journal() == {"step": "idle"}
    assert not list(world.state.downloads_dir.glob("*"))


def test_a_damaged_adapter_with_nothing_to_restore_from_says_so(world: World) -> None:
    v1 = world.pipeline.next_version()
    world.pipeline.publish(v1)
    world.pipeline.offer(v1)
    assert run(world).status == "updated"
    pointer = world.state.active()
    assert pointer is not None
    adapter = world.state.slot_dir(pointer.slot) / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-1])  # truncated by storage trouble
    assert world.state.active_damage() is not None
    world.pipeline.offer(None)  # the server has nothing for it
    with pytest.raises(DeviceStateError, match="damaged.*offers no release.*device update"):
        run(world)
    assert world.state.active() == pointer  # nothing was changed
