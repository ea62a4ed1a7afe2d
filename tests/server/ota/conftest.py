"""Fixtures for the OTA server tests: keys, databases (SQLite and PostgreSQL), apps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from server.ota import OtaSettings, create_app, make_engine, upgrade
from tests.server.ota.ota_helpers import ENROLLMENT_SECRET, ROLE_KEYS, TufKeys
from tests.server.ota.pg_cluster import PgCluster, running_cluster


@pytest.fixture(scope="session")
def tuf_keys() -> TufKeys:
    return TufKeys()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    try:
        with running_cluster() as cluster:
            yield cluster
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ota.db'}"
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ota.db'}"


@pytest.fixture
def make_settings(tuf_keys: TufKeys, tmp_path: Path) -> Callable[..., OtaSettings]:
    paths = tuf_keys.write(tmp_path / "keys")

    def build(database_url: str, **overrides: object) -> OtaSettings:
        values: dict[str, object] = {
            "database_url": database_url,
            "storage_dir": tmp_path / "storage",
            "trusted_root": paths["root"],
            "snapshot_key": paths["snapshot"],
            "timestamp_key": paths["timestamp"],
            "enrollment_secret": SecretStr(ENROLLMENT_SECRET),
            **{f"{role}_key": SecretStr(key) for role, key in ROLE_KEYS.items()},
        }
        values.update(overrides)
        return OtaSettings(**values)  # type: ignore[arg-type]

    return build


@pytest.fixture
def make_client(make_settings: Callable[..., OtaSettings]) -> Iterator[Callable[..., TestClient]]:
    """Build a migrated server on a database URL and return a TestClient for it."""
    clients: list[TestClient] = []

    def build(database_url: str, **overrides: object) -> TestClient:
        engine = make_engine(database_url)
        upgrade(engine)
        engine.dispose()
        client = TestClient(create_app(make_settings(database_url, **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient], database_url: str) -> TestClient:
    """A server on each database kind."""
    return make_client(database_url)
