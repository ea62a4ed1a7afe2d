"""THREATS E20 on the llama.cpp runtime: a GGUF base, the real health check.

The device runs the ``micro`` base's Q8_0 GGUF export (``runtime = "llamacpp"``) and
health-checks with ``default_checker``: golden prompts on llama.cpp, the staged adapter
materialised as a GGUF LoRA in ``STATE/runtime-cache``. An updater process is SIGKILLed
at every step ``test_update_crash`` kills at, and at two points inside the health check
that announce no step (``updater_proc.RUNTIME_STEPS``): with the LoRA temp file half
written, and with the LoRA complete while the golden loss runs. Each kill leaves exactly
the old or exactly the new adapter; a restart finishes the update, and the device's
llama.cpp runtime then serves the new adapter from its cache, with nothing stale left.

One release pipeline and one template device (v1 installed, v2 offered) per module;
each test runs on a copy of the template.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from client import Device
from client.runtime.gguf_plan import read_gguf_footprint
from client.runtime.llamacpp import lora_file_name
from client.update import (
    GOLDEN_FILE,
    DeviceState,
    Measurement,
    Retrier,
    UpdateOutcome,
    check_and_update,
    default_checker,
)
from client.update.health import runtime_measure
from delta_packager import (
    AdapterState,
    Manifest,
    fingerprint_checkpoint,
    fingerprint_gguf,
    parse_bundle,
)
from tests.client.update.helpers import AFTER_SWAP, BEFORE_SWAP, PROC, FakeClock, exactly
from tests.client.update.update_fakes import FakeOta, Pipeline, Released, enroll_device
from tests.client.update.updater_proc import RUNTIME_STEPS
from tests.ota_server_helpers import GOLDEN, micro_lora

pytestmark = pytest.mark.slow
Measure = Callable[[AdapterState, Manifest], Measurement]


@dataclass
class GgufWorld:
    ota: FakeOta
    template: Path  # device state: v1 active, v2 offered
    v1: Released
    v2: Released
    losses: dict[int, float]  # golden loss of each version on the device's runtime
    gguf: Path  # the device's base


def released_measured(pipeline: Pipeline, measure: Measure) -> Released:
    """The next version, declaring the golden loss the device's runtime measures on it
    (a draft is packaged and measured first, as a release pipeline does)."""
    saved = (pipeline.state, pipeline.adapter, copy.deepcopy(pipeline.rng))
    draft = pipeline.next_version(loss=0.0)
    adapter = AdapterState(draft.version, draft.version, pipeline.fp, draft.tensors)
    loss = measure(adapter, parse_bundle(draft.data).manifest).loss
    pipeline.state, pipeline.adapter, pipeline.rng = saved
    return pipeline.next_version(loss=loss)


def update(state: DeviceState) -> UpdateOutcome:
    return check_and_update(
        state, checker=default_checker(state), retrier=Retrier(clock=FakeClock())
    )


def lora_file(release: Released, gguf: Path) -> str:
    """The GGUF LoRA the llama.cpp runtime materialises for ``release`` (named by digest)."""
    return lora_file_name(release.tensors, read_gguf_footprint(gguf))


@pytest.fixture(scope="module")
def gguf_world(
    tmp_path_factory: pytest.TempPathFactory, micro_base: Path, micro_gguf: Path
) -> Iterator[GgufWorld]:
    tmp = tmp_path_factory.mktemp("gguf-crash")
    nf4, fp = micro_base / "nf4", fingerprint_gguf(micro_gguf)
    ota = FakeOta()
    try:
        pipeline = Pipeline(tmp, ota, fingerprint_checkpoint(nf4), compatible_bases=(fp,))
        state = enroll_device(tmp / "template", ota, pipeline.keys, micro_gguf, fp)
        state.write_config(replace(state.read_config(), runtime="llamacpp"))
        (state.root / GOLDEN_FILE).write_text(json.dumps(GOLDEN))
        budget = state.read_config().memory_budget_bytes
        measure = runtime_measure(micro_gguf, budget_bytes=budget, texts=GOLDEN)
        pipeline.adapter = micro_lora(nf4, seed=1, b_scale=0.001)
        v1 = released_measured(pipeline, measure)
        pipeline.publish(v1)
        pipeline.offer(v1)
        outcome = update(state)
        assert (outcome.status, outcome.version) == ("updated", 1), outcome.reason
        v2 = released_measured(pipeline, measure)
        pipeline.publish(v2)
        pipeline.offer(v2)
        losses = {
            r.version: parse_bundle(r.data).manifest.provenance.eval_metrics["loss"]
            for r in (v1, v2)
        }
        assert abs(losses[1] - losses[2]) > 0.01  # the runtime's loss tells them apart
        yield GgufWorld(ota, state.root, v1, v2, losses, micro_gguf)
    finally:
        ota.close()


@pytest.fixture
def device(gguf_world: GgufWorld, tmp_path: Path) -> DeviceState:
    """A fresh copy of the template device (v1 active, v2 offered)."""
    shutil.copytree(gguf_world.template, tmp_path / "device")
    gguf_world.ota.events.clear()
    return DeviceState(tmp_path / "device")


@pytest.mark.parametrize("step", BEFORE_SWAP + list(RUNTIME_STEPS) + AFTER_SWAP)
def test_e20_gguf_killed_at_every_step_leaves_old_or_new_exactly(
    gguf_world: GgufWorld, device: DeviceState, step: str
) -> None:
    w, cache = gguf_world, device.runtime_cache_dir
    proc = subprocess.run(
        [sys.executable, str(PROC), str(device.root), step, "real"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    expected = w.v2 if step in AFTER_SWAP else w.v1
    assert exactly(device.read_active(), expected), f"killed at {step}: not exactly v{expected}"
    if step == "write_lora":  # the kill did land mid-write: a partial temp, no LoRA
        assert [p for p in cache.iterdir() if p.name.startswith(f".{lora_file(w.v2, w.gguf)}.")]
        assert not (cache / lora_file(w.v2, w.gguf)).exists()
    if step == "evaluate":  # ... or with the LoRA complete, which the restart reuses
        assert (cache / lora_file(w.v2, w.gguf)).is_file()

    # Restart with the real health check: the update is finished (or redone).
    outcome = update(device)
    assert (outcome.status, outcome.version) == ("updated", 2), outcome.reason
    assert exactly(device.read_active(), w.v2)
    assert device.journal() == {"step": "idle"}
    assert not [p for p in device.root.rglob("*") if p.name.endswith(".fedota-tmp")]
    assert not list(device.downloads_dir.glob("*"))
    assert device.release_floor() == 2
    installed = [e for e in w.ota.events.values() if e["type"] == "installed"]
    assert [e["version"] for e in installed] == [2]  # reported once, not per restart

    # The device's llama.cpp runtime serves v2, from the LoRA in its cache.
    with Device(device.root) as phone:
        assert phone.generate(GOLDEN[0], 8).new_tokens > 0
        runtime = phone.runtime
        assert (runtime.kind, runtime.adapter_version) == ("llamacpp", 2)
        assert abs(phone.evaluate(GOLDEN).loss - w.losses[2]) < 1e-3
    assert sorted(p.name for p in cache.iterdir()) == [lora_file(w.v2, w.gguf)]
