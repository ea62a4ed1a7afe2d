"""Engine, sessions and schema-revision checks for SQLite and PostgreSQL.

Write transactions that must see a stable world (telemetry that may pause a rollout,
publishing a release, re-signing metadata) are serialized: on SQLite by ``BEGIN
IMMEDIATE`` (one writer at a time, readers unaffected under WAL), on PostgreSQL by
``SELECT ... FOR UPDATE`` on the rows they decide about (see :mod:`server.ota.rollouts`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from server.ota.errors import DatabaseNotMigratedError, OtaConfigError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_WRITE_OPTION = "fedota_write"


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """Create an engine for ``url`` with the pragmas and pool this service relies on.

    Raises:
        OtaConfigError: if the URL names a database this service does not support.
    """
    if url.startswith("sqlite"):
        if url in ("sqlite://", "sqlite:///:memory:"):
            raise OtaConfigError(
                "in-memory SQLite is not shared between connections; use sqlite:///PATH"
            )
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if url.startswith("postgresql"):
        # No pre-ping (it doubles round trips on the hot path); stale connections are
        # recycled instead, and a failed request is retried by the device.
        return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800)
    raise OtaConfigError(
        f"unsupported database URL {url.split(':', 1)[0]!r}: use sqlite or postgresql"
    )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control away from pysqlite so that we can emit BEGIN IMMEDIATE
    # (SQLAlchemy docs, "Serializable isolation / Savepoints / Transactional DDL").
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """Sessions for reads and for serialized writes over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self._read = sessionmaker(bind=engine, expire_on_commit=False)
        self._write = sessionmaker(
            bind=engine.execution_options(**{_WRITE_OPTION: True}), expire_on_commit=False
        )

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads (and writes that need no serialization); commits on exit."""
        with self._read.begin() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A serialized write transaction; commits on success, rolls back on error."""
        with self._write.begin() as session:
            yield session

    def snapshot_reads(self) -> Connection:
        """A connection for a few independent reads on the hot path.

        On PostgreSQL it runs in autocommit (no BEGIN/ROLLBACK round trips; each
        statement sees its own committed snapshot). On SQLite it is an ordinary
        connection (a deferred transaction costs nothing there).
        """
        conn = self.engine.connect()
        if self.is_postgres:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn

    def serialize(self, session: Session, key: int) -> None:
        """Take a transaction-scoped lock named ``key`` (PostgreSQL advisory lock; SQLite
        write transactions are serialized already)."""
        if self.is_postgres:
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic config pointing at the migrations shipped inside this package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    """The newest revision of the shipped migrations."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(engine), revision)
    logger.info("database upgraded to %s", current_revision(engine))


def require_migrated(engine: Engine, url_for_message: str) -> None:
    """Refuse to go on unless the schema is at the head revision.

    Raises:
        DatabaseNotMigratedError: naming the revision found and the command to run.
    """
    found, expected = current_revision(engine), head_revision()
    if found != expected:
        raise DatabaseNotMigratedError(
            f"database is at revision {found or 'none (empty)'}, this server needs {expected}; "
            f"run `fedota db upgrade --database-url {url_for_message}` "
            "or start with `fedota serve --migrate`"
        )
