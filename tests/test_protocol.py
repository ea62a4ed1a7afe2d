"""The shared contracts of ``protocol/``: one run configuration, one LoRA shape, one
crash-safe writer, each defined once and read the same way by every side."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from protocol import (
    MODE_DEFAULTS,
    Aggregation,
    DpMode,
    LoraShape,
    LoraShapeError,
    RunConfig,
    RunConfigError,
    atomic_dir,
    atomic_file,
    atomic_write,
)

REPO = Path(__file__).resolve().parents[1]


def test_the_flower_app_config_is_exactly_the_run_config_defaults() -> None:
    """pyproject's [tool.flwr.app.config] cannot drift from RunConfig's defaults."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == RunConfig().to_flower()


def test_every_side_reads_its_defaults_from_the_run_config() -> None:
    from flwr.app import Context, RecordDict

    from client.client_app import ClientSettings
    from server.federation import FederationConfig
    from simulation import FederatedConfig

    default = RunConfig()
    server = FederationConfig().run_config()
    assert server == dataclasses.replace(default, aggregation=default.resolved_aggregation)
    sim = FederatedConfig(out_dir=Path("unused")).run_config()
    resolved = default.resolved()
    for name in ("dp_mode", "num_server_rounds", "local_steps", "learning_rate", "lora_head"):
        assert getattr(sim, name) == getattr(resolved, name), name
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"data-file": "x.json", "base-model": "base"},
        state=RecordDict(),
        run_config={},
    )
    assert ClientSettings.from_context(context, {}).run == resolved
    mode = MODE_DEFAULTS[default.dp_mode]
    assert (resolved.local_steps, resolved.learning_rate) == (mode.local_steps, mode.learning_rate)


def test_flower_form_round_trips_and_zero_means_the_mode_default() -> None:
    run = RunConfig(dp_mode=DpMode.NONE, local_steps=3, lora_head=True, epsilon_budget=2.5)
    assert RunConfig.from_flower(run.to_flower()) == run
    parsed = RunConfig.from_flower({"local-steps": 0, "lora-head": "auto", "aggregation": ""})
    assert (parsed.local_steps, parsed.lora_head, parsed.aggregation) == (None, None, None)
    record = RunConfig().resolved()
    assert (record.local_steps, record.batch_size, record.lora_head) == (8, 1024, True)
    plain = RunConfig(dp_mode=DpMode.NONE).resolved()
    assert (plain.local_steps, plain.batch_size, plain.lora_head) == (10, None, False)
    assert plain.aggregation == Aggregation.FEDAVG and record.aggregation == Aggregation.FFA
    assert plain.lora_alpha == 2.0 * plain.lora_rank


def test_command_line_strings_are_typed_once() -> None:
    run = RunConfig.from_flower({"lora-head": "true", "local-steps": "4", "dp-mode": "user"})
    assert (run.lora_head, run.local_steps, run.dp_mode) == (True, 4, DpMode.USER)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"local-stepz": 3}, "unknown run-config key.*local-stepz"),
        ({"dp-mode": "central"}, "dp-mode='central' is not one of none, record, user"),
        ({"lora-head": "maybe"}, "true or false"),
        ({"local-steps": 2.5}, "local-steps=2.5"),
        ({"seed": True}, "seed=True"),
    ],
)
def test_bad_run_config_is_refused_naming_the_key(raw: dict[str, object], match: str) -> None:
    with pytest.raises(RunConfigError, match=match):
        RunConfig.from_flower(raw)


def test_out_of_range_settings_are_named() -> None:
    problems = RunConfig(num_server_rounds=0, delta=2.0, lora_rank=0).problems()
    assert any("num-server-rounds=0" in p for p in problems)
    assert any("delta=2.0" in p for p in problems)
    assert any("lora-rank=0" in p for p in problems)


def test_the_lora_shape_is_one_type_everywhere() -> None:
    from client.train import LoraSettings
    from delta_packager import AdapterConfig
    from delta_packager.manifest import adapter_config_from_dict

    shape = LoraShape(rank=4, alpha=8.0, target_modules=("q_proj",), ffa=True, init_seed=3)
    assert LoraShape.from_json(shape.to_json()) == shape
    settings = LoraSettings.of(shape, dropout=0.1)
    assert isinstance(settings, LoraShape) and settings.as_shape() == shape
    config = adapter_config_from_dict(
        {"rank": 4, "alpha": 8.0, "target_modules": [], "ffa": False, "peft_config": {}}
    )
    assert isinstance(config, AdapterConfig) and config.as_shape() == LoraShape(rank=4, alpha=8.0)
    assert (
        LoraShape.from_json({"rank": 2, "alpha": 4.0, "target_modules": []}).target_modules is None
    )


@pytest.mark.parametrize(
    "kwargs", [{"rank": 0}, {"alpha": 0.0}, {"alpha": float("nan")}, {"target_modules": ()}]
)
def test_an_impossible_lora_shape_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(LoraShapeError):
        LoraShape(**kwargs)  # type: ignore[arg-type]


def test_atomic_file_leaves_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
        raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    with pytest.raises(OSError), atomic_dir(out) as tmp:  # holds files, replace is off
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"]


def test_a_killed_atomic_write_leaves_old_or_new_bytes(tmp_path: Path) -> None:
    """SIGKILL the writer at random points: the target is always whole."""
    target = tmp_path / "state.bin"
    atomic_write(target, b"A" * 100_000)
    code = (
        "import sys; from pathlib import Path; from protocol import atomic_write\n"
        "p = Path(sys.argv[1])\n"
        "while True: atomic_write(p, b'B' * 100_000)\n"
    )
    for delay in (0.05, 0.1, 0.2):
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)], env=os.environ)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert target.read_bytes() in (b"A" * 100_000, b"B" * 100_000)


def test_protocol_imports_no_torch_and_no_flower() -> None:
    code = "import sys, protocol; sys.exit(1 if {'torch', 'flwr'} & set(sys.modules) else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
