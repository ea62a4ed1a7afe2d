"""Alembic migrations: empty database, previous revision, and the unmigrated refusal."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import inspect, text

from server.ota.app import create_app
from server.ota.database import current_revision, head_revision, make_engine, upgrade
from server.ota.errors import DatabaseNotMigratedError
from server.ota.models import Base


def test_empty_database_upgrades_to_a_schema_matching_the_models(database_url) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    assert current_revision(engine) == head_revision() == "0003"
    tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
    assert tables == set(Base.metadata.tables)
    for table in Base.metadata.tables.values():
        columns = {c["name"] for c in inspect(engine).get_columns(table.name)}
        assert columns == set(table.columns.keys()), table.name
    upgrade(engine)  # idempotent
    engine.dispose()


@pytest.mark.parametrize("previous", ["0001", "0002"])
def test_previous_revision_database_upgrades_and_keeps_its_rows(database_url, previous) -> None:
    engine = make_engine(database_url)
    upgrade(engine, previous)
    assert "ota_state" not in inspect(engine).get_table_names()
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO devices (id, token_hash, created_at, base_fingerprint, "
                "installed_version, capabilities, memory_budget_bytes, last_event_seq) "
                "VALUES ('d1', 'h1', :now, 'sha256:x', 4, '{}', 100, 0)"
            ),
            {"now": now},
        )
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT installed_version FROM devices")).scalar() == 4
        assert conn.execute(text("SELECT count(*) FROM rollouts")).scalar() == 0
        assert conn.execute(text("SELECT generation FROM ota_state WHERE id = 1")).scalar() == 0
    engine.dispose()


@pytest.mark.parametrize("revision", [None, "0002"], ids=["empty", "previous"])
def test_app_refuses_to_start_on_an_unmigrated_database(
    make_settings, database_url, revision
) -> None:
    if revision:
        engine = make_engine(database_url)
        upgrade(engine, revision)
        engine.dispose()
    with pytest.raises(DatabaseNotMigratedError, match="fedota db upgrade --database-url"):
        create_app(make_settings(database_url))
