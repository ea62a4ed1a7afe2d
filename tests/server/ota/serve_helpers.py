"""``fedota serve`` as a subprocess, and which of its workers holds a connection."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from server.ota import wait_until_ready

REPO = Path(__file__).resolve().parents[3]


@contextmanager
def fedota_serve(
    env: dict[str, str], port: int, tmp: Path, *, workers: int
) -> Iterator[subprocess.Popen[bytes]]:
    """``fedota serve --workers N --migrate`` on loopback with the keys under ``tmp/keys``
    (as ``TufKeys.write`` lays them out); the whole process group stops on exit."""
    keys = tmp / "keys"
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "fedota.cli", "serve",
            "--database-url", env["FEDOTA_OTA_DATABASE_URL"],
            "--storage", str(tmp / "storage"),
            "--trusted-root", str(keys / "root.json"),
            "--snapshot-key", str(keys / "snapshot.pem"),
            "--timestamp-key", str(keys / "timestamp.pem"),
            "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--migrate", "--text-logs",
        ],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        if not wait_until_ready(url, timeout_s=60, alive=lambda: proc.poll() is None):
            raise AssertionError(f"fedota serve did not start:\n{log_tail(tmp)}")
        yield proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (uvicorn's supervisor stops its workers), SIGKILL the group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def log_tail(tmp: Path) -> str:
    return (tmp / "serve.log").read_text(errors="replace")[-3000:]


def worker_of(server: subprocess.Popen[bytes], port: int, response: httpx.Response) -> int:
    """The pid of the worker process that holds the connection ``response`` came on."""
    client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    for worker in psutil.Process(server.pid).children(recursive=True):
        for conn in worker.net_connections(kind="tcp"):
            local, remote = conn.laddr, conn.raddr
            if local and remote and local.port == port and remote.port == client_port:
                return worker.pid
    raise AssertionError("no worker process holds the connection")
