"""``fedota simulate --config FILE.toml`` and ``--print-config``.

The keys come from the command's own options, so the fast cases check them against
the click command (and against a scratch command with an option this file has never
heard of); bad files are refused with one line naming the file and the key. The slow
case trains twice: the second run, started from the first's ``OUT/config.toml``, must
give the same training results.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from typer.testing import CliRunner

from fedota.cli import app
from simulation import SimulationInputError
from simulation.config_file import (
    NOT_RECORDED,
    apply_config_file,
    option_keys,
    options_toml,
    recorded_options,
)
from tests.repo_helpers import fedota_cli

RUNNER = CliRunner()


def simulate_command() -> click.Command:
    group = typer.main.get_group(app)
    return group.commands["simulate"]


def print_config(*args: str) -> tuple[dict[str, Any], set[str]]:
    """``fedota simulate ... --print-config`` in this process: the set keys, the unset ones."""
    result = RUNNER.invoke(app, ["simulate", *args, "--print-config"])
    if result.exception is not None:
        raise result.exception
    assert result.exit_code == 0, result.output
    unset = set(re.findall(r"^# ([a-z][a-z0-9-]*) = ", result.stdout, flags=re.M))
    return tomllib.loads(result.stdout), unset


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_print_config_names_every_option_of_the_command() -> None:
    values, unset = print_config()
    keys = option_keys(simulate_command())
    recorded = {k for k, o in keys.items() if o.name not in NOT_RECORDED}
    assert set(values) | unset == recorded
    assert not set(values) & unset
    assert {"clients", "clients-per-round", "dp", "out", "lora-head"} <= recorded
    assert "config" not in keys and "print-config" not in keys
    assert values["clients"] == 6 and values["dp"] is True  # the defaults
    assert "aggregation" in unset  # None: written as a comment, TOML has no null


def test_file_sets_options_and_flags_override_it(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    run = write(
        tmp_path / "run.toml",
        'clients = 9\nrounds = 5\ndp = false\nlora-head = false\nbase-model = "base"\n'
        'target-epsilon = 4\nstages = "10,100"\n',
    )
    values, _ = print_config("--config", str(run), "--rounds", "2", "--dp")
    assert values["clients"] == 9 and values["lora-head"] is False
    assert values["target-epsilon"] == 4.0 and values["stages"] == "10,100"
    assert values["rounds"] == 2 and values["dp"] is True  # the command line wins
    assert values["base-model"] == str(tmp_path / "base")  # relative to the file


def test_printed_config_read_back_gives_the_same_options(tmp_path: Path) -> None:
    first, _ = print_config("--clients", "4", "--no-dp", "--lora-rank", "2", "--seed", "7")
    again, _ = print_config("--config", str(write(tmp_path / "p.toml", options_toml(first, "x"))))
    assert again == first


def test_an_option_added_to_the_command_is_a_key_at_once(tmp_path: Path) -> None:
    """The keys are read from the command: a new option needs no change to the reader."""
    scratch = typer.Typer()
    seen: dict[str, Any] = {}

    @scratch.command()
    def run(
        ctx: typer.Context,
        config: Path | None = typer.Option(
            None, "--config", is_eager=True, callback=apply_config_file
        ),
        brand_new_knob: float = typer.Option(0.5, "--brand-new-knob", min=0.0, max=1.0),
        other: int = typer.Option(1, "--other"),
    ) -> None:
        seen.update(recorded_options(ctx))

    file = write(tmp_path / "k.toml", "brand-new-knob = 0.25\n")
    result = RUNNER.invoke(scratch, ["--config", str(file), "--other", "3"])
    assert result.exit_code == 0, result.output
    assert seen == {"brand-new-knob": 0.25, "other": 3}
    bad = write(tmp_path / "bad.toml", "brand-new-knob = 2.0\n")
    result = RUNNER.invoke(scratch, ["--config", str(bad)])
    assert isinstance(result.exception, SimulationInputError)
    assert "brand-new-knob = 2.0" in str(result.exception)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("client = 3\n", "unknown key 'client' (did you mean 'clients'?)"),
        ("clients_per_round = 3\n", "(did you mean 'clients-per-round'?)"),
        ("print-config = true\n", "unknown key 'print-config'"),
        ('clients = "six"\n', "clients = 'six' is not a whole number"),
        ("clients = 2.5\n", "clients = 2.5 is not a whole number"),
        ("dp = 1\n", "dp = 1 is not a boolean (true or false)"),
        ("rounds = 0\n", "rounds = 0: 0 is not in the range x>=1"),
        ("[fleet]\ndevices = 3\n", "unknown key 'fleet'"),
        ("devices = [1, 2]\n", "devices = [1, 2] is a list"),
        ("clients = \n", "not valid TOML"),
    ],
    ids=[
        "unknown",
        "snake-case",
        "meta-option",
        "text-for-int",
        "float-for-int",
        "int-for-bool",
        "out-of-range",
        "table",
        "list",
        "not-toml",
    ],
)
def test_bad_files_are_refused_naming_file_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    file = write(tmp_path / "bad.toml", text)
    with pytest.raises(SimulationInputError) as err:
        print_config("--config", str(file))
    message = str(err.value)
    assert expected in message and str(file) in message, message
    assert "\n" not in message


def test_cli_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    file = write(tmp_path / "run.toml", "rounds = 2\nlora-rnak = 4\n")
    result = fedota_cli("simulate", "--config", str(file), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --config {file}: unknown key 'lora-rnak' (did you mean 'lora-rank'?); the "
        "keys are the options of `fedota simulate --help` without their dashes "
        "(`--print-config` lists them all)"
    ]
    missing = fedota_cli("simulate", "--config", str(tmp_path / "nope.toml"), timeout=120)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def _training(summary: dict[str, Any]) -> dict[str, Any]:
    """What training produced, without wall times."""
    rounds = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in summary["rounds"]]
    return {k: summary[k] for k in ("config", "baseline", "final", "privacy")} | {"rounds": rounds}


@pytest.mark.slow
def test_recorded_config_reproduces_the_run(tmp_path: Path, micro_base: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["--no-ota", "--no-dp", "--clients", "2", "--clients-per-round", "2"]
    args += ["--rounds", "2", "--local-steps", "2", "--lora-rank", "2", "--seed", "3"]
    run = fedota_cli("simulate", *args, "--base-model", str(micro_base), "--out", str(first))
    assert run.returncode == 0, run.stderr[-3000:]

    recorded = json.loads((first / "summary.json").read_text())["options"]
    toml = tomllib.loads((first / "config.toml").read_text())
    assert toml == {k: v for k, v in recorded.items() if v is not None}
    assert recorded["lora-rank"] == 2 and recorded["seed"] == 3 and recorded["dp"] is False
    assert recorded["out"] == str(first) and recorded["aggregation"] is None

    rerun = fedota_cli("simulate", "--config", str(first / "config.toml"), "--out", str(second))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    a = json.loads((first / "summary.json").read_text())
    b = json.loads((second / "summary.json").read_text())
    assert _training(a) == _training(b)
    assert b["options"] == recorded | {"out": str(second)}


def test_quality_tolerance_is_an_option_and_refuses_a_negative_value() -> None:
    options, _ = print_config("--quality-tolerance", "0.1")
    assert options["quality-tolerance"] == 0.1
    result = RUNNER.invoke(app, ["simulate", "--quality-tolerance", "-1", "--print-config"])
    assert result.exit_code == 2
