"""Helpers for the multi-process deployment tests (SuperLink, SuperNodes, OTA server, Ray).

Every process listens on 127.0.0.1, runs in its own session (process group) and is
killed, with every descendant it left behind, by :meth:`Processes.stop`. Every wait is
bounded by an explicit deadline and fails with the tail of every log.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(v: object) -> str:
    """A Python scalar as a TOML literal."""
    if isinstance(v, bool):
        return repr(v).lower()
    return json.dumps(v) if isinstance(v, str) else repr(v)


def write_app(app_dir: Path) -> None:
    """A minimal Flower app dir: our components and run config, our packages.

    ``flwr run`` may rewrite the ``pyproject.toml`` it is given, so it gets a copy.
    """
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
    for pkg in ("client", "server", "delta_packager", "protocol"):
        shutil.copytree(
            REPO / pkg,
            app_dir / pkg,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "migrations"),
        )


def write_flwr_config(home: Path, *, name: str, address: str, root_cert: Path) -> None:
    """``$FLWR_HOME/config.toml`` naming one SuperLink reached over TLS."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "{address}"\nroot-certificates = "{root_cert}"\n'
    )


def orphans_of(pid: int) -> list[psutil.Process]:
    """Processes started with ``--parent-pid PID`` (Flower's ``flower-superexec``) that
    outlived their parent: they are in another session and no longer its children."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(a == "--parent-pid" and b == str(pid) for a, b in itertools.pairwise(cmd)):
            found.append(p)
    return found


class Processes:
    """Long-running processes of one test, each in its own session, logged to files."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start ``args`` (a program in the venv's bin dir) logging to ``LOGS/name.log``."""
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
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

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """Signal ``proc``'s process group and every descendant; wait, bounded.

        Flower's SuperLink and SuperNode start ``flower-superexec`` and app processes in
        sessions of their own, so the process group alone does not reach them; a
        ``flower-superexec`` whose SuperNode already exited is found by its
        ``--parent-pid``.
        """
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        family += orphans_of(proc.pid)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        _, alive = psutil.wait_procs(family, timeout=10)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def stop(self) -> None:
        """Kill every process started here, newest first, and close the logs."""
        for proc, log in reversed(self.procs):
            self.kill(proc)
            log.close()

    def tail(self) -> str:
        """The end of every log, for assertion messages."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.logs.glob("*.log"))
        )


def fedota(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the ``fedota`` CLI in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "fedota.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def wait_for(
    condition: Callable[[], bool], *, timeout_s: float, what: str, logs: Callable[[], str]
) -> None:
    """Poll ``condition`` every half second until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s:.0f}s\n{logs()}")
        time.sleep(0.5)


def http_ready(url: str) -> bool:
    """Whether ``GET url`` answers 200 now."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def golden_loss(base: Path, adapter_dir: Path, texts: list[str], *, budget_mb: int) -> float:
    """The golden-prompt loss of a PEFT adapter on the NF4 base, measured as a device
    measures it (``client.runtime.QuantizedRuntime`` under the device's budget)."""
    from client.runtime import QuantizedRuntime
    from delta_packager.adapter_io import load_adapter
    from protocol import LoraShape

    tensors, config = load_adapter(adapter_dir)
    runtime = QuantizedRuntime(
        base,
        budget_bytes=budget_mb * 2**20,
        adapter_reserve_bytes=sum(int(t.nbytes) for t in tensors.values()),
    )
    spec = LoraShape(
        rank=config.rank, alpha=config.alpha, target_modules=config.target_modules or None
    )
    runtime.set_adapter(tensors, spec)
    return float(runtime.evaluate(texts).loss)
