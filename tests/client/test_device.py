"""``client.Device.enroll`` refuses bad local input with a ``ClientError`` before it asks
the server for a device token (docs/sdk.md, "Failures"): a missing or malformed root,
base or golden-prompts file never leaves a device enrolled on the server but unusable
here, and never surfaces as a bare ``OSError`` or a packager error."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import ClientError, ClientInputError, Device
from client.update import DeviceStateError, api
from delta_packager.trust import init_keys

# name -> (files to write: name -> bytes or None for "missing", expected error, message)
CASES = {
    "missing-root": (
        {"root.json": None},
        DeviceStateError,
        "cannot read the trusted root",
    ),
    "root-not-json": ({"root.json": b"{"}, DeviceStateError, "is not a valid TUF root.json"),
    "base-not-gguf": (
        {"base.gguf": b"not a gguf file"},
        ClientInputError,
        "is not a GGUF file",
    ),
    "missing-golden": (
        {"golden.json": None},
        DeviceStateError,
        "cannot read the golden prompts",
    ),
    "golden-not-a-list": (
        {"golden.json": b'{"prompt": "hey"}'},
        DeviceStateError,
        "must be a non-empty JSON list of strings",
    ),
}


@pytest.mark.parametrize(("files", "error", "message"), CASES.values(), ids=CASES.keys())
def test_enroll_refuses_bad_local_input_before_contacting_the_server(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    files: dict[str, bytes | None],
    error: type[ClientError],
    message: str,
) -> None:
    init_keys(tmp_path / "keys")
    given = {
        "root.json": (tmp_path / "keys" / "1.root.json").read_bytes(),
        "base.gguf": b"GGUF" + bytes(60),
        "golden.json": b'["hey ana"]',
        **files,
    }
    for name, data in given.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)

    def server_asked(*args: object, **kwargs: object) -> tuple[str, str]:
        raise AssertionError("enroll contacted the server before checking its input")

    monkeypatch.setattr(api, "enroll", server_asked)
    state = tmp_path / "state"
    with pytest.raises(error, match=message):
        Device.enroll(
            state,
            server="http://127.0.0.1:9",
            root=tmp_path / "root.json",
            base=tmp_path / "base.gguf",
            enrollment_secret="secret",
            golden=tmp_path / "golden.json",
        )
    assert not (state / "device.json").exists()
