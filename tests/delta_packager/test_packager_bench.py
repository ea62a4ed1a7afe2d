"""The bundle benchmark runs in CI in its reduced size and its targets hold there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_bundle_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_bundle.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fedota delta bundle (int8)" in proc.stdout
    result = json.loads(out.read_text())
    (tiny,) = result["rows"]
    assert tiny["model"] == "tiny" and tiny["delta_apply_bit_exact"] and tiny["chain20_bit_exact"]
    assert 0 < tiny["delta_bundle_bytes"] < tiny["peft_fp16_bytes"] < tiny["peft_fp32_bytes"]
    assert all(result["targets"].values()), result["targets"]
