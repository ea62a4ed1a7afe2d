"""Engine, sessions and schema-revision checks for SQLite and PostgreSQL.

The update check, the one hot path, skips the ORM and SQLAlchemy's per-execution work:
its single ``SELECT`` is compiled once for the engine's dialect (:class:`HotRead`) and
run straight on a pooled DBAPI cursor (:meth:`Database.hot_rows`), in autocommit on
PostgreSQL. Everything else goes through sessions.

Write transactions that must see a stable world (telemetry that may pause a rollout,
publishing a release, re-signing metadata) are serialized: on SQLite by ``BEGIN
IMMEDIATE`` (one writer at a time, readers unaffected under WAL), on PostgreSQL by
``SELECT ... FOR UPDATE`` on the rows they decide about (see :mod:`server.ota.rollouts`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, Select, create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from server.ota.errors import DatabaseNotMigratedError, OtaConfigError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_WRITE_OPTION = "fedota_write"


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """Create an engine for ``url`` with the pragmas and pool this service relies on.

    ``pool_size`` connections stay open; as many again may be opened under bursts and
    are closed when returned to a full pool.

    Raises:
        OtaConfigError: if the URL names a database this service does not support.
    """
    if url.startswith("sqlite"):
        if url in ("sqlite://", "sqlite:///:memory:"):
            raise OtaConfigError(
                "in-memory SQLite is not shared between connections; use sqlite:///PATH"
            )
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
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


def _hot_engine(engine: Engine, pool_size: int) -> Engine:
    """The engine the update check reads through.

    PostgreSQL: a pool of its own, in autocommit (no BEGIN/ROLLBACK round trips; a
    single statement sees one committed snapshot), fixed at ``pool_size`` connections —
    the check runs on at most that many threads (see :mod:`server.ota.updates`), so
    connections are never opened and closed per request. SQLite: the main engine (its
    connections leave pysqlite in autocommit, see ``_sqlite_on_connect``, so a single
    ``SELECT`` on a bare cursor is a read transaction of its own).
    """
    if engine.dialect.name != "postgresql":
        return engine
    return create_engine(
        engine.url,
        isolation_level="AUTOCOMMIT",
        pool_size=pool_size,
        max_overflow=0,
        pool_recycle=1800,
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


@dataclass(frozen=True)
class HotRead:
    """A Core ``SELECT`` compiled once for one dialect, to run on a bare DBAPI cursor.

    ``fixed`` holds the values of the statement's literal bound parameters, ``required``
    the names of those the caller must give, ``order`` all names in order for
    positional paramstyles (SQLite's ``?``), None for named ones (psycopg's ``%(x)s``).
    """

    sql: str
    fixed: Mapping[str, Any]
    required: frozenset[str]
    order: tuple[str, ...] | None

    @classmethod
    def compile(cls, statement: Select[Any], engine: Engine) -> HotRead:
        """Compile ``statement`` for ``engine``'s dialect."""
        compiled = statement.compile(dialect=engine.dialect)
        binds = {compiled.bind_names[bind]: bind for bind in compiled.binds.values()}
        return cls(
            sql=compiled.string,
            fixed={name: bind.value for name, bind in binds.items() if not bind.required},
            required=frozenset(name for name, bind in binds.items() if bind.required),
            order=tuple(compiled.positiontup or ()) if compiled.positional else None,
        )

    def parameters(self, values: Mapping[str, Any]) -> dict[str, Any] | tuple[Any, ...]:
        """DBAPI parameters: the fixed values and the caller's ``values``.

        Raises:
            KeyError: a required parameter missing from ``values``.
        """
        missing = self.required.difference(values)
        if missing:
            raise KeyError(f"no value for {', '.join(sorted(missing))} in {self.sql!r}")
        merged = {**self.fixed, **values}
        if self.order is None:
            return merged
        return tuple(merged[name] for name in self.order)


class Database:
    """Sessions for reads and for serialized writes over one engine."""

    def __init__(self, engine: Engine, *, hot_pool_size: int = 4) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self._hot = _hot_engine(engine, hot_pool_size)
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
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

    def compile_hot(self, statement: Select[Any]) -> HotRead:
        """``statement`` compiled for :meth:`hot_rows` on this database."""
        return HotRead.compile(statement, self._hot)

    def hot_rows(self, read: HotRead, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Every row of one compiled read, as plain tuples of DBAPI values.

        No type processing happens: JSON columns arrive parsed from psycopg but as text
        from SQLite, timestamps as text from SQLite. A connection whose statement failed
        in the driver is discarded rather than pooled (it may be broken).
        """
        raw = self._hot.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                cursor.execute(read.sql, read.parameters(values))
                return [tuple(row) for row in cursor.fetchall()]
            finally:
                cursor.close()
        except self._dbapi_error:
            raw.invalidate()
            raise
        finally:
            raw.close()

    def serialize(self, session: Session, key: int) -> None:
        """Take a transaction-scoped lock named ``key`` (PostgreSQL advisory lock; SQLite
        write transactions are serialized already)."""
        if self.is_postgres:
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
        self._hot.dispose()


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
