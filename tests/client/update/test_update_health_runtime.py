"""E22 with the real runtimes: golden-prompt loss under the memory budget.

The device's base is the ``micro`` NF4 checkpoint, or its Q8_0 GGUF export on the
llama.cpp runtime; ``default_checker`` (what the CLI uses) runs the provisioned golden
prompts through the device's runtime. The expected loss in the manifest is measured the
way a release pipeline does: on the NF4 runtime, the same prompts, the good adapter. A
llama.cpp device therefore checks an NF4-measured loss within the checker's tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.update import GOLDEN_FILE, Retrier, check_and_update, default_checker
from client.update.health import runtime_measure
from delta_packager import AdapterState, fingerprint_checkpoint, fingerprint_gguf, parse_bundle
from tests.client.update.helpers import FakeClock
from tests.client.update.update_fakes import FakeOta, Pipeline, enroll_device
from tests.ota_server_helpers import GOLDEN, micro_lora

pytestmark = pytest.mark.slow


@pytest.fixture(params=["nf4", "llamacpp"])
def device(
    request: pytest.FixtureRequest, tmp_path: Path, micro_base: Path, micro_gguf: Path
) -> Iterator[tuple[FakeOta, Pipeline, Path, Path]]:
    """(server, release pipeline, the NF4 base, the base the device runs)."""
    nf4 = micro_base / "nf4"
    ota = FakeOta()
    gguf = request.param == "llamacpp"
    extra = (fingerprint_gguf(micro_gguf),) if gguf else ()
    pipeline = Pipeline(tmp_path, ota, fingerprint_checkpoint(nf4), compatible_bases=extra)
    try:
        yield ota, pipeline, nf4, micro_gguf if gguf else nf4
    finally:
        ota.close()


def test_e22_runtime_health_check_commits_good_and_rolls_back_bad(
    tmp_path: Path, device: tuple[FakeOta, Pipeline, Path, Path]
) -> None:
    ota, pipeline, nf4, base = device
    fp = pipeline.compatible_bases[0] if pipeline.compatible_bases else pipeline.fp
    state = enroll_device(tmp_path / "dev", ota, pipeline.keys, base, fp)
    (state.root / GOLDEN_FILE).write_text(json.dumps(GOLDEN))
    budget = state.read_config().memory_budget_bytes

    good = micro_lora(nf4, seed=1, b_scale=0.001)
    pipeline.adapter = good
    draft = pipeline.next_version(loss=0.0)  # the release pipeline measures the loss:
    manifest = parse_bundle(draft.data).manifest
    exact = AdapterState(1, 1, pipeline.fp, draft.tensors)
    expected = runtime_measure(nf4, budget_bytes=budget, texts=GOLDEN)(exact, manifest).loss
    pipeline.state = None
    pipeline.adapter = good
    v1 = pipeline.next_version(loss=expected)
    pipeline.publish(v1)
    pipeline.offer(v1)
    retrier = Retrier(clock=FakeClock())
    outcome = check_and_update(state, checker=default_checker(state), retrier=retrier)
    assert outcome.status == "updated", outcome.reason
    assert outcome.health is not None and outcome.health.peak_bytes is not None
    tolerance = 1e-3 if base == nf4 else 0.01 * expected  # Q8_0 vs NF4: within 1 %
    assert abs(outcome.health.measured_loss - expected) < tolerance  # type: ignore[operator]
    assert 0 < outcome.health.peak_bytes <= budget

    pipeline.adapter = micro_lora(nf4, seed=2, b_scale=5.0)  # a broken adapter, same claimed loss
    v2 = pipeline.next_version(loss=expected)
    pipeline.publish(v2)
    pipeline.offer(v2)
    outcome = check_and_update(state, checker=default_checker(state), retrier=retrier)
    assert outcome.status == "rolled_back", outcome.reason
    assert outcome.health is not None and outcome.health.measured_loss is not None
    assert outcome.health.measured_loss > expected * 1.05 + 0.05
    active = state.active()
    assert active is not None and active.version == 1
    failed = [e for e in ota.events.values() if e["type"] == "failed"]
    assert failed and f'"measured_loss":{outcome.health.measured_loss}' in failed[-1]["detail"]
