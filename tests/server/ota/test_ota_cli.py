"""``fedota serve|db|publish|rollout`` through the real entry point, with the release
pipeline's own KEYS directory (``delta_packager.trust.init_keys``) as configuration."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from fedota.cli import main
from server.ota.database import head_revision
from server.ota.tuf_repo import load_signer
from tests.server.ota.ota_helpers import (
    ROLE_KEYS,
    Bundle,
    bundle_bytes,
    free_port,
    server_process,
    settings_env,
    sign_targets,
)

pytestmark = pytest.mark.slow


def _fedota(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``fedota`` in-process (fast) with exit code, stdout and stderr as a subprocess
    would see them; ``main()`` is the console-script entry point itself."""
    saved_env, saved_argv = dict(os.environ), sys.argv
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    os.environ.clear()
    os.environ.update(env or saved_env)
    sys.argv = ["fedota", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
    return subprocess.CompletedProcess(args, int(code or 0), out.getvalue(), err.getvalue())


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    from delta_packager.trust import init_keys

    init_keys(tmp_path / "KEYS")
    return tmp_path / "KEYS"


def _serve_args(db_url: str, storage: Path, keys: Path) -> list[str]:
    return [
        "serve",
        "--database-url",
        db_url,
        "--storage",
        str(storage),
        "--trusted-root",
        str(keys / "root.json"),
        "--snapshot-key",
        str(keys / "private" / "snapshot.pem"),
        "--timestamp-key",
        str(keys / "private" / "timestamp.pem"),
    ]


def test_serve_refuses_unmigrated_database_and_missing_secrets(tmp_path, keys_dir) -> None:
    db_url = f"sqlite:///{tmp_path / 'ota.db'}"
    env = {
        **settings_env(
            db_url,
            tmp_path / "s",
            {"root": keys_dir / "root.json", "snapshot": keys_dir, "timestamp": keys_dir},
        )
    }
    result = subprocess.run(
        [sys.executable, "-m", "fedota.cli", *_serve_args(db_url, tmp_path / "s", keys_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )  # the real entry point once; the rest in-process
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: database is at revision")
    assert "fedota db upgrade --database-url" in result.stderr
    bare = {k: v for k, v in env.items() if not k.endswith(("_KEY", "_SECRET"))}
    result = _fedota(*_serve_args(db_url, tmp_path / "s", keys_dir), env=bare)
    assert result.returncode == 2 and "missing secrets" in result.stderr
    upgraded = _fedota("db", "upgrade", "--database-url", db_url)
    assert upgraded.returncode == 0 and f"revision {head_revision()}" in upgraded.stdout


def test_publish_and_rollout_commands_against_a_served_keys_dir(tmp_path, keys_dir) -> None:
    db_url = f"sqlite:///{tmp_path / 'ota.db'}"
    paths = {
        "root": keys_dir / "root.json",
        "snapshot": keys_dir / "private" / "snapshot.pem",
        "timestamp": keys_dir / "private" / "timestamp.pem",
    }
    env = settings_env(db_url, tmp_path / "storage", paths)
    assert _fedota("db", "upgrade", "--database-url", db_url).returncode == 0
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    cli_env = {
        **os.environ,
        "FEDOTA_PUBLISHER_KEY": ROLE_KEYS["publisher"],
        "FEDOTA_OPERATOR_KEY": ROLE_KEYS["operator"],
    }
    with server_process(env, port):
        # the pipeline's empty targets v1, exactly as init_keys signed it
        first = _fedota("publish", "--keys", str(keys_dir), "--server", server, env=cli_env)
        assert first.returncode == 0, first.stderr
        # Issue 22 item 9: the release number is the targets metadata version, named as
        # such, and never looks like an adapter version.
        assert first.stdout.startswith(
            "published release 1 (its TUF targets metadata version; snapshot metadata v"
        )
        assert first.stdout.rstrip().endswith("no adapter bundles")
        bundle = Bundle(4, bundle_bytes("cli"))
        bundle_file = tmp_path / "adapter.fedota"
        bundle_file.write_bytes(bundle.data)
        metadata = tmp_path / "targets.json"
        metadata.write_bytes(
            sign_targets(load_signer(keys_dir / "private" / "targets.pem"), 2, [bundle])
        )
        second = _fedota(
            "publish",
            str(bundle_file),
            "--metadata",
            str(metadata),
            "--server",
            server,
            env=cli_env,
        )
        assert second.returncode == 0, second.stderr
        assert second.stdout.startswith("published release 2 (its TUF targets metadata version;")
        assert second.stdout.rstrip().endswith(": 1 bundle(s) for adapter v4")
        assert "release v" not in first.stdout + second.stdout
        replay = _fedota("publish", "--metadata", str(metadata), "--server", server, env=cli_env)
        assert replay.returncode == 2 and "not newer" in replay.stderr

        create = _fedota(
            "rollout",
            "create",
            "--version",
            "4",
            "--base",
            bundle.base,
            "--stages",
            "10,100",
            "--server",
            server,
            env=cli_env,
        )
        assert create.returncode == 0, create.stderr
        # no device is enrolled: the empty first stage passes at once (issue 24 item 3)
        assert create.stdout.startswith("rollout 1 v4 active stage 2/2")
        pause = _fedota("rollout", "pause", "1", "--server", server, env=cli_env)
        assert "paused (operator)" in pause.stdout
        resume = _fedota("rollout", "resume", "1", "--server", server, env=cli_env)
        assert "active stage 2/2" in resume.stdout
        cancel = _fedota("rollout", "cancel", "1", "--server", server, env=cli_env)
        assert "cancelled" in cancel.stdout
        status = _fedota("rollout", "status", "--server", server, env=cli_env)
        assert "rollout 1 v4 cancelled" in status.stdout
        missing = _fedota("rollout", "pause", "99", "--server", server, env=cli_env)
        assert missing.returncode == 2 and "no rollout 99" in missing.stderr
        no_key = _fedota(
            "rollout",
            "status",
            "--server",
            server,
            env={k: v for k, v in cli_env.items() if k != "FEDOTA_OPERATOR_KEY"},
        )
        assert no_key.returncode == 2 and "FEDOTA_OPERATOR_KEY" in no_key.stderr
    down = _fedota("rollout", "status", "--server", server, env=cli_env)
    assert down.returncode == 4 and "cannot reach" in down.stderr
