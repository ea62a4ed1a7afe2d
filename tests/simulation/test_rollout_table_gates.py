"""The rollout table says which release gate stopped a release (ADR 0014): the phones'
health checks (the failure threshold) or the quality gate, with the losses reported."""

from __future__ import annotations

from typing import Any

from simulation.fleet.report import ROLLOUT_COLUMNS, rollout_table


def _row(**extra: Any) -> dict[str, Any]:
    return {
        "version": 2,
        "kind": "bad",
        "stages": [50, 100],
        "stages_reached": 1,
        "percent_reached": 50,
        "state": "cancelled",
        "paused": True,
        "auto_paused": True,
        "rolled_back_by": 3,
        "bundle_bytes": 1234,
        **extra,
    }


def test_stopped_by_names_the_gate_and_the_losses() -> None:
    table = rollout_table(
        [
            _row(
                stopped_by="health_check",
                reported_golden_loss=9.5,
                reported_previous_golden_loss=3.2,
            ),
            _row(stopped_by="quality", reported_golden_loss=3.6, reported_previous_golden_loss=3.2),
            _row(
                paused=False, auto_paused=False, stopped_by=None, kind="good", rolled_back_by=None
            ),
        ]
    )
    column = ROLLOUT_COLUMNS.index("stopped by")
    losses = ROLLOUT_COLUMNS.index("golden loss reported (new / replaced)")
    assert [r[column] for r in table.rows] == ["health check", "quality gate", ""]
    assert [r[losses] for r in table.rows] == ["9.5 / 3.2", "3.6 / 3.2", ""]
    assert "| quality gate |" in "\n".join(table.markdown())


def test_summaries_written_before_the_gates_still_render() -> None:
    # rollouts[] of an older summary.json lack the added keys: empty cells, no error
    (row,) = rollout_table([_row()]).rows
    assert row[ROLLOUT_COLUMNS.index("stopped by")] == ""


def test_final_table_names_the_gate_of_each_auto_paused_release() -> None:
    from simulation.fleet import TABLE_KEYS
    from simulation.report import final_table

    point = {"eval_accuracy": 0.5, "eval_loss": 2.0}
    summary = {
        "baseline": point,
        "final": point,
        "privacy": {"mode": "record", "epsilon": 8.0},
        "fleet": {**dict.fromkeys(TABLE_KEYS, 0), "runtimes": {}, "faults": {}},
        "rollouts": [
            _row(kind="good", paused=False, auto_paused=False, version=1),
            _row(version=2, stopped_by="health_check"),
            _row(version=4, kind="good", stopped_by="quality"),
            _row(version=5, kind="good"),  # an older summary: no stopped_by
        ],
    }
    rows = dict(final_table(summary))
    assert rows["releases (auto-paused)"] == "4 (v2 by health check, v4 by quality gate, v5)"
