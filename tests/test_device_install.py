"""The device install is torch-free (docs/architecture.md, "External contracts";
DESIGN decision 11).

A fresh virtualenv gets ``pip install 'fedota[device]'`` (the ``device_venv`` fixture in
``tests/conftest.py``), exactly what a phone-side install runs, and must hold none of the
training or server stacks while the update agent, the llama.cpp runtime and every
``fedota device`` command still work, and a server command says which extra it needs.
The last test runs the device commands of that install end to end: enroll on a GGUF
base, update and infer against a real ``fedota serve`` (this venv) holding a release
that names the GGUF base (``released_micro_server``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.ota_server_helpers import ReleasedServer

pytestmark = pytest.mark.slow

# Distributions a device install must not hold (pip list names, normalised).
HEAVY_DISTRIBUTIONS = (
    "torch",
    "transformers",
    "bitsandbytes",
    "peft",
    "opacus",
    "ray",
    "flwr",
    "fastapi",
    "sqlalchemy",
)
# ... and the modules they would put in sys.modules.
HEAVY_MODULES = (*HEAVY_DISTRIBUTIONS, "accelerate", "matplotlib", "uvicorn", "pydantic")
DEVICE_COMMANDS = ("enroll", "update", "status", "infer")


def _run(
    bin_dir: Path, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_device_install_holds_no_training_or_server_packages(device_venv: Path) -> None:
    listed = _run(device_venv, "python", "-m", "pip", "list", "--format=json")
    assert listed.returncode == 0, listed.stderr
    names = {_normalise(p["name"]) for p in json.loads(listed.stdout)}
    assert {"fedota", "llama-cpp-python", "gguf", "tuf", "safetensors"} <= names
    assert sorted(names & set(HEAVY_DISTRIBUTIONS)) == []


def test_update_agent_and_llamacpp_runtime_import_without_heavy_modules(
    device_venv: Path,
) -> None:
    code = (
        "import json, sys\n"
        "import client.update, client.runtime.llamacpp\n"
        f"heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
        "import llama_cpp\n"  # the compiled library loads on this CPU
        "print(json.dumps({'heavy': heavy, 'llama_cpp': llama_cpp.__version__}))\n"
    )
    result = _run(device_venv, "python", "-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report == {"heavy": [], "llama_cpp": "0.3.36"}


def test_fedota_and_every_device_command_start(device_venv: Path) -> None:
    root = _run(device_venv, "fedota", "--help")
    assert root.returncode == 0, root.stderr
    assert "device" in root.stdout
    group = _run(device_venv, "fedota", "device", "--help")
    assert group.returncode == 0, group.stderr
    for command in DEVICE_COMMANDS:
        assert command in group.stdout
        result = _run(device_venv, "fedota", "device", command, "--help")
        assert result.returncode == 0, f"device {command}: {result.stderr}"
        assert "--state" in result.stdout


def test_device_status_reports_a_missing_enrollment_in_one_line(
    device_venv: Path, tmp_path: Path
) -> None:
    result = _run(device_venv, "fedota", "device", "status", "--state", str(tmp_path / "none"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_release_tooling_works_in_the_core_install(device_venv: Path, tmp_path: Path) -> None:
    result = _run(device_venv, "fedota", "keys", "init", "--out", str(tmp_path / "keys"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "keys" / "root.json").is_file()


@pytest.mark.parametrize(
    ("argv", "command", "extra"),
    [
        (("serve", "--help"), "fedota serve", "server"),
        (("db", "upgrade", "--database-url", "sqlite://"), "fedota db", "server"),
        (("publish", "bundle.zst", "--server", "http://x"), "fedota publish", "server"),
        (("simulate", "--help"), "fedota simulate", "sim"),
        (("base-model",), "fedota base-model", "sim"),
    ],
    ids=["serve-help", "db-upgrade", "publish", "simulate-help", "base-model"],
)
def test_a_command_of_a_missing_extra_names_the_extra(
    device_venv: Path, argv: tuple[str, ...], command: str, extra: str
) -> None:
    result = _run(device_venv, "fedota", *argv)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: '{command}' needs the {extra} extra")
    assert lines[0].endswith(f"pip install 'fedota[{extra}]'")


def test_an_nf4_base_on_the_device_install_names_the_train_extra(
    device_venv: Path, micro_base: Path
) -> None:
    code = (
        "import sys\n"
        "from client.errors import ClientInputError\n"
        "from client.runtime import open_runtime\n"
        "try:\n"
        f"    open_runtime({str(micro_base / 'nf4')!r})\n"
        "except ClientInputError as e:\n"
        "    print(e)\n"
        "    sys.exit(e.exit_code)\n"
    )
    result = _run(device_venv, "python", "-c", code)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "needs the train extra" in lines[0], result.stdout
    assert "pip install 'fedota[train]'" in lines[0]


def test_device_cli_enrolls_updates_and_infers_on_a_gguf_base_against_fedota_serve(
    device_venv: Path, released_micro_server: ReleasedServer, micro_gguf: Path, tmp_path: Path
) -> None:
    server, state = released_micro_server, str(tmp_path / "device")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FEDOTA_ENROLLMENT_SECRET"] = server.enrollment_secret
    enroll = ["fedota", "device", "enroll", "--server", server.url, "--state", state]
    enroll += ["--root", str(server.root), "--golden", str(server.golden)]
    enroll += ["--base", str(micro_gguf), "--runtime"]

    wrong = _run(device_venv, *enroll, "nf4", env=env)
    assert wrong.returncode == 2, wrong.stderr
    assert "--runtime nf4 needs an NF4 checkpoint directory as --base" in wrong.stderr

    enrolled = _run(device_venv, *enroll, "llamacpp", env=env)
    assert enrolled.returncode == 0, enrolled.stderr[-2000:]
    assert "(llamacpp runtime, base " in enrolled.stdout

    update = ("fedota", "device", "update", "--state", state)
    updated = _run(device_venv, *update, env=env)
    assert updated.returncode == 0, updated.stderr[-2000:]
    assert updated.stdout.strip() == f"updated to adapter version {server.version}"
    current = _run(device_venv, *update, env=env)
    assert current.returncode == 10, current.stderr[-2000:]

    infer = ("fedota", "device", "infer", "--state", state, "--prompt", "the weather today is")
    inferred = _run(device_venv, *infer, "--max-new-tokens", "8", "--json", env=env)
    assert inferred.returncode == 0, inferred.stderr[-2000:]
    record = json.loads(inferred.stdout.strip().splitlines()[-1])
    assert (record["runtime"], record["adapter_version"]) == ("llamacpp", server.version)
    assert record["new_tokens"] >= 1 and record["text"].strip()
    assert 0 < record["peak_added_bytes"] <= record["budget_bytes"] == 512 * 2**20

    status = _run(device_venv, "fedota", "device", "status", "--state", state, "--json", env=env)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["base_fingerprint"] == server.gguf_fingerprint
    assert info["active_version"] == server.version and info["runtime"] == "llamacpp"
