"""The main job, reduced: ``fedota simulate`` trains on Flower's simulation engine and
ships every round through the real OTA server to a fleet of simulated phones.

One run (tiny base, record-level DP, 16 phones, every fault injected, the round-2
release corrupted) is shared by the checks of issue 7's acceptance: no phone in a
mixed state, no budget violation, accuracy above the baseline, every healthy phone on
the latest release, the faulty release auto-paused and rolled back; and by the checks
of the outputs (summary, report, plots, progress and the final table). The default
stages for 16 phones are 50 % then 100 %: the bad release's first stage holds fewer
than the 2 reports the threshold needs with probability ~0.1 %.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from simulation.fleet import PLOTS
from simulation.report import TRAINING_PLOTS
from tests.repo_helpers import fedota_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("simulate") / "run"
    result = fedota_cli(
        "simulate",
        "--base-model",
        str(tiny_base),
        "--clients",
        "4",
        "--clients-per-round",
        "2",
        "--rounds",
        "3",
        "--devices",
        "16",
        "--faults",  # a user's own --base-model turns them off by default
        "--out",
        str(out),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return {"out": out, "summary": summary, "stdout": result.stdout, "stderr": result.stderr}


def test_default_run_meets_the_fleet_invariants(run: dict[str, Any]) -> None:
    summary = run["summary"]
    fleet = summary["fleet"]
    assert fleet["devices"] == 16
    assert fleet["mixed_state"] == 0, fleet.get("mixed_examples")
    assert fleet["budget_violations"] == 0
    assert summary["final"]["eval_accuracy"] > summary["baseline"]["eval_accuracy"]
    assert 0 < summary["privacy"]["epsilon"] <= 8.0
    # Every healthy phone (not the one on another base) ends on the latest release.
    latest = summary["rollouts"][-1]["version"]
    assert fleet["latest_good_version"] == latest
    assert fleet["healthy_on_latest"] == fleet["healthy_devices"] > 0
    assert fleet["healthy_not_on_latest"] == 0
    assert fleet["other_base_offered"] == 0
    assert 0 < fleet["bytes_downloaded"] < fleet["bytes_if_full_model"]
    # The default fleet is mixed: phones on llama.cpp (a GGUF export) take every release.
    runtimes = fleet["runtimes"]
    assert set(runtimes) == {"llamacpp", "nf4"}
    assert runtimes["llamacpp"]["updates"] > 0
    assert all(r["budget_violations"] == 0 for r in runtimes.values())


def test_faulty_release_is_auto_paused_and_rolled_back(run: dict[str, Any]) -> None:
    rollouts = run["summary"]["rollouts"]
    assert [r["kind"] for r in rollouts] == ["good", "bad", "rollback", "good"]
    bad, rollback = rollouts[1], rollouts[2]
    assert bad["round"] == 2 and bad["auto_paused"] and bad["pause_reason"] == "threshold"
    assert bad["state"] == "cancelled" and bad["installed"] == 0 and bad["failed"] >= 2
    assert bad["rolled_back_by"] == rollback["version"] > bad["version"]
    assert rollback["golden_loss"] == rollouts[0]["golden_loss"]  # the last good payload
    assert run["summary"]["fleet"]["rolled_back"] >= 2
    for good in (rollouts[0], rollouts[2], rollouts[3]):
        assert good["stages_reached"] == len(good["stages"]) and not good["paused"]


def test_outputs_report_and_progress(run: dict[str, Any]) -> None:
    out, summary = run["out"], run["summary"]
    assert [r["round"] for r in summary["ota_rounds"]] == [1, 2, 3]
    assert summary["ota_rounds"][1]["paused"] and len(summary["ota_rounds"][1]["releases"]) == 2
    for plot in (*TRAINING_PLOTS, *PLOTS):
        assert (out / plot).stat().st_size > 1000, plot
    report = (out / "report.md").read_text()
    assert "mixed_state" in report and "![adoption.png](adoption.png)" in report
    assert (out / "report.html").is_file()
    assert "round 3/3" in run["stderr"] and "OTA: released v2, v3" in run["stderr"]
    # Every planted fault says so, in the log, the final table and the report.
    planted = "v2: planted bad release (fault injection; --no-faults to turn off)"
    assert planted in run["stderr"]  # the warning before its sweep and the round's line
    assert "planted phone faults (fault injection; --no-faults to turn off)" in run["stderr"]
    table = " ".join(re.sub("[│┃]", " ", run["stdout"]).split())  # cells may wrap
    assert f"planted faults {planted}; planted on phones:" in table
    assert planted in report and "| v2 | planted bad release (fault injection) |" in report
    assert "mixed_state" in run["stdout"] and "report in" in run["stdout"]
    assert "phones on llamacpp" in run["stdout"] and "phones on nf4" in run["stdout"]
    assert "Loading weights" not in run["stderr"]  # library chatter stays hidden


def test_each_published_round_is_in_tensorboard(run: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simulation.tracking import OTA_EVENTS_DIR

    events = EventAccumulator(str(run["out"] / OTA_EVENTS_DIR))
    events.Reload()
    ota = run["summary"]["ota_rounds"]

    def logged(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert logged("ota/bundle-bytes") == [(r["round"], r["bundle_bytes"]) for r in ota]
    assert logged("ota/releases") == [(r["round"], len(r["releases"])) for r in ota]
    assert logged("ota/paused") == [(r["round"], float(r["paused"])) for r in ota]
    adoption = logged("ota/adoption")
    assert [s for s, _ in adoption] == [r["round"] for r in ota]
    assert [v for _, v in adoption] == pytest.approx([r["adoption"] for r in ota], rel=1e-6)
