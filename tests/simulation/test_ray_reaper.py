"""The watchdog that makes a private Ray instance die with its driver
(``simulation.ray_reaper``), without Ray: stand-in processes that look like Ray's to it.

A stand-in is a real ``sleep`` renamed ``ray::...`` (``exec -a``, as Ray's workers and
agents rename themselves) holding a file open in a directory, as Ray's processes hold
their logs. The slow test with a real Ray instance is test_ray_orphans.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from simulation.ray_reaper import find_ray_processes, ray_process_guard, reap

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the reaper reads /proc (Linux)"
)
REPO = Path(__file__).resolve().parents[2]


def stand_in(name: str, open_in: Path) -> subprocess.Popen[bytes]:
    """A ``sleep`` whose command line reads ``name`` and that holds ``open_in/log`` open,
    in a session of its own (a kill of its parent's group does not reach it)."""
    open_in.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        ["bash", "-c", 'exec 3>>"$1/log"; exec -a "$0" sleep 600', name, str(open_in)],
        start_new_session=True,
    )


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if not gone(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def until_ready(procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait (bounded) until each stand-in runs under its new name with its file open."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = [psutil.Process(p.pid).cmdline()[:1] for p in procs]
        if all(n and n[0] != "bash" for n in names) and all(
            psutil.Process(p.pid).open_files() for p in procs
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"stand-ins not ready: {names}")


def test_reap_kills_the_ray_processes_of_its_directory_and_nothing_else(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    ours, other_run = tmp_path / "ours", tmp_path / "other-run"
    ray_of_ours = stand_in("ray::DashboardAgent", ours)
    ray_of_another_run = stand_in("ray::DashboardAgent", other_run)
    not_ray_reading_our_logs = stand_in("tail", ours)
    started += [ray_of_ours, ray_of_another_run, not_ray_reading_our_logs]
    until_ready(started)

    assert find_ray_processes(ours) == [ray_of_ours.pid]
    assert reap(ours) == [ray_of_ours.pid]
    assert ray_of_ours.wait(timeout=10) == -signal.SIGKILL
    assert ray_of_another_run.poll() is None and not_ray_reading_our_logs.poll() is None
    assert find_ray_processes(ours) == []


def test_guard_reaps_what_ray_left_when_the_block_ends(
    started: list[subprocess.Popen[bytes]],
) -> None:
    with ray_process_guard() as temp_dir:
        assert temp_dir is not None and temp_dir.is_dir()
        leftover = stand_in("ray::RuntimeEnvAgent", temp_dir)
        started.append(leftover)
        until_ready([leftover])
    assert leftover.wait(timeout=10) == -signal.SIGKILL
    assert not temp_dir.exists()


_DRIVER = """
import subprocess, sys, time
from simulation.ray_reaper import ray_process_guard
with ray_process_guard() as d:
    agent = subprocess.Popen(
        ["bash", "-c", 'exec 3>>"$1/log"; exec -a "$0" sleep 600', "ray::DashboardAgent", d],
        start_new_session=True,
    )
    print(agent.pid, d, flush=True)
    time.sleep(600)
"""


def test_guard_reaps_ray_processes_when_the_driver_is_sigkilled() -> None:
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert driver.stdout is not None
    pid_text, temp_dir = driver.stdout.readline().split()
    agent = int(pid_text)
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(agent).open_files() and time.monotonic() < deadline:
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        # The watchdog notices at once; the bound only keeps a broken fix from hanging.
        assert wait_until_gone([agent], timeout_s=30) == []
        deadline = time.monotonic() + 30  # then it removes the directory
        while Path(temp_dir).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(temp_dir).exists()
    finally:
        if not gone(agent):
            os.kill(agent, signal.SIGKILL)
