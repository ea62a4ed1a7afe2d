"""``fedota simulate --resume`` says which round it resumes from (issue 22, item 9).

The line is built from the run's checkpoint (``describe_resume``, table-driven here) and
printed before any slow work, so the CLI case stops the run once it has said it.
Resuming itself (= an uninterrupted run) is tested in
tests/server/federation/test_federation_rounds.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server.federation.checkpoint import Checkpoint, save_checkpoint
from simulation import FederatedConfig
from simulation.federated import CHECKPOINTS, describe_resume

REPO = Path(__file__).resolve().parents[2]
_RESUME = [sys.executable, "-m", "fedota.cli", "simulate", "--no-ota", "--no-dp", "--resume"]
_RESUME += ["--clients", "2", "--clients-per-round", "2", "--rounds", "5"]


def checkpointed(out: Path, rnd: int) -> Path:
    """``out`` holding a checkpoint of round ``rnd`` (only what the line reads)."""
    state = {"config": {}, "strategy": {}, "history": []}
    return save_checkpoint(
        out / CHECKPOINTS, Checkpoint(rnd, {"w": np.zeros(2, np.float32)}, state)
    )


@pytest.mark.parametrize(
    ("done", "rounds", "resume", "expected"),
    [
        pytest.param(3, 5, False, None, id="not-resuming"),
        pytest.param(
            None, 5, True, "nothing to resume in {out} (no checkpoint): starting at round 0",
            id="no-checkpoint",
        ),
        pytest.param(
            3, 5, True, "resuming from round 3 of 5 (checkpoint {ckpt}): next is round 4",
            id="mid-run",
        ),
        pytest.param(
            0, 2, True, "resuming from round 0 of 2 (checkpoint {ckpt}): next is round 1",
            id="after-baseline",
        ),
        pytest.param(
            5, 5, True,
            "resuming from round 5 of 5 (checkpoint {ckpt}): no round left to train "
            "(raise --rounds to train further)",
            id="all-done",
        ),
    ],
)  # fmt: skip
def test_describe_resume_names_the_round_and_the_checkpoint(
    tmp_path: Path, done: int | None, rounds: int, resume: bool, expected: str | None
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    ckpt = checkpointed(out, done) if done is not None else None
    cfg = FederatedConfig(out_dir=out, rounds=rounds, dp_mode="none", resume=resume)
    want = expected.format(out=out, ckpt=ckpt) if expected else None
    assert describe_resume(cfg) == want


@pytest.mark.slow
def test_simulate_resume_prints_the_round_it_resumes_from(tmp_path: Path, micro_base: Path) -> None:
    out = tmp_path / "run"
    ckpt = checkpointed(out, 3)
    driver = subprocess.Popen(
        [*_RESUME, "--base-model", str(micro_base), "--out", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    assert driver.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + 300  # without the fix: until the run ends on its own
    try:
        for line in driver.stderr:
            seen.append(line.rstrip())
            if line.startswith("resuming") or time.monotonic() > deadline:
                break
    finally:
        driver.send_signal(signal.SIGKILL)  # the run's Ray, if any, is reaped with it
        driver.wait(timeout=30)
        driver.stderr.close()
    want = f"resuming from round 3 of 5 (checkpoint {ckpt}): next is round 4"
    assert want in seen, "\n".join(seen[-30:])
