"""The keys and targets metadata the packager writes, read by the reference TUF client.

An in-memory repository (a fake of the OTA server's ``/tuf/`` routes) serves the files;
snapshot and timestamp are made here with the online keys, as the server would, using
``load_signer``. ``tuf.ngclient.Updater`` then refreshes, walks root rotations and
downloads a bundle, which ``check_bundle_target`` and ``apply_bundle`` accept.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.exceptions import DownloadHTTPError, RepositoryError
from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from delta_packager import apply_bundle
from delta_packager.trust import (
    check_bundle_target,
    init_keys,
    load_signer,
    load_targets,
    release,
    rotate_keys,
)
from tests.delta_packager.packager_helpers import FP_X, make_bundle_bytes


class MemoryFetcher(FetcherInterface):
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url not in self.files:
            raise DownloadHTTPError(f"404 {url}", 404)
        yield self.files[url]


def publish(keys: Path, fetcher: MemoryFetcher, bundles: list[Path], *, version: int) -> None:
    """What the OTA server does with the release: serve it, add snapshot and timestamp."""
    for root in keys.glob("*.root.json"):
        fetcher.files[f"https://ota/tuf/metadata/{root.name}"] = root.read_bytes()
    targets = load_targets(keys)
    n = targets.signed.version
    fetcher.files[f"https://ota/tuf/metadata/{n}.targets.json"] = (
        keys / "metadata/targets.json"
    ).read_bytes()
    for path in bundles:
        info = targets.signed.targets[f"adapters/{_to_version(path)}/{path.name}"]
        url = f"https://ota/tuf/targets/adapters/{_to_version(path)}/{info.hashes['sha256']}.{path.name}"
        fetcher.files[url] = path.read_bytes()
    expires = datetime.now(UTC) + timedelta(days=1)
    snapshot = Metadata(
        Snapshot(version=version, expires=expires, meta={"targets.json": MetaFile(n)})
    )
    snapshot.sign(load_signer(keys / "private/snapshot.pem"))
    fetcher.files[f"https://ota/tuf/metadata/{version}.snapshot.json"] = snapshot.to_bytes()
    timestamp = Metadata(
        Timestamp(version=version, expires=expires, snapshot_meta=MetaFile(version))
    )
    timestamp.sign(load_signer(keys / "private/timestamp.pem"))
    fetcher.files["https://ota/tuf/metadata/timestamp.json"] = timestamp.to_bytes()


def _to_version(path: Path) -> int:
    return int(path.stem.rsplit("-v", 1)[1])


def updater(tmp_path: Path, fetcher: MemoryFetcher, bootstrap: bytes, name: str) -> Updater:
    (tmp_path / name).mkdir()
    return Updater(
        metadata_dir=str(tmp_path / name),
        metadata_base_url="https://ota/tuf/metadata/",
        target_base_url="https://ota/tuf/targets/",
        target_dir=str(tmp_path / name),
        fetcher=fetcher,
        bootstrap=bootstrap,
    )


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, MemoryFetcher, list[Path]]:
    keys = tmp_path / "keys"
    init_keys(keys)
    bundles = []
    for v in (1, 2):
        path = tmp_path / f"adapter-v{v}"
        path.write_bytes(make_bundle_bytes(seed=9, versions=v))
        bundles.append(path)
    release(bundles, keys)
    fetcher = MemoryFetcher()
    publish(keys, fetcher, bundles, version=1)
    return keys, fetcher, bundles


def test_reference_client_verifies_downloads_and_applies(
    tmp_path: Path, repo: tuple[Path, MemoryFetcher, list[Path]]
) -> None:
    keys, fetcher, bundles = repo
    client = updater(tmp_path, fetcher, (keys / "1.root.json").read_bytes(), "device")
    client.refresh()
    state = None
    for path in bundles:
        info = client.get_targetinfo(f"adapters/{_to_version(path)}/{path.name}")
        assert info is not None and info.custom["fedota"]["base_fingerprint"] == FP_X
        local = client.download_target(info)
        bundle = check_bundle_target(Path(local).read_bytes(), info)
        state = apply_bundle(state, bundle, base_fingerprint=FP_X)
    assert state is not None and (state.version, state.release_counter) == (2, 2)


def test_reference_client_follows_a_root_rotation_and_refuses_revoked_targets_key(
    tmp_path: Path, repo: tuple[Path, MemoryFetcher, list[Path]]
) -> None:
    keys, fetcher, bundles = repo
    bootstrap = (keys / "1.root.json").read_bytes()
    revoked = load_signer(keys / "private/targets.pem")
    rotate_keys(keys, "root")
    rotate_keys(keys, "targets")
    publish(keys, fetcher, bundles, version=2)
    client = updater(tmp_path, fetcher, bootstrap, "rotated")
    client.refresh()  # walks 1.root.json -> 2 -> 3, trusts the new targets key
    assert client.get_targetinfo(f"adapters/2/{bundles[1].name}") is not None
    # A targets file signed only by the revoked key is refused by a fresh client.
    forged = load_targets(keys)
    forged.signed.version += 1
    forged.sign(revoked)
    fetcher.files[f"https://ota/tuf/metadata/{forged.signed.version}.targets.json"] = (
        forged.to_bytes()
    )
    (keys / "metadata/targets.json").write_bytes(forged.to_bytes())
    publish(keys, fetcher, [], version=3)
    with pytest.raises(RepositoryError):
        updater(tmp_path, fetcher, bootstrap, "victim").refresh()
