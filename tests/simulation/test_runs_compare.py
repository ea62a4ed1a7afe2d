"""``fedota runs compare RUN_DIR...``: two real tiny runs side by side (one Ray start
each), then the refusals of directories that are not finished runs (no training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulation import SimulationInputError
from simulation.compare import RunRecord, config_differences, headline_rows, load_run
from tests.repo_helpers import fedota_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WIDE = {"COLUMNS": "220"}  # rich wraps to the terminal: keep each row on one line


def env() -> dict[str, str]:
    return {**os.environ, **WIDE}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, micro_base: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("compare")
    common = ["--no-ota", "--no-dp", "--clients", "2", "--clients-per-round", "2"]
    common += ["--rounds", "2", "--local-steps", "2", "--base-model", str(micro_base)]
    runs = []
    for name, rank in (("rank2", "2"), ("rank4", "4")):
        out = root / name
        result = fedota_cli("simulate", *common, "--lora-rank", rank, "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(out)
    return runs


def row(stdout: str, label: str) -> list[str]:
    """The cells of the table row that starts with ``label``."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{stdout}")


@pytest.mark.slow
def test_compare_prints_both_runs_and_plots_accuracy(two_runs: list[Path], tmp_path: Path) -> None:
    plot = tmp_path / "plots" / "acc.png"
    result = fedota_cli("runs", "compare", *map(str, two_runs), "--plot", str(plot), env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    summaries = [json.loads((r / "summary.json").read_text()) for r in two_runs]
    for run in two_runs:
        assert str(run) in out
    assert row(out, "final eval accuracy") == [
        f"{s['final']['eval_accuracy']:.4f}" for s in summaries
    ]
    gains = [s["final"]["eval_accuracy"] - s["baseline"]["eval_accuracy"] for s in summaries]
    assert row(out, "accuracy gain over base") == [f"{g:+.4f}" for g in gains]
    uploads = [sum(r["upload_bytes"] for r in s["rounds"]) for s in summaries]
    assert row(out, "upload bytes (all rounds)") == [f"{u:,}" for u in uploads]
    assert uploads[1] > uploads[0]  # rank 4 sends larger LoRA tensors than rank 2
    assert row(out, "rounds") == ["2", "2"] and row(out, "ε user-level") == ["–", "–"]
    assert row(out, "option lora-rank") == ["2", "4"]  # the one option that differs
    assert "option seed" not in out and "option out" not in out
    assert f"plotted in {plot}" in out
    assert plot.read_bytes().startswith(PNG_MAGIC) and plot.stat().st_size > 5_000


@pytest.mark.slow
def test_default_plot_path_is_compare_png_in_the_working_directory(
    two_runs: list[Path], tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedota.cli", "runs", "compare", *map(str, two_runs)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG_MAGIC)


def summary(**changes: Any) -> dict[str, Any]:
    point = {"round": 0, "eval_loss": 5.0, "eval_accuracy": 0.1}
    base: dict[str, Any] = {
        "schema_version": 1,
        "config": {"clients": 4, "clients_per_round": 2, "aggregation": "ffa", "seed": 0},
        "baseline": point,
        "final": point | {"round": 1, "eval_accuracy": 0.2},
        "rounds": [point | {"round": 1, "upload_bytes": 100}],
        "privacy": {"mode": "record", "record_level": {"epsilon": 7.5}, "user_level": None},
        "elapsed_s": 3.25,
    }
    return base | changes


def test_headline_of_a_run(tmp_path: Path) -> None:
    rows = dict(headline_rows([RunRecord(tmp_path, summary())]))
    assert rows["accuracy gain over base"] == ["+0.1000"]
    assert rows["ε record-level (per device)"] == ["7.500"]
    assert rows["privacy mode, aggregation"] == ["record, ffa"]
    assert rows["clients (per round)"] == ["4 (2)"] and rows["elapsed"] == ["3.2 s"]


def test_differences_use_options_when_every_run_has_them(tmp_path: Path) -> None:
    a = summary(options={"seed": 0, "lora-rank": None, "out": "/a"})
    b = summary(options={"seed": 1, "lora-rank": 4, "out": "/b"})
    assert config_differences([RunRecord(tmp_path, a), RunRecord(tmp_path, b)]) == [
        ("seed", ["0", "1"]),
        ("lora-rank", ["–", "4"]),
    ]
    old = summary(config=summary()["config"] | {"seed": 5})  # written before options
    assert config_differences([RunRecord(tmp_path, a), RunRecord(tmp_path, old)]) == [
        ("seed", ["0", "5"])
    ]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d / "missing", "no such directory"),
        (lambda d: d, "no summary.json (not a `fedota simulate --out` directory"),
        (lambda d: (d / "summary.json").write_text("{") and d, "not readable JSON"),
        (lambda d: (d / "summary.json").write_text("{}") and d, "not a fedota summary (no "),
        (
            lambda d: (d / "summary.json").write_text(json.dumps(summary(schema_version=2))) and d,
            "schema_version 2, but this fedota reads 1",
        ),
    ],
    ids=["no-dir", "no-summary", "bad-json", "not-a-summary", "newer-schema"],
)
def test_bad_run_dirs_are_refused(tmp_path: Path, make: Any, expected: str) -> None:
    with pytest.raises(SimulationInputError) as err:
        load_run(make(tmp_path))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_run_dir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "summary.json").write_text(json.dumps(summary()))
    plot = tmp_path / "p.png"
    args = [str(good), str(tmp_path / "nope"), "--plot", str(plot)]
    result = fedota_cli("runs", "compare", *args, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: no such directory; pass the --out directory of a "
        "`fedota simulate` run"
    ]
    assert result.stdout == "" and not plot.exists()  # every directory is read first
