"""Ranged, resumable downloads (THREATS D15–D17, D19 from the server side)."""

from __future__ import annotations

import hashlib

import pytest

from server.ota.downloads import ByteRange, parse_range
from server.ota.errors import RangeNotSatisfiableError
from tests.server.ota.ota_helpers import Bundle, bundle_bytes, publish

SIZE = 9_001
BUNDLE = Bundle(3, bundle_bytes("download", SIZE))
URL = f"/tuf/targets/adapters/3/{BUNDLE.sha256}.aaaaaaaa-full.fedota"
ETAG = f'"{BUNDLE.sha256}"'


@pytest.fixture
def served(make_client, sqlite_url, tuf_keys):
    client = make_client(sqlite_url, max_concurrent_downloads=2)
    assert publish(client, tuf_keys, 1, [BUNDLE]).status_code == 201
    return client


def test_full_download_has_strong_etag_and_length(served) -> None:
    response = served.get(URL)
    assert response.status_code == 200
    assert response.headers["etag"] == ETAG
    assert response.headers["content-length"] == str(SIZE)
    assert response.headers["accept-ranges"] == "bytes"
    assert hashlib.sha256(response.content).hexdigest() == BUNDLE.sha256


@pytest.mark.parametrize("cut", [0, 1, 4095, 4096, SIZE - 1], ids=lambda c: f"cut-at-{c}")
def test_download_cut_anywhere_resumes_to_the_same_bytes(served, cut) -> None:
    head = BUNDLE.data[:cut]
    rest = served.get(URL, headers={"Range": f"bytes={cut}-", "If-Range": ETAG})
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes {cut}-{SIZE - 1}/{SIZE}"
    assert rest.headers["content-length"] == str(SIZE - cut)
    assert hashlib.sha256(head + rest.content).hexdigest() == BUNDLE.sha256


def test_if_range_with_another_etag_sends_everything(served) -> None:
    response = served.get(URL, headers={"Range": "bytes=100-", "If-Range": '"stale"'})
    assert response.status_code == 200 and response.content == BUNDLE.data


def test_unsatisfiable_range_is_416_with_length(served) -> None:
    response = served.get(URL, headers={"Range": f"bytes={SIZE}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{SIZE}"


def test_unknown_target_is_404(served) -> None:
    assert served.get(URL.replace(BUNDLE.sha256, "0" * 64)).status_code == 404


def test_overload_answers_503_with_retry_after(served) -> None:
    slots = served.app.state.services.slots
    slots.in_use = slots.capacity  # every slot taken by downloads in progress
    response = served.get(URL)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    slots.in_use = 0
    assert served.get(URL).status_code == 200
    assert slots.in_use == 0  # the slot came back after the stream ended


@pytest.mark.parametrize(
    "header, if_range, expected",
    [
        pytest.param(None, None, None, id="no-range"),
        pytest.param("bytes=0-9", None, ByteRange(0, 9, 100), id="first-ten"),
        pytest.param("bytes=90-200", None, ByteRange(90, 99, 100), id="clamped-end"),
        pytest.param("bytes=-10", None, ByteRange(90, 99, 100), id="suffix"),
        pytest.param("bytes=-500", None, ByteRange(0, 99, 100), id="suffix-longer-than-file"),
        pytest.param("bytes=5-2", None, None, id="inverted-ignored"),
        pytest.param("bytes=0-1,5-6", None, None, id="multi-range-ignored"),
        pytest.param("items=0-1", None, None, id="other-unit-ignored"),
        pytest.param("bytes=0-9", '"x"', None, id="if-range-mismatch"),
        pytest.param("bytes=0-9", '"e"', ByteRange(0, 9, 100), id="if-range-match"),
    ],
)
def test_parse_range(header, if_range, expected) -> None:
    assert parse_range(header, if_range, etag='"e"', length=100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=-0", "bytes=1000-2000"])
def test_parse_range_unsatisfiable(header) -> None:
    with pytest.raises(RangeNotSatisfiableError):
        parse_range(header, None, etag='"e"', length=100)
