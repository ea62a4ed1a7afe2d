"""Shared fixtures: generated base models, built once per test session.

* ``micro_base`` — a ~100k-parameter base (seconds to build) for tests that need a real
  tokenizer + model directory but not its quality.
* ``tiny_base`` — the real ``tiny`` preset made by the CLI exactly as a user would
  (``fedota base-model init``), cached under ``.cache/test-bases`` (or
  ``$FEDOTA_TEST_CACHE``) so repeated local runs reuse it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MICRO_STEPS = 30
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def fedota_cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``fedota`` CLI in a fresh process (``env``: its environment)."""
    return subprocess.run(
        [sys.executable, "-m", "fedota.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


@pytest.fixture(scope="session")
def micro_preset():  # type: ignore[no-untyped-def]
    from simulation.base_model import BasePreset

    return BasePreset("micro", 512, 64, 2, 4, 2, 128, 32, MICRO_STEPS, 8, 3e-3)


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory: pytest.TempPathFactory, micro_preset) -> Path:  # type: ignore[no-untyped-def]
    from simulation.base_model import init_base_model
    from simulation.data import generate_public_texts

    out = tmp_path_factory.mktemp("bases") / "micro"
    init_base_model(out, public_texts=generate_public_texts(600, 0), preset=micro_preset, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    cache = Path(os.environ.get("FEDOTA_TEST_CACHE", REPO / ".cache" / "test-bases"))
    from simulation.base_model import base_cache_name

    out = cache / base_cache_name("tiny", 0)  # versioned: a stale cached base is never reused
    if not (out / "fedota_base.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        # With torch's default threads, as a user runs it: the suite pins one thread
        # (OMP_NUM_THREADS=1), but nothing else runs while a session fixture is built,
        # and pretraining on every core takes 67 s instead of 115 s on 2 cores. The
        # result is bit-identical either way (same fingerprint).
        env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARS}
        result = fedota_cli(
            "base-model", "init", "--out", str(out), "--preset", "tiny", timeout=1800, env=env
        )
        assert result.returncode == 0, result.stderr[-2000:]
    return out
