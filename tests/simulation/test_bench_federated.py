"""bench_federated's multi-seed summary: the targets are judged on the median of the
per-seed ratios, and every seed's ratio is printed beside it.

The benchmark itself takes about an hour on the tiny base; these tests feed its
summary functions the rows of a run, so they cover the arithmetic docs/benchmarks.md
quotes.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from tests.repo_helpers import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_federated")


def _row(acc: float, start: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "eval_accuracy": acc,
        "eval_loss": 5 - acc,
        "heldout_clients_accuracy": acc,
    }
    if start is not None:
        row["baseline_accuracy"] = start
    return row


def _run(bench: ModuleType, seed: int, fed: float, rec: float) -> dict[str, Any]:
    rows = {
        "base": _row(0.4),
        "centralized": _row(0.8),
        "fed-no-dp": _row(fed, start=0.4),
        "fed-record-dp": _row(rec, start=0.4),
    }
    return {"seed": seed, "base_model": "b", "rows": rows, "ratios": bench.gains(rows), "wall_s": 1}


def test_gains_are_against_each_rows_own_round_zero(bench: ModuleType) -> None:
    ratios = _run(bench, 0, fed=0.6, rec=0.5)["ratios"]
    assert ratios["fed_no_dp_gap_closed"] == pytest.approx(0.2 / 0.4)
    assert ratios["record_dp_gain_kept"] == pytest.approx(0.1 / 0.2)


def test_median_of_per_seed_ratios_and_every_seed_printed(bench: ModuleType) -> None:
    runs = [
        _run(bench, 0, fed=0.6, rec=0.49),  # keeps 0.45
        _run(bench, 1, fed=0.7, rec=0.58),  # keeps 0.60
        _run(bench, 2, fed=0.6, rec=0.50),  # keeps 0.50
    ]
    med = bench.medians(runs)
    assert med["ratios"]["record_dp_gain_kept"] == pytest.approx(0.5)
    assert med["rows"]["fed-record-dp"]["eval_accuracy"] == pytest.approx(0.50)
    assert med["rows"]["fed-no-dp"]["eval_accuracy"] == pytest.approx(0.6)
    text = bench.report({"seeds": [0, 1, 2], "runs": runs, "median": med, "wall_s": 3})
    line = next(ln for ln in text.splitlines() if ln.startswith("record_dp_gain_kept "))
    assert line.split()[1:] == ["0.500", "0.450", "0.600", "0.500"]
    assert "median over seeds [0, 1, 2]:" in text


def test_a_ratio_missing_on_one_seed_is_the_median_of_the_others(bench: ModuleType) -> None:
    runs = [_run(bench, 0, fed=0.6, rec=0.5), _run(bench, 1, fed=0.4, rec=0.45)]
    # seed 1's federated run learned nothing: no gain to keep a share of
    assert "record_dp_gain_kept" not in runs[1]["ratios"]
    med = bench.medians(runs)
    assert med["ratios"]["record_dp_gain_kept"] == pytest.approx(0.5)
    text = bench.report({"seeds": [0, 1], "runs": runs, "median": med, "wall_s": 2})
    line = next(ln for ln in text.splitlines() if ln.startswith("record_dp_gain_kept "))
    assert line.split()[1:] == ["0.500", "0.500", "-"]


def test_repeated_seeds_are_refused(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "0", "0"])
    assert "--seeds repeats a seed" in capsys.readouterr().err


def test_population_shares_against_no_dp_and_the_same_strategy_without_dp(
    bench: ModuleType,
) -> None:
    rows = {
        "pop-1000-100-no-dp": _row(0.50, start=0.40),
        "pop-1000-100-no-dp+fedavgm": _row(0.60, start=0.40),
        "pop-1000-100-user-dp": _row(0.43, start=0.40),
        "pop-1000-100-user-dp+adaptive": _row(0.45, start=0.40),
        "pop-1000-100-user-dp+fedavgm": _row(0.55, start=0.40),
        "pop-1000-100-user-dp+fedadam": _row(0.40, start=0.40),  # no no-dp+fedadam row
        "pop-10-5-user-dp": _row(0.5, start=0.4),  # its no-dp row is missing: no share
    }
    assert bench.population_shares(rows) == pytest.approx(
        {
            "pop-1000-100-user-dp_share_of_no_dp_gain": 0.3,
            "pop-1000-100-user-dp+adaptive_share_of_no_dp_gain": 0.5,
            "pop-1000-100-user-dp+fedavgm_share_of_no_dp_gain": 1.5,
            "pop-1000-100-user-dp+fedavgm_share_of_no_dp+fedavgm_gain": 0.75,
            "pop-1000-100-user-dp+fedadam_share_of_no_dp_gain": 0.0,
        }
    )
