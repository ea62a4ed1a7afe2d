"""Ray's processes die with the ``fedota simulate`` that started them (Linux).

``ray.init`` starts a private Ray instance as children of the driver: the GCS server,
the raylet, the dashboard and log monitors, and, started by the raylet, its dashboard
and runtime-env agents and the workers that host Flower's ClientApp actors. Ray makes
its direct children die with the driver (``PR_SET_PDEATHSIG``), but the raylet's own
children only notice that the raylet is gone, then try to report it to the (dead) GCS
and linger for a minute or more; a SIGKILLed driver leaves them orphaned.

The guard here does not depend on how Ray's processes find out. The driver starts Ray
in a temporary directory of its own (``ray.init(_temp_dir=...)``) and, first, a small
watchdog in a session of its own (so Ctrl-C or a kill of the driver's process group
does not reach it). The watchdog holds the read end of a pipe whose write end only the
driver has: when the driver exits, however it exits (SIGKILL included), the kernel
closes that end and the watchdog reads end-of-file. It then kills every process that is
a Ray process (its command line names ``ray::...`` or Ray's package directory) *and*
is tied to that directory (names it on its command line or holds a file open in it,
as every Ray process does with its logs), and removes the directory. Ray clusters of
other runs, tests or users live in other directories, so they are never touched.

Invariants: after :func:`ray_process_guard` returns, and within seconds of the driver's
death, no process of the guarded Ray instance is left; nothing outside it is killed.
Linux only (it reads ``/proc``); elsewhere the guard does nothing and Ray's own
clean-up applies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["find_ray_processes", "ray_process_guard", "reap"]

logger = logging.getLogger(__name__)
_PROC = Path("/proc")
_POLL_S = 1.0  # how often the watchdog also checks the driver by pid
_REAP_DEADLINE_S = 30.0
_WATCHDOG_EXIT_S = 60.0


def _supported() -> bool:
    return sys.platform.startswith("linux") and _PROC.is_dir()


@contextlib.contextmanager
def ray_process_guard() -> Iterator[Path | None]:
    """A temporary directory for a private Ray instance, reaped when the driver exits.

    Yields:
        The directory to pass as ``ray.init(_temp_dir=...)`` (short, under
        ``$RAY_TMPDIR`` or ``/tmp``: Ray's socket paths must stay under the Unix
        limit), or ``None`` where the guard is not supported.

    On leaving the block the watchdog reaps what Ray left behind and removes the
    directory; if this process dies first, the watchdog does it then.
    """
    if not _supported():
        yield None
        return
    root = os.environ.get("RAY_TMPDIR") or "/tmp"
    temp_dir = Path(tempfile.mkdtemp(prefix="fedota-ray-", dir=root))
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-m", "simulation.ray_reaper", str(os.getpid()), str(temp_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    try:
        yield temp_dir
    finally:
        assert watchdog.stdin is not None
        watchdog.stdin.close()  # end-of-file: the watchdog reaps and removes temp_dir
        try:
            watchdog.wait(timeout=_WATCHDOG_EXIT_S)
        except subprocess.TimeoutExpired:
            logger.warning("the Ray clean-up of %s did not finish; it goes on", temp_dir)


def _cmdline(pid: int) -> str:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _is_ray(cmdline: str) -> bool:
    # Workers and agents rename themselves ``ray::ClientAppActor``, ``ray::IDLE``,
    # ``ray::DashboardAgent``; the others run a program from Ray's package directory
    # (``.../ray/core/src/ray/raylet/raylet``, ``.../ray/dashboard/dashboard.py``).
    return cmdline.startswith("ray::") or f"{os.sep}ray{os.sep}" in cmdline


def _uses(pid: int, cmdline: str, roots: tuple[str, ...]) -> bool:
    if any(root in cmdline for root in roots):
        return True
    fd_dir = _PROC / str(pid) / "fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if any(target.startswith(root + os.sep) for root in roots):
            return True
    return False


def find_ray_processes(temp_dir: Path, *, spare: frozenset[int] = frozenset()) -> list[int]:
    """Pids of the Ray processes tied to ``temp_dir``, except ``spare`` and this one.

    A process qualifies only if it is a Ray process *and* names ``temp_dir`` on its
    command line or holds a file open under it.
    """
    roots = tuple({str(temp_dir), os.path.realpath(temp_dir)})
    found = []
    for entry in os.listdir(_PROC):
        if not entry.isdigit() or int(entry) in spare or int(entry) == os.getpid():
            continue
        cmdline = _cmdline(int(entry))
        if cmdline and _is_ray(cmdline) and _uses(int(entry), cmdline, roots):
            found.append(int(entry))
    return found


def reap(temp_dir: Path, *, spare: frozenset[int] = frozenset()) -> list[int]:
    """SIGKILL every Ray process tied to ``temp_dir`` until none is left (bounded).

    Scans again after each round of kills: a raylet may have started a worker between
    a scan and its death. Dead processes drop their files and command line, so the
    scans converge.

    Returns:
        The pids killed.
    """
    killed: list[int] = []
    deadline = time.monotonic() + _REAP_DEADLINE_S
    while time.monotonic() < deadline:
        pids = find_ray_processes(temp_dir, spare=spare)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.2)
    return killed


def _start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/PID/stat`` (a pid's start time), ``None`` if it is gone or a
    zombie. Guards against the pid being reused by another process."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and ")"
    return None if fields[0] in ("Z", "X") else fields[19]


def _wait_for_driver(pid: int) -> None:
    """Block until the pipe from the driver closes or the driver is gone."""
    started = _start_time(pid)
    stdin = sys.stdin.fileno()
    while started is not None:
        ready, _, _ = select.select([stdin], [], [], _POLL_S)
        if ready and not os.read(stdin, 4096):
            return
        if _start_time(pid) != started:
            return


def main(argv: list[str]) -> int:
    """The watchdog: ``python -m simulation.ray_reaper DRIVER_PID TEMP_DIR``."""
    driver, temp_dir = int(argv[0]), Path(argv[1])
    _wait_for_driver(driver)
    reap(temp_dir, spare=frozenset({driver}))
    shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # outlive a Ctrl-C of the terminal
    sys.exit(main(sys.argv[1:]))
