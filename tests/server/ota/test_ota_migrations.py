"""Alembic migrations: empty database, previous revisions (upgrade and downgrade), and the
unmigrated refusal."""

from __future__ import annotations

import datetime as dt

import pytest
from alembic import command
from sqlalchemy import inspect, text

from server.ota import DatabaseNotMigratedError, create_app, current_revision, make_engine, upgrade
from server.ota.database import alembic_config, head_revision
from server.ota.models import Base


def test_empty_database_upgrades_to_a_schema_matching_the_models(database_url) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
    assert tables == set(Base.metadata.tables)
    for table in Base.metadata.tables.values():
        columns = {c["name"] for c in inspect(engine).get_columns(table.name)}
        assert columns == set(table.columns.keys()), table.name
    upgrade(engine)  # idempotent
    engine.dispose()


def _insert_device_and_target(conn) -> None:  # type: ignore[no-untyped-def]
    now = dt.datetime.now(dt.UTC)
    conn.execute(
        text(
            "INSERT INTO devices (id, token_hash, created_at, base_fingerprint, "
            "installed_version, capabilities, memory_budget_bytes, last_event_seq) "
            "VALUES ('d1', 'h1', :now, 'sha256:x', 4, '{}', 100, 0)"
        ),
        {"now": now},
    )
    conn.execute(
        text("INSERT INTO blobs (sha256, length, created_at) VALUES (:sha, 10, :now)"),
        {"sha": "c" * 64, "now": now},
    )
    conn.execute(
        text("INSERT INTO releases (version, targets_sha256, published_at) VALUES (3, :s, :now)"),
        {"s": "d" * 64, "now": now},
    )
    conn.execute(
        text(
            "INSERT INTO targets (id, release_version, path, url_path, blob_sha256, length, "
            "hashes, kind, from_version, to_version, base_fingerprint, release_counter, "
            "uncompressed_bytes) VALUES (7, 3, 'adapters/5/a.fedota', 'x', :sha, 10, '{}', "
            "'full', NULL, 5, 'sha256:x', 5, 20)"
        ),
        {"sha": "c" * 64},
    )


@pytest.mark.parametrize("previous", ["0001", "0002", "0003"])
def test_previous_revision_database_upgrades_and_keeps_its_rows(database_url, previous) -> None:
    engine = make_engine(database_url)
    upgrade(engine, previous)
    assert "target_bases" not in inspect(engine).get_table_names()
    with engine.begin() as conn:
        _insert_device_and_target(conn)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT installed_version FROM devices")).scalar() == 4
        assert conn.execute(text("SELECT count(*) FROM rollouts")).scalar() == 0
        assert conn.execute(text("SELECT generation FROM ota_state WHERE id = 1")).scalar() == 0
        # 0004 gives every existing bundle its primary base.
        rows = conn.execute(
            text(
                "SELECT target_id, base_fingerprint, release_version, to_version FROM target_bases"
            )
        ).all()
        assert [tuple(r) for r in rows] == [(7, "sha256:x", 3, 5)]
    engine.dispose()


def test_0004_downgrades_to_0003_and_upgrades_again(database_url) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    with engine.begin() as conn:
        _insert_device_and_target(conn)
    assert "ix_target_bases_lookup" in {
        ix["name"] for ix in inspect(engine).get_indexes("target_bases")
    }
    command.downgrade(alembic_config(engine), "0003")
    assert current_revision(engine) == "0003"
    assert "target_bases" not in inspect(engine).get_table_names()
    with engine.connect() as conn:  # the bundles themselves are kept
        assert conn.execute(text("SELECT count(*) FROM targets")).scalar() == 1
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM target_bases")).scalar() == 1
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
