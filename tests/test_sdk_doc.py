"""``docs/sdk.md``'s program runs exactly as written, on a torch-free device install.

The first ```python block after the ``sdk-example`` marker is saved as ``app.py`` and
run by the interpreter of a fresh ``pip install 'fedota[device]'`` virtualenv
(``device_venv``), from a directory holding what the document says to provide
(``root.json``, ``base.gguf``, ``golden.json``; ``FEDOTA_SERVER`` and
``FEDOTA_ENROLLMENT_SECRET`` set), against a real ``fedota serve`` with a release that
names the GGUF base (``released_micro_server``). A program that no longer enrolls,
updates or generates text fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from client import Device
from tests.ota_server_helpers import ReleasedServer
from tests.repo_helpers import REPO

pytestmark = pytest.mark.slow
SDK_DOC = REPO / "docs" / "sdk.md"
MARKER = "<!-- sdk-example"


def sdk_example() -> str:
    """The first python code block after the ``sdk-example`` marker of docs/sdk.md."""
    text = SDK_DOC.read_text()
    start = text.index(MARKER)
    block = re.search(r"^```python\n(.*?)^```$", text[start:], flags=re.M | re.S)
    assert block is not None, f"no ```python block after {MARKER!r} in {SDK_DOC}"
    return block.group(1)


def test_sdk_example_enrolls_updates_and_generates_on_a_device_install(
    device_venv: Path, released_micro_server: ReleasedServer, micro_gguf: Path, tmp_path: Path
) -> None:
    server = released_micro_server
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text(sdk_example())
    shutil.copyfile(server.root, app / "root.json")
    shutil.copyfile(server.golden, app / "golden.json")
    shutil.copyfile(micro_gguf, app / "base.gguf")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"FEDOTA_SERVER": server.url, "FEDOTA_ENROLLMENT_SECRET": server.enrollment_secret}

    def run_app() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(device_venv / "python"), "app.py"],
            cwd=app,  # outside the checkout: only the device install is importable
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = run_app()
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    outcome, generated = first.stdout.split("\n", 1)
    assert outcome == f"update: updated, adapter version {server.version}"
    assert generated.strip(), f"no text generated: {first.stdout!r}"

    status = Device(app / "device-state").status()
    assert status["runtime"] == "llamacpp"
    assert status["base_fingerprint"] == server.gguf_fingerprint
    assert status["active_version"] == server.version == status["release_floor"]

    again = run_app()  # a later start reuses the enrolled state directory
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert again.stdout.startswith(f"update: no_update, adapter version {server.version}\n")
    assert again.stdout.split("\n", 1)[1] == generated  # greedy: the same text again
