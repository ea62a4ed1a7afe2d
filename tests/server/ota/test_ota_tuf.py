"""The /tuf/ repository, verified by python-tuf's own client (THREATS B9, B10, F28)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import FetcherInterface, Updater

from tests.server.ota.ota_helpers import (
    Bundle,
    TufKeys,
    auth,
    bundle_bytes,
    check,
    create_rollout,
    enroll,
    publish,
)

V1 = Bundle(1, bundle_bytes("one", 5000))
V2 = Bundle(2, bundle_bytes("two", 7000))


class AppFetcher(FetcherInterface):
    """ngclient fetcher that talks to the app in-process."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.urls: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.urls.append(url)
        response = self.client.get(url.removeprefix("http://ota"))
        if response.status_code != 200:
            raise DownloadHTTPError(response.text, response.status_code)
        return iter([response.content])


def _updater(client: TestClient, keys: TufKeys, tmp: Path, fetcher: AppFetcher) -> Updater:
    (tmp / "meta").mkdir(exist_ok=True)
    (tmp / "dl").mkdir(exist_ok=True)
    return Updater(
        metadata_dir=str(tmp / "meta"),
        metadata_base_url="http://ota/tuf/",
        target_base_url="http://ota/tuf/targets/",
        target_dir=str(tmp / "dl"),
        fetcher=fetcher,
        bootstrap=keys.root_metadata().to_bytes(),
    )


def test_ngclient_verifies_and_downloads_a_release(client, tuf_keys, tmp_path) -> None:
    assert publish(client, tuf_keys, 1, [V1]).status_code == 201
    fetcher = AppFetcher(client)
    updater = _updater(client, tuf_keys, tmp_path, fetcher)
    updater.refresh()
    info = updater.get_targetinfo(V1.path)
    assert info is not None
    path = updater.download_target(info)
    assert Path(path).read_bytes() == V1.data
    # consistent snapshots: versioned metadata and hash-prefixed target URLs
    assert "http://ota/tuf/1.snapshot.json" in fetcher.urls
    assert "http://ota/tuf/1.targets.json" in fetcher.urls
    assert any(u.endswith(f"/{V1.sha256}.aaaaaaaa-full.fedota") for u in fetcher.urls)


def test_publish_during_download_keeps_every_pair_consistent(client, tuf_keys, tmp_path) -> None:
    # F28: a device that began with release N finishes with N's metadata and bytes.
    assert publish(client, tuf_keys, 1, [V1]).status_code == 201
    create_rollout(client, 1, [100])
    device = enroll(client)
    offer = check(client, device, None)
    first_half = client.get(offer["url"], headers={"Range": f"bytes=0-{offer['length'] // 2}"})
    assert first_half.status_code == 206
    assert publish(client, tuf_keys, 2, [V1, V2]).status_code == 201
    rest = client.get(
        offer["url"],
        headers={
            "Range": f"bytes={offer['length'] // 2 + 1}-",
            "If-Range": first_half.headers["ETag"],
        },
    )
    assert rest.status_code == 206
    assert first_half.content + rest.content == V1.data
    old = client.get("/tuf/1.targets.json").json()["signed"]["targets"]
    assert old[V1.path]["hashes"]["sha256"] == V1.sha256
    # and a fresh client sees release 2 whole: timestamp -> snapshot 2 -> targets 2
    updater = _updater(client, tuf_keys, tmp_path, AppFetcher(client))
    updater.refresh()
    info = updater.get_targetinfo(V2.path)
    assert info is not None and Path(updater.download_target(info)).read_bytes() == V2.data


def test_timestamp_is_resigned_before_it_expires(make_client, sqlite_url, tuf_keys) -> None:
    # B9 is the client's job; the server's job is to never serve a stale timestamp.
    client = make_client(sqlite_url, timestamp_expiry_s=600)
    assert publish(client, tuf_keys, 1, [V1]).status_code == 201
    repo = client.app.state.services.repo
    first = client.get("/tuf/timestamp.json").json()["signed"]
    assert first["version"] == 1
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=400)  # < half the lifetime left
    assert repo.refresh(later) is True
    assert repo.refresh(later) is False  # nothing repeated
    second = Metadata.from_bytes(repo.get("timestamp")).signed
    assert second.version == 2 and second.expires > later + dt.timedelta(seconds=500)


def test_timestamp_served_near_expiry_is_refreshed_on_demand(
    make_client, sqlite_url, tuf_keys
) -> None:
    client = make_client(sqlite_url, timestamp_expiry_s=60, refresh_interval_s=3600)
    assert publish(client, tuf_keys, 1, [V1]).status_code == 201
    repo = client.app.state.services.repo
    assert repo.refresh(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=45)) is True
    served = client.get("/tuf/timestamp.json").json()["signed"]
    assert served["version"] >= 2


def _rotated_root(keys: TufKeys, new_root_key: CryptoSigner, *, sign_old: bool) -> bytes:
    md = keys.root_metadata(version=1)
    root: Root = md.signed
    root.version = 2
    root.revoke_key(keys.root.public_key.keyid, "root")
    root.add_key(new_root_key.public_key, "root")
    md.signatures.clear()
    md.sign(new_root_key, append=True)
    if sign_old:
        md.sign(keys.root, append=True)
    return md.to_bytes()


@pytest.mark.parametrize(
    "sign_old, accepted", [(True, True), (False, False)], ids=["signed-by-old-and-new", "new-only"]
)
def test_root_rotation_needs_old_and_new_thresholds(client, tuf_keys, sign_old, accepted) -> None:
    # B10: key rotation.
    new_key = CryptoSigner.generate_ed25519()
    response = client.post(
        "/v1/tuf/root",
        content=_rotated_root(tuf_keys, new_key, sign_old=sign_old),
        headers={**auth("admin"), "Content-Type": "application/json"},
    )
    assert (response.status_code == 201) is accepted, response.text
    assert (client.get("/tuf/2.root.json").status_code == 200) is accepted
