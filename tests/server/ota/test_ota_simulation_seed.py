"""``simulation_seed``: a simulation's device ids and rollout salts are reproducible.

``fedota simulate`` starts its server with the run's seed, so the same phones land in the
same rollout stages on every run of a seed; without it (production) both are random.
"""

from __future__ import annotations

from pathlib import Path

from server.ota.models import RolloutRow
from tests.server.ota.ota_helpers import Bundle, bundle_bytes, create_rollout, enroll, publish

V1 = Bundle(1, bundle_bytes("r1"))


def _fleet(make_client, tuf_keys, db: Path, seed: int | None) -> tuple[list[str], str]:
    """Device ids of a fresh server's first five enrollments and its first rollout's salt."""
    client = make_client(f"sqlite:///{db}", simulation_seed=seed)
    ids = [enroll(client, installed=None).id for _ in range(5)]
    assert publish(client, tuf_keys, 1, [V1]).status_code == 201
    rollout = create_rollout(client, 1, [50, 100])
    with client.app.state.services.db.read() as session:
        salt = session.get(RolloutRow, rollout["id"]).salt
    return ids, salt


def test_the_same_seed_gives_the_same_ids_and_salts(make_client, tuf_keys, tmp_path) -> None:
    first = _fleet(make_client, tuf_keys, tmp_path / "a.db", seed=7)
    again = _fleet(make_client, tuf_keys, tmp_path / "b.db", seed=7)
    other = _fleet(make_client, tuf_keys, tmp_path / "c.db", seed=8)
    assert first == again
    assert len(set(first[0])) == 5  # unique within a server
    assert set(first[0]).isdisjoint(other[0]) and first[1] != other[1]


def test_without_a_seed_ids_and_salts_are_random(make_client, tuf_keys, tmp_path) -> None:
    a = _fleet(make_client, tuf_keys, tmp_path / "a.db", seed=None)
    b = _fleet(make_client, tuf_keys, tmp_path / "b.db", seed=None)
    assert set(a[0]).isdisjoint(b[0]) and a[1] != b[1]
