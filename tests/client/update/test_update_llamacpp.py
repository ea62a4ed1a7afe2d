"""THREATS E20 and I43 on the llama.cpp runtime: a device whose base is a GGUF export,
updated by a real updater process that runs its own llama.cpp health check (the GGUF
LoRA is materialised during it) and is SIGKILLed at every step. After each kill the
device holds exactly the old or exactly the new adapter; a restart finishes the update.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeClock
from test_update_health_runtime import GOLDEN, lora
from update_fakes import FakeOta, Pipeline, enroll_device

from client.update import check_and_update, default_checker
from client.update.health import GOLDEN_FILE, runtime_measure
from client.update.transport import Retrier
from delta_packager.apply import AdapterState
from delta_packager.fingerprint import fingerprint_checkpoint, fingerprint_gguf
from delta_packager.format import parse_bundle

pytestmark = pytest.mark.slow
PROC = Path(__file__).with_name("updater_proc.py")
BEFORE_SWAP = ["download", "stage", "write_slot", "swap_pointer", "health_check"]
AFTER_SWAP = ["commit", "cleanup"]


@pytest.mark.parametrize("step", BEFORE_SWAP + AFTER_SWAP)
def test_e20_gguf_device_killed_at_every_step_keeps_old_or_new(
    tmp_path: Path, micro_base: Path, micro_gguf: Path, step: str
) -> None:
    nf4 = micro_base / "nf4"
    ota = FakeOta()
    try:
        pipeline = Pipeline(
            tmp_path,
            ota,
            fingerprint_checkpoint(nf4),
            compatible_bases=(fingerprint_gguf(micro_gguf),),
        )
        state = enroll_device(
            tmp_path / "dev", ota, pipeline.keys, micro_gguf, pipeline.compatible_bases[0]
        )
        (state.root / GOLDEN_FILE).write_text(json.dumps(GOLDEN))
        budget = state.read_config().memory_budget_bytes
        releases = []
        for seed in (1, 2):  # v1 and v2, each with the loss the release pipeline measured
            pipeline.state, pipeline.adapter = None, lora(nf4, b_scale=0.001, seed=seed)
            draft = pipeline.next_version(loss=0.0)
            exact = AdapterState(seed, seed, pipeline.fp, draft.tensors)
            manifest = parse_bundle(draft.data).manifest
            loss = runtime_measure(nf4, budget_bytes=budget, texts=GOLDEN)(exact, manifest).loss
            pipeline.state, pipeline.adapter = releases[-1][1] if releases else None, draft.tensors
            pipeline.state = None if not releases else pipeline.state
            releases.append((pipeline.next_version(loss=loss), pipeline.state))
        v1, v2 = releases[0][0], releases[1][0]
        retrier = Retrier(clock=FakeClock())
        pipeline.publish(v1)
        pipeline.offer(v1)
        assert check_and_update(state, checker=default_checker(state), retrier=retrier).version == 1
        pipeline.publish(v2)
        pipeline.offer(v2)

        proc = subprocess.run(
            [sys.executable, str(PROC), str(state.root), step, "real"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == -9, proc.stderr[-2000:]
        expected = v1 if step in BEFORE_SWAP else v2
        active = state.read_active()
        assert active is not None and active.version == expected.version
        assert all(np.array_equal(active.tensors[k], v) for k, v in expected.tensors.items())

        outcome = check_and_update(state, checker=default_checker(state), retrier=retrier)
        assert (outcome.status, outcome.version) == ("updated", 2), outcome.reason
        assert state.journal() == {"step": "idle"}
        cached = list(state.runtime_cache_dir.glob("*"))
        assert all(p.name.startswith("lora-") and p.suffix == ".gguf" for p in cached)
    finally:
        ota.close()
