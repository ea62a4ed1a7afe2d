"""docker/: no Docker engine runs here, so check what can be checked without one.

* every file a Dockerfile COPYs exists in the build context (the repository);
* every command an image or compose service runs exists, with every option it passes:
  ``fedota`` subcommands against the real CLI, Flower's executables against their
  ``--help``;
* every host path compose mounts exists after ``docker/make-credentials.sh`` ran
  (the script is run for real, in a copy of docker/);
* every long-running service has a health check.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _exec_form(dockerfile: Path, op: str) -> list[str]:
    values = [rest for o, rest in _instructions(dockerfile) if o == op]
    return json.loads(values[-1]) if values else []


@cache
def _fedota_command() -> click.Command:
    from fedota.cli import app

    return typer.main.get_command(app)


@cache
def _flower_options(executable: str) -> frozenset[str]:
    exe = Path(sys.executable).parent / executable
    help_text = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]+)", help_text))


def _check_argv(argv: list[str]) -> None:
    """Assert that ``argv`` names an existing command and only its real options."""
    exe, args = argv[0], argv[1:]
    if exe == "fedota":
        command: click.Command = _fedota_command()
        while isinstance(command, click.Group) and args and not args[0].startswith("-"):
            name, args = args[0], args[1:]
            assert name in command.commands, f"`fedota` has no subcommand {name!r}: {argv}"
            command = command.commands[name]
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    else:
        assert executable_exists(exe), f"{exe} is not installed with the project"
        known = set(_flower_options(exe))
    used = {a.split("=")[0] for a in args if a.startswith("--")}
    assert used <= known, f"{argv}: unknown options {sorted(used - known)}"


def executable_exists(name: str) -> bool:
    return (Path(sys.executable).parent / name).is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.name for d in DOCKERFILES])
def test_dockerfile_copies_existing_files_and_runs_real_commands(dockerfile: Path) -> None:
    for op, rest in _instructions(dockerfile):
        if op == "COPY":
            *sources, _ = rest.split()
            for src in sources:
                assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
    assert any(op == "HEALTHCHECK" for op, _ in _instructions(dockerfile))
    _check_argv(_exec_form(dockerfile, "ENTRYPOINT") + _exec_form(dockerfile, "CMD"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


def _service_argv(service: dict[str, Any]) -> list[str]:
    dockerfile = REPO / service["build"]["dockerfile"]
    entry = service.get("entrypoint") or _exec_form(dockerfile, "ENTRYPOINT")
    command = service.get("command") or _exec_form(dockerfile, "CMD")
    return [*entry, *command]


def test_compose_services_run_real_commands_with_health_checks(compose: dict[str, Any]) -> None:
    built = {n: s for n, s in compose["services"].items() if "build" in s}
    assert {"ota-server", "superlink", "supernode-1", "supernode-2"} <= set(built)
    for name, service in compose["services"].items():
        if "build" in service:
            assert (REPO / service["build"]["dockerfile"]).is_file(), name
            _check_argv(_service_argv(service))
            dockerfile = REPO / service["build"]["dockerfile"]
            has_check = "healthcheck" in service or any(
                op == "HEALTHCHECK" for op, _ in _instructions(dockerfile)
            )
        else:
            has_check = "healthcheck" in service
        assert has_check, f"service {name} has no health check"


def test_ota_server_runs_on_postgres_with_two_workers(compose: dict[str, Any]) -> None:
    argv = _service_argv(compose["services"]["ota-server"])
    assert argv[:2] == ["fedota", "serve"]
    assert argv[argv.index("--database-url") + 1].startswith("postgresql+psycopg://")
    assert argv[argv.index("--workers") + 1] == "2"
    mounts = " ".join(compose["services"]["ota-server"]["volumes"])
    assert "root.pem" not in mounts and "targets.pem" not in mounts  # offline keys stay out


def _copy_docker_dir(tmp_path: Path) -> Path:
    """docker/ copied under ``tmp_path``, without any credentials made in the checkout."""
    return Path(
        shutil.copytree(DOCKER, tmp_path / "docker", ignore=shutil.ignore_patterns("credentials"))
    )


def _make_credentials(work: Path, *, path: str) -> subprocess.CompletedProcess[str]:
    """Run ``make-credentials.sh 2`` in ``work`` with only ``PATH=path`` in its environment."""
    return subprocess.run(
        ["bash", str(work / "make-credentials.sh"), "2"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": path},
    )


def test_mounted_credentials_are_what_the_script_makes(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    work = _copy_docker_dir(tmp_path)
    result = _make_credentials(work, path=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert (work / host).exists(), f"{name} mounts {host}, which is not created"


def test_make_credentials_checks_for_fedota_before_writing_anything(tmp_path: Path) -> None:
    """Issue 22 item 9: without ``fedota`` on PATH the script used to write the CA,
    certificates and node keys, then fail at the TUF keys."""
    work = _copy_docker_dir(tmp_path)
    before = sorted(p.name for p in work.iterdir())
    assert shutil.which("fedota", path="/usr/bin:/bin") is None
    result = _make_credentials(work, path="/usr/bin:/bin")  # openssl, ssh-keygen, no fedota
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "fedota" in result.stderr and "nothing was written" in result.stderr
    assert sorted(p.name for p in work.iterdir()) == before  # no credentials/ at all
