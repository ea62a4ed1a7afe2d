"""Deployment engine: a real SuperLink and two SuperNodes on loopback, two rounds via
``flwr run`` of the same ``ServerApp`` / ``ClientApp`` the simulation uses.

The app is copied into a temporary directory (its ``pyproject.toml`` carries only the
``[tool.flwr.app]`` tables of ours): ``flwr run`` migrates a legacy
``[tool.flwr.federations]`` table by rewriting ``pyproject.toml``, which must never
happen to the repository's own file. ``FLWR_HOME`` points at a temporary Flower config
naming the loopback SuperLink. Every process listens on 127.0.0.1 only and is killed
at the end; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(v: object) -> str:
    return (
        json.dumps(v) if isinstance(v, str) else repr(v).lower() if isinstance(v, bool) else repr(v)
    )


def write_app(app_dir: Path) -> None:
    """A minimal Flower app dir: our components and run config, our packages."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    flwr_app = project["tool"]["flwr"]["app"]
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedota-deploy-test"',
        'version = "0.1.0"',
        "dependencies = []",
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        f"publisher = {toml_value(flwr_app['publisher'])}",
        "",
        "[tool.flwr.app.components]",
        *(f"{k} = {toml_value(v)}" for k, v in flwr_app["components"].items()),
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {toml_value(v)}" for k, v in flwr_app["config"].items()),
        "",
    ]
    app_dir.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text("\n".join(lines))
    for pkg in ("client", "server", "delta_packager"):
        shutil.copytree(
            REPO / pkg,
            app_dir / pkg,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "migrations"),
        )


class Processes:
    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env, self.procs = logs, env, []  # type: ignore[var-annotated]

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.logs,
            start_new_session=True,
        )
        self.procs.append((proc, log))
        return proc

    def stop(self) -> None:
        for proc, log in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            log.close()

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    p = Processes(logs, env)
    yield p
    p.stop()


def test_two_rounds_on_a_real_superlink_with_two_supernodes(
    tmp_path: Path, procs: Processes, micro_base: Path
) -> None:
    from simulation.data import SyntheticConfig, generate_synthetic, write_partitions

    pyproject_before = (REPO / "pyproject.toml").read_bytes()

    parts = write_partitions(
        generate_synthetic(
            SyntheticConfig(num_clients=2, num_heldout_clients=0, seed=0, max_texts=30)
        ),
        tmp_path / "parts",
    )
    app_dir = tmp_path / "app"
    write_app(app_dir)
    link = free_port()
    home = Path(procs.env["FLWR_HOME"])
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    procs.start(
        "superlink",
        "flower-superlink",
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(link),
        "--disable-runtime-dependency-installation",
        "--database",
        str(tmp_path / "state.db"),
    )
    for i in range(2):
        node_config = f'data-file="{parts}/partition-{i}.json" state-dir="{tmp_path}/devices"'
        procs.start(
            f"supernode-{i}",
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{link}",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
        )
    ckpt = tmp_path / "checkpoints"
    overrides = (
        f"num-server-rounds=2 clients-per-round=2 min-clients=2 num-nodes=2 "
        f'dp-mode="none" aggregation="fedavg" local-steps=3 '
        f'base-model="{micro_base}" checkpoint-dir="{ckpt}" round-timeout-s=240.0'
    )
    deadline = time.monotonic() + 540  # each message starts a fresh flwr-clientapp process
    started = None
    while started is None or started.returncode != 0:
        started = subprocess.run(
            [str(BIN / "flwr"), "run", str(app_dir), "--run-config", overrides],
            env=procs.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        if started.returncode != 0:  # the SuperLink may still be starting
            assert time.monotonic() < deadline, started.stdout + started.stderr + procs.tail()
            time.sleep(2)
    assert "Successfully started run" in started.stdout, started.stdout + started.stderr

    latest = ckpt / "LATEST"
    while not (latest.is_file() and latest.read_text().strip() == "round-0002"):
        assert time.monotonic() < deadline, "two rounds did not finish in time\n" + procs.tail()
        time.sleep(2)
    state = json.loads((ckpt / "round-0002" / "state.json").read_text())
    history = state["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    for h in history[1:]:
        assert h["train"]["clients-trained"] == 2
        assert h["train"]["round-applied"] == 1
        assert h["evaluate"]["clients-nodes"] == 2
    assert history[2]["evaluate"]["clients-loss"] < history[0]["evaluate"]["clients-loss"]
    # the repository's own pyproject.toml was not touched by `flwr run`
    assert (REPO / "pyproject.toml").read_bytes() == pyproject_before
