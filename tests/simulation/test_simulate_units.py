"""``fedota simulate``'s refusals and labels, without a simulation: configurations that
cannot train anyone are refused up front, a finished run that changed nothing is never
a success, and every planted fault is labelled as such wherever a person reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from simulation import FederatedConfig, SimulationInputError
from simulation.cli import _ota_line, faults_default
from simulation.errors import NothingTrainedError
from simulation.guards import require_training, user_dp_cohort_problem
from simulation.ota_rollout import RoundOta, round_json
from simulation.report import final_table, write_run_report
from tests.repo_helpers import fedota_cli

LABEL = "v2: planted bad release (fault injection; --no-faults to turn off)"


@pytest.mark.parametrize(
    ("clients", "per_round", "expected"),
    [
        # The case: q = 1/2, cohort Binomial(6, 1/2); P(< 2) = 7/64.
        (6, 3, ("expected cohort is 3 clients", "11% of rounds", "at least 5")),
        (8, 4, ("expected cohort is 4 clients", "3.5% of rounds", "at least 5")),
        (1, 1, ("needs at least 2 clients",)),
        (6, 5, None),  # P(< 2) = 0.07%
        (100, 10, None),  # the README's example
        (1000, 20, None),
    ],
    ids=["6-of-3", "8-of-4", "one-client", "6-of-5", "100-of-10", "1000-of-20"],
)
def test_user_dp_refuses_populations_that_sample_too_few(
    tmp_path: Path, clients: int, per_round: int, expected: tuple[str, ...] | None
) -> None:
    assert (user_dp_cohort_problem(clients, per_round, 2) is None) == (expected is None)

    def make() -> FederatedConfig:
        return FederatedConfig(
            out_dir=tmp_path, dp_mode="user", num_clients=clients, clients_per_round=per_round
        )

    if expected is None:
        make()
        return
    with pytest.raises(SimulationInputError) as err:
        make()
    message = str(err.value)
    assert all(part in message for part in expected), message
    assert "\n" not in message


def test_record_dp_and_no_dp_need_a_round_of_min_clients(tmp_path: Path) -> None:
    with pytest.raises(SimulationInputError, match="--clients-per-round 1 is below the 2"):
        FederatedConfig(out_dir=tmp_path, clients_per_round=1)
    FederatedConfig(out_dir=tmp_path, clients_per_round=2)


def test_cli_refuses_user_dp_with_too_few_clients_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = fedota_cli(
        "simulate",
        "--dp-mode",
        "user",
        "--clients",
        "6",
        "--clients-per-round",
        "3",
        "--rounds",
        "1",
        "--out",
        str(out),
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "expected cohort is 3 clients" in lines[0] and "at least 5" in lines[0]
    assert not out.exists()


def _history(*rounds: dict[str, float]) -> list[dict[str, Any]]:
    base = {"round": 0, "train": {}, "evaluate": {"clients-accuracy": 0.3}}
    return [base, *({"round": i + 1, "train": t, "evaluate": {}} for i, t in enumerate(rounds))]


def test_a_run_that_changed_nothing_is_refused() -> None:
    nobody = {"clients-sampled": 0.0, "clients-trained": 0.0, "round-applied": 0.0}
    too_few = {"clients-sampled": 1.0, "clients-trained": 1.0, "round-applied": 0.0}
    with pytest.raises(NothingTrainedError) as err:
        require_training(_history(nobody, too_few))
    message = str(err.value)
    assert "round 1: 0 sampled, 0 trained" in message and "round 2: 1 sampled" in message
    assert "no summary was written" in message and err.value.exit_code != 0
    applied = {"clients-sampled": 2.0, "clients-trained": 2.0, "round-applied": 1.0}
    require_training(_history(nobody, applied))  # one round that learned is a result


@pytest.mark.parametrize(
    ("flag", "data", "base", "expected"),
    [
        (None, None, None, True),  # the built-in demo shows the faults
        (None, Path("mine.jsonl"), None, False),
        (None, None, Path("my-base"), False),
        (True, Path("mine.jsonl"), Path("my-base"), True),  # --faults
        (False, None, None, False),  # --no-faults
    ],
    ids=["demo", "own-data", "own-base", "explicit-faults", "explicit-no-faults"],
)
def test_faults_default_on_only_for_the_builtin_demo(
    flag: bool | None, data: Path | None, base: Path | None, expected: bool
) -> None:
    assert faults_default(flag, data=data, base_model=base) is expected


def _summary(*, planted: bool) -> dict[str, Any]:
    point = {
        "round": 0,
        "eval_loss": 3.0,
        "eval_accuracy": 0.3,
        "heldout_clients": {"eval_loss": 3.1, "eval_accuracy": 0.29},
    }
    kinds = ["good", "bad", "rollback"] if planted else ["good", "good"]
    rollouts = [
        {
            "version": v,
            "kind": k,
            "stages": [50, 100],
            "stages_reached": 1 if k == "bad" else 2,
            "percent_reached": 50 if k == "bad" else 100,
            "state": "cancelled" if k == "bad" else "active",
            "auto_paused": k == "bad",
            "rolled_back_by": 3 if k == "bad" else None,
            "bundle_bytes": 1000,
        }
        for v, k in enumerate(kinds, start=1)
    ]
    runtime = {
        "devices": 4,
        "updates": 8,
        "rollbacks": 2,
        "rejections": 1,
        "apply_ms_p50": 5.0,
        "peak_memory_bytes_max": None,
        "heldout_loss_mean": None,
    }
    faults = {"none": 6, "killed": 1, "mirror": 1} if planted else {"none": 8}
    return {
        "config": {"clients": 4, "rounds": 2, "aggregation": "ffa"},
        "baseline": point,
        "final": {**point, "round": 2, "eval_accuracy": 0.4},
        "rounds": [],
        "privacy": {"mode": "none", "epsilon": None},
        "fleet": {"devices": 8, "faults": faults, "runtimes": {"nf4": runtime}},
        "rollouts": rollouts,
    }


def test_planted_faults_are_labelled_in_the_table_and_the_report(tmp_path: Path) -> None:
    table = dict(final_table(_summary(planted=True)))
    assert table["planted faults"].startswith(LABEL)
    assert table["planted faults"].endswith(
        "; planted on phones: 1 killed mid-apply, 1 behind a corrupting mirror"
    )
    assert dict(final_table(_summary(planted=False)))["planted faults"] == "none"

    report = write_run_report(tmp_path, _summary(planted=True)).read_text()
    assert "Faults were injected on purpose" in report and LABEL in report
    assert "| v2 | planted bad release (fault injection) |" in report
    assert LABEL in (tmp_path / "report.html").read_text()
    clean = write_run_report(tmp_path / "clean", _summary(planted=False)).read_text()
    assert "planted" not in clean.replace("| planted faults | none |", "")


def test_planted_bad_release_is_labelled_in_the_round_log_line() -> None:
    planted = RoundOta(round=2, releases=(2, 3), bundle_bytes=10, paused=True, planted=(2,))
    line = _ota_line(planted)
    assert LABEL in line and "released v2, v3" in line
    assert round_json(planted)["planted"] == [2]
    plain = _ota_line(RoundOta(round=1, releases=(1,), bundle_bytes=10, adoption=1.0))
    assert "planted" not in plain and "paused" not in plain


def test_quality_tolerance_reaches_every_rollout_of_the_fleet() -> None:
    from simulation.cli import _fleet_config

    fleet = _fleet_config(24, 3, 1, "full", "auto", quality_tolerance=0.2, faults=True, seed=0)
    assert fleet.rollout.quality_tolerance == 0.2
    default = _fleet_config(24, 3, 1, "full", "auto", faults=True, seed=0)
    assert default.rollout.quality_tolerance == 0.5
