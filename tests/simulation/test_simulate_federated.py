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


RUN_REJECTING_EVERY_UPDATE = """
import logging, sys
from pathlib import Path
from simulation.errors import NothingTrainedError
from simulation.federated import FederatedConfig, run_federated

logging.basicConfig(level=logging.WARNING)
cfg = FederatedConfig(
    out_dir=Path(sys.argv[1]), data_file=Path(sys.argv[2]), base_model=Path(sys.argv[3]),
    dp_mode="none", clients_per_round=2, rounds=1, local_steps=1,
    max_update_norm=1e-12,  # every real update is rejected: no round can change the model
)
try:
    run_federated(cfg)
except NothingTrainedError as e:
    print(f"refused: {e}")
    sys.exit(e.exit_code)
"""


def test_a_run_in_which_no_round_trained_fails_and_real_data_with_empty_texts_loads(
    tmp_path: Path, micro_base: Path
) -> None:
    """Real, messy data (a record with an empty text per client) trains instead of
    being refused whole; a run that then changes nothing (every update rejected) exits
    non-zero with a clear message and writes no summary, never a success."""
    lines = [
        json.dumps({"client_id": f"u{c}", "text": f"hey ana, are we meeting at {i} pm {c}?"})
        for c in range(3)
        for i in range(6)
    ]
    lines += [json.dumps({"client_id": f"u{c}", "text": ""}) for c in range(3)]
    data = tmp_path / "messy.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", RUN_REJECTING_EVERY_UPDATE, str(out), str(data), str(micro_base)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "skipped 3 record(s) with an empty text (per client: u0: 1, u1: 1, u2: 1)" in (
        result.stderr
    )
    assert "refused: no round changed the model (round 1: 2 sampled, 0 trained, 2 rejected)" in (
        result.stdout
    )
    assert not (out / "summary.json").exists()
