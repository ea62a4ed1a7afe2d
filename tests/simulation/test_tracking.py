"""``OUT/tensorboard/``: each round's metrics as TensorBoard events, read back with
TensorBoard's own reader (``EventAccumulator``).

The fast cases drive ``RunTracker`` with the server's real ``RoundResult``; the slow
case checks that a real tiny run under record-level DP logged exactly what its
``summary.json`` reports, round by round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from server.federation import RoundResult
from simulation.tracking import EVENTS_DIR, RunTracker, round_scalars
from tests.repo_helpers import fedota_cli


def read_events(out_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(out_dir / EVENTS_DIR))
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def same(logged: list[tuple[int, float]], expected: list[tuple[Any, Any]]) -> bool:
    """The same steps, and values equal up to float32 (how TensorBoard keeps a scalar)."""
    steps = [s for s, _ in logged] == [s for s, _ in expected]
    return steps and [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def entry(round_number: int, accuracy: float, upload: int, epsilon: float) -> dict[str, Any]:
    """One history entry as the server checkpoints it (``RoundResult.as_json``)."""
    train = {"upload-bytes": upload, "record-epsilon": epsilon, "user-epsilon": 0.0}
    return {
        "round": round_number,
        "train": train if round_number else {},
        "evaluate": {"clients-accuracy": accuracy, "clients-loss": 5.0 - accuracy},
        "elapsed_s": 1.5,
    }


def test_rounds_are_logged_at_their_step_with_their_values(tmp_path: Path) -> None:
    history = [entry(0, 0.10, 0, 0.0), entry(1, 0.125, 2048, 3.0)]
    seen: list[int] = []
    with RunTracker(tmp_path, dp_mode="record", history=history, config_toml="seed = 3\n") as t:
        after = t.after_round(lambda result: seen.append(result.round))
        after(
            RoundResult(
                round=2,
                global_adapter={"b": np.zeros(2, dtype=np.float32)},
                train={"upload-bytes": 4096.0, "record-epsilon": 5.5, "user-epsilon": 0.0},
                evaluate={"clients-accuracy": 0.25, "clients-loss": 4.5, "clients-x": float("nan")},
                elapsed_s=2.0,
            )
        )
        assert seen == [2]  # the wrapped callback still runs
        live = read_events(tmp_path)  # flushed after each round: readable while training
        assert scalars(live, "evaluate/clients-accuracy")[-1] == (2, 0.25)

    events = read_events(tmp_path)
    accuracy = scalars(events, "evaluate/clients-accuracy")
    assert same(accuracy, [(0, 0.10), (1, 0.125), (2, 0.25)]), accuracy
    loss = scalars(events, "evaluate/clients-loss")
    assert same(loss, [(0, 4.9), (1, 4.875), (2, 4.5)]), loss
    assert scalars(events, "train/upload-bytes") == [(1, 2048.0), (2, 4096.0)]
    assert scalars(events, "train/record-epsilon") == [(1, 3.0), (2, 5.5)]  # exact in float32
    assert [s for s, _ in scalars(events, "round/elapsed_s")] == [0, 1, 2]
    tags = events.Tags()
    assert "train/user-epsilon" not in tags["scalars"]  # ε of the mode that ran only
    assert "evaluate/clients-x" not in tags["scalars"]  # NaN is not logged
    assert "config/text_summary" in tags["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "seed = 3" in text


def test_a_resumed_run_holds_each_round_once(tmp_path: Path) -> None:
    with RunTracker(tmp_path, dp_mode="none", history=[entry(0, 0.1, 0, 0.0)]) as t:
        t.log_round(1, {"upload-bytes": 10}, {"clients-accuracy": 0.9})  # lost: not checkpointed
        t.log_round(2, {"upload-bytes": 10}, {"clients-accuracy": 0.9})
    resumed = [entry(0, 0.1, 0, 0.0), entry(1, 0.2, 20, 0.0)]
    with RunTracker(tmp_path, dp_mode="none", history=resumed) as t:
        t.log_round(2, {"upload-bytes": 30}, {"clients-accuracy": 0.3})

    assert len(list((tmp_path / EVENTS_DIR).glob("events.out.tfevents.*"))) == 1
    events = read_events(tmp_path)
    accuracy = scalars(events, "evaluate/clients-accuracy")
    assert same(accuracy, [(0, 0.1), (1, 0.2), (2, 0.3)]), accuracy
    assert "train/record-epsilon" not in events.Tags()["scalars"]  # no DP: no ε at all


def test_user_level_runs_log_user_epsilon_only() -> None:
    tags = round_scalars(
        {"user-epsilon": 1.5, "record-epsilon": 0.0, "flag": True, "note": "x"},
        {},
        dp_mode="user",
    )
    assert tags == {"train/user-epsilon": 1.5}


@pytest.mark.slow
def test_a_real_run_logs_what_its_summary_reports(tmp_path: Path, micro_base: Path) -> None:
    out = tmp_path / "run"
    args = ["--no-ota", "--dp-mode", "record", "--clients", "2", "--clients-per-round", "2"]
    args += ["--rounds", "2", "--local-steps", "1", "--base-model", str(micro_base)]
    result = fedota_cli("simulate", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    events = read_events(out)

    points = [summary["baseline"], *summary["rounds"]]
    for tag, key in (("clients-accuracy", "eval_accuracy"), ("clients-loss", "eval_loss")):
        logged = scalars(events, f"evaluate/{tag}")
        assert same(logged, [(p["round"], p[key]) for p in points]), logged
    rounds = summary["rounds"]
    assert scalars(events, "train/upload-bytes") == [
        (r["round"], r["upload_bytes"]) for r in rounds
    ]
    epsilon = scalars(events, "train/record-epsilon")
    assert same(epsilon, [(r["round"], r["epsilon"]["record_level"]) for r in rounds]), epsilon
    assert epsilon[-1][1] > 0
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'dp-mode = "record"' in config and "rounds = 2" in config


def test_the_ota_half_logs_each_published_round(tmp_path: Path) -> None:
    from simulation.fleet import SweepResult
    from simulation.ota_rollout import RoundOta
    from simulation.tracking import OTA_EVENTS_DIR, OtaTracker

    bad = SweepResult(polls=2, offers=5, updated=0, rolled_back=3, rejected=1, paused=True)
    rollback = SweepResult(polls=1, offers=4, updated=4)
    rounds = [
        RoundOta(1, (1,), 900, 0.5, (SweepResult(updated=6),)),
        RoundOta(2),  # not published (publish_every): no point
        RoundOta(3, (2, 3), 1200, 0.75, (bad, rollback), paused=True, planted=(2,)),
    ]
    with OtaTracker(tmp_path) as tracker:
        for r in rounds:
            tracker.log_round(r)
    events = EventAccumulator(str(tmp_path / OTA_EVENTS_DIR))
    events.Reload()
    assert scalars(events, "ota/bundle-bytes") == [(1, 900.0), (3, 1200.0)]
    assert scalars(events, "ota/adoption") == [(1, 0.5), (3, 0.75)]
    assert scalars(events, "ota/releases") == [(1, 1.0), (3, 2.0)]
    assert scalars(events, "ota/updated") == [(1, 6.0), (3, 4.0)]
    assert scalars(events, "ota/rolled-back") == [(1, 0.0), (3, 3.0)]
    assert scalars(events, "ota/rejected") == [(1, 0.0), (3, 1.0)]
    assert scalars(events, "ota/paused") == [(1, 0.0), (3, 1.0)]
    # The training tracker, opened afterwards, leaves the OTA events alone.
    with RunTracker(tmp_path, dp_mode="none"):
        pass
    assert list((tmp_path / OTA_EVENTS_DIR).glob("events.out.tfevents.*"))
