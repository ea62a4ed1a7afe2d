"""A throwaway PostgreSQL cluster for tests (Debian's ``postgresql`` binaries).

Started once per session in a temporary directory on a free loopback port, with trust
authentication; every test gets a fresh database. If the binaries are missing the tests
that need them *fail* with the command that installs them — they are never skipped.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl, or None."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "pg_ctl").exists() and Path(candidate, "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """A running cluster; ``new_database()`` gives each test its own database."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._counter = 0

    def admin_conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def new_database(self) -> str:
        """Create an empty database; returns its SQLAlchemy URL."""
        self._counter += 1
        name = f"fedota_test_{os.getpid()}_{self._counter}"
        with psycopg.connect(self.admin_conninfo(), autocommit=True) as conn:
            # FILE_COPY: copy template1's files instead of WAL-logging every page (PG 15's
            # default), much cheaper for the small databases tests make.
            conn.execute(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


@contextmanager
def running_cluster() -> Iterator[PgCluster]:
    """Start a cluster for the duration of the block.

    Raises:
        RuntimeError: with the install command, if the PostgreSQL binaries are missing.
    """
    bindir = find_pg_bin()
    if bindir is None:
        raise RuntimeError(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; install them with "
            "`apt-get install -y postgresql` (or `make postgres`) and run the tests again"
        )
    workdir = Path(tempfile.mkdtemp(prefix="fedota-pg-"))
    data = workdir / "data"
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run as the postgres user
        user = pwd.getpwnam("postgres")
        os.chown(workdir, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = lambda *args: subprocess.run(  # noqa: E731
        [*prefix, *args], check=True, capture_output=True, text=True
    )
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={workdir} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-w",
        "-l",
        str(workdir / "log"),
        "start",
    )
    try:
        yield PgCluster(port)
    finally:
        # Immediate shutdown, without waiting for the postmaster to finish exiting: the
        # cluster is thrown away, and waiting costs seconds on a busy machine.
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-W", "stop"],
            capture_output=True,
        )
        # Dozens of test databases: delete them in the background rather than wait.
        subprocess.Popen(["rm", "-rf", str(workdir)], start_new_session=True)
