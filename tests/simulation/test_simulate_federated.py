"""``fedota simulate --no-ota`` (the training half) on Flower's simulation engine (Ray),
micro base model. The whole loop with the fleet is tested in test_simulate_e2e.py.

Each run starts Ray (tens of seconds on 2 cores), so the cases are few and each checks
much: the summary schema of ``docs/summary-schema.md``, learning, the separation of
record-level and user-level ε, upload bytes, and refusing to overwrite a run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def simulate(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedota.cli", "simulate", "--no-ota", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def check_point(point: dict[str, Any]) -> None:
    for key in ("eval_loss", "eval_accuracy", "eval_perplexity"):
        assert isinstance(point[key], float), key
        assert isinstance(point["heldout_clients"][key], float), key
    assert point["eval_tokens"] > 0 and point["heldout_clients"]["eval_tokens"] > 0


def test_simulate_without_dp_learns_and_writes_the_documented_summary(
    tmp_path: Path, micro_base: Path
) -> None:
    out = tmp_path / "run"
    common = [
        "--clients",
        "4",
        "--clients-per-round",
        "2",
        "--rounds",
        "2",
        "--base-model",
        str(micro_base),
        "--seed",
        "1",
        "--out",
        str(out),
    ]
    result = simulate(*common, "--no-dp", "--local-steps", "8")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "round 2/2" in result.stderr  # per-round progress lines
    assert "summary in" in result.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema_version"] == 1
    assert summary["config"]["aggregation"] == "fedavg"  # default without DP
    check_point(summary["baseline"])
    check_point(summary["final"])
    assert summary["baseline"]["round"] == 0 and summary["final"]["round"] == 2
    assert summary["final"]["eval_loss"] < summary["baseline"]["eval_loss"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for r in summary["rounds"]:
        assert r["clients_sampled"] == 2 and r["clients_trained"] == 2
        assert r["upload_bytes"] == 2 * r["upload_bytes_per_client"] > 0
        assert r["epsilon"] == {"record_level": None, "user_level": None}
    assert summary["privacy"]["mode"] == "none" and summary["privacy"]["epsilon"] is None

    again = simulate(*common, "--no-dp")  # refuses to overwrite, before any slow work
    assert again.returncode == 2
    assert "--resume" in again.stderr and "Traceback" not in again.stderr


def test_simulate_with_record_level_dp_reports_epsilon_within_target(
    tmp_path: Path, micro_base: Path
) -> None:
    out = tmp_path / "dp"
    result = simulate(
        "--clients",
        "4",
        "--clients-per-round",
        "2",
        "--rounds",
        "2",
        "--dp",
        "--dp-mode",
        "record",
        "--target-epsilon",
        "8",
        "--base-model",
        str(micro_base),
        "--local-steps",
        "4",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    privacy = summary["privacy"]
    assert summary["config"]["aggregation"] == "ffa"  # default under DP
    assert summary["config"]["client_sampling"] == "balanced"
    assert privacy["mode"] == "record" and privacy["user_level"] is None
    assert 0 < privacy["epsilon"] <= 8.0
    assert privacy["record_level"]["epsilon"] == privacy["epsilon"]
    assert privacy["noise_multiplier"] > 0 and privacy["clip"] == 1.0
    eps = [r["epsilon"]["record_level"] for r in summary["rounds"]]
    # Balanced sampling: 4 phones, 2 per round, 2 rounds -> each is scheduled once and
    # spends its whole ε = 8 in that round (never more).
    assert 7.5 < eps[0] <= eps[1] <= 8.0
