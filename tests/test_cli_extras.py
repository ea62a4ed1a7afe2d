"""``fedota`` in a partial install: a command whose pip extra is missing says which one.

Fast checks in this (full) venv, each in a fresh process that hides one package from
the import system; ``tests/test_device_install.py`` checks a real device-only install.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from fedota.cli import COMMAND_GROUPS, EXTRA_MODULES, extra_providing
from tests.repo_helpers import REPO

# Runs the CLI with the packages named in HIDDEN reported missing by find_spec (what
# fedota.cli checks at start) and refused by import.
_HIDE = """
import importlib.abc, importlib.util, sys
HIDDEN = set(sys.argv[1].split(","))
real_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    return None if name.partition(".")[0] in HIDDEN else real_find_spec(name, package)
importlib.util.find_spec = find_spec
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Refuse())
sys.argv = ["fedota", *sys.argv[2:]]
from fedota.cli import main
main()
"""


def _fedota_without(hidden: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _HIDE, hidden, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        ("torch", "train"),
        ("torch.nn.functional", "train"),
        ("flwr", "train"),
        ("ray", "sim"),
        ("fastapi", "server"),
        ("llama_cpp", "device"),
        ("client", None),
        (None, None),
    ],
)
def test_extra_providing(module: str | None, extra: str | None) -> None:
    assert extra_providing(module) == extra


def test_extra_modules_follow_pyproject_extras() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(EXTRA_MODULES) <= set(extras)
    assert {g.extra for g in COMMAND_GROUPS if g.extra} <= set(EXTRA_MODULES)


@pytest.mark.parametrize(
    ("hidden", "argv", "message"),
    [
        ("fastapi", ("serve", "--help"), "'fedota serve' needs the server extra"),
        ("sqlalchemy", ("db", "upgrade"), "'fedota db' needs the server extra"),
        ("torch", ("simulate",), "'fedota simulate' needs the sim extra"),
        ("ray", ("base-model", "init", "--help"), "'fedota base-model' needs the sim extra"),
    ],
    ids=["serve", "db", "simulate", "base-model"],
)
def test_group_of_a_missing_extra_exits_2_in_one_line(
    hidden: str, argv: tuple[str, ...], message: str
) -> None:
    result = _fedota_without(hidden, *argv)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    extra = message.split(" needs the ")[1].split()[0]
    assert result.stderr == (
        f"error: {message} ({hidden} is not installed): pip install 'fedota[{extra}]'\n"
    )


def test_root_help_still_lists_a_group_whose_extra_is_missing() -> None:
    result = _fedota_without("fastapi", "--help")
    assert result.returncode == 0, result.stderr
    for name in ("serve", "publish", "db", "rollout", "device", "package", "keys"):
        assert name in result.stdout
    assert "needs the server extra" in result.stdout


def test_device_help_is_unchanged_when_server_and_training_are_missing() -> None:
    result = _fedota_without("fastapi,torch,flwr", "device", "--help")
    assert result.returncode == 0, result.stderr
    for name in ("enroll", "update", "status", "infer"):
        assert name in result.stdout


# A core command that reaches a missing extra inside its body (as `fedota device infer`
# does on an NF4 base without torch): one line naming the command and the extra.
_REACH = _HIDE.replace(
    "from fedota.cli import main\n",
    "from fedota.cli import app, main\n"
    "@app.command('reach')\n"
    "def reach() -> None:\n"
    "    import torch\n",
)


def test_command_reaching_a_missing_extra_exits_2_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _REACH, "torch", "-v", "reach"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "error: 'fedota reach' needs the train extra (torch is not installed): "
        "pip install 'fedota[train]'\n"
    )


def test_a_missing_module_of_no_extra_is_still_a_bug() -> None:
    script = _REACH.replace("import torch", "import fedota_no_such_module")
    result = subprocess.run(
        [sys.executable, "-c", script, "torch", "reach"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr
