"""The trainer benchmark runs end to end in --quick mode and writes its summary."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_bench_client_train_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_client_train.py", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    rows = summary["rows"]
    assert set(rows) == {"nf4", "nf4-dp", "nf4-dp-ghost", "fp32", "fp32-dp"}
    for row in rows.values():
        assert row["cpu_seconds_per_step"] > 0 and row["estimated_train_mib"] > 0
        assert row["weights_mib"] > 0
    assert rows["nf4"]["weights_mib"] < rows["fp32"]["weights_mib"]  # NF4 is smaller
    assert all(math.isfinite(v) and v > 0 for v in summary["ratios"].values())
    # plain and DP steps train on the same full-width blocks, so the ratio compares one work
    assert summary["settings"]["same_blocks_plain_and_dp"] is True
    assert summary["settings"]["block_width"] == summary["settings"]["seq_len"]
    assert "dp_hooks_over_plain_nf4" in done.stdout
