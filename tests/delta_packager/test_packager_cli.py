"""``fedota package``, ``fedota bundle``, ``fedota keys`` end to end on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import typer
from typer.testing import CliRunner

from delta_packager import (
    BaseMismatchError,
    PackagerStateError,
    apply_bundle,
    fingerprint_checkpoint,
    load_state,
    read_bundle,
)
from delta_packager.cli import register
from delta_packager.trust import load_targets
from tests.delta_packager.packager_helpers import (
    FP_X,
    random_adapter,
    train_step,
    write_peft_adapter,
    write_quantized_base,
    zstd_frame_declaring,
)

runner = CliRunner()


@pytest.fixture
def app() -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def _root() -> None: ...

    register(root)
    return root


def test_package_inspect_release_round_trip(tmp_path: Path, app: typer.Typer) -> None:
    rng = np.random.default_rng(0)
    v1 = random_adapter(rng)
    base = write_quantized_base(tmp_path / "base")
    keys = tmp_path / "keys"
    assert runner.invoke(app, ["keys", "init", "--out", str(keys)]).exit_code == 0
    prov = tmp_path / "prov.json"
    prov.write_text(
        json.dumps({"round": 1, "num_clients": 3, "aggregation": "ffa", "epsilon": 4.0})
    )
    out1 = tmp_path / "out" / "v1.bundle"
    args = [
        "package",
        "--base",
        str(base),
        "--new",
        str(write_peft_adapter(tmp_path / "a1", v1)),
        "--out",
        str(out1),
    ]
    r1 = runner.invoke(app, [*args, "--keys", str(keys), "--provenance", str(prov)])
    assert r1.exit_code == 0, r1.output
    assert "packaged v1 (full, counter 1)" in r1.output
    state_dir = tmp_path / "out" / "packager-state"
    # A second first release into the same state dir would fork history: refused.
    again = runner.invoke(app, args)
    assert isinstance(again.exception, PackagerStateError)

    v2 = train_step(rng, v1)
    out2 = tmp_path / "out" / "v2.bundle"
    r2 = runner.invoke(
        app,
        [
            "package",
            "--base",
            str(base),
            "--new",
            str(write_peft_adapter(tmp_path / "a2", v2)),
            "--previous-state",
            str(state_dir),
            "--out",
            str(out2),
            "--keys",
            str(keys),
        ],
    )
    assert r2.exit_code == 0, r2.output
    assert "packaged v2 (delta from v1, counter 2)" in r2.output

    fingerprint = fingerprint_checkpoint(base)
    b1, b2 = read_bundle(out1), read_bundle(out2)
    assert b1.manifest.base_fingerprint == fingerprint
    assert b1.manifest.adapter_config.ffa is True and b1.manifest.provenance.epsilon == 4.0
    device = apply_bundle(
        apply_bundle(None, b1, base_fingerprint=fingerprint), b2, base_fingerprint=fingerprint
    )
    state = load_state(state_dir)
    assert all(device.tensors[k].tobytes() == state.current.tensors[k].tobytes() for k in v2)
    targets = load_targets(keys).signed.targets
    assert set(targets) == {"adapters/1/v1.bundle", "adapters/2/v2.bundle"}

    shown = runner.invoke(app, ["bundle", "inspect", str(out2), "--json"])
    assert shown.exit_code == 0
    info = json.loads(shown.output)
    assert (
        info["manifest"]["kind"] == "delta"
        and info["sizes"]["compressed_bytes"] == out2.stat().st_size
    )
    human = runner.invoke(app, ["bundle", "inspect", str(out2)])
    assert "delta v1->v2, counter 2" in human.output

    catch_up = tmp_path / "catch-up.bundle"
    built = runner.invoke(
        app, ["bundle", "build", "--state", str(state_dir), "--out", str(catch_up)]
    )
    assert built.exit_code == 0 and read_bundle(catch_up).manifest.kind == "full"


def test_c13_same_weights_other_quantization_or_tokenizer_is_another_base(
    tmp_path: Path, app: typer.Typer
) -> None:
    a = fingerprint_checkpoint(write_quantized_base(tmp_path / "a"))
    assert a == fingerprint_checkpoint(write_quantized_base(tmp_path / "a-copy"))
    other_quant = fingerprint_checkpoint(write_quantized_base(tmp_path / "fp4", quant_type="fp4"))
    other_tok = fingerprint_checkpoint(write_quantized_base(tmp_path / "tok", tokenizer='{"v": 2}'))
    assert len({a, other_quant, other_tok}) == 3
    out = tmp_path / "b.bundle"
    adapter = write_peft_adapter(tmp_path / "ad", random_adapter(np.random.default_rng(1)))
    assert (
        runner.invoke(
            app,
            ["package", "--base", str(tmp_path / "a"), "--new", str(adapter), "--out", str(out)],
        ).exit_code
        == 0
    )
    for device_fp in (other_quant, other_tok):
        with pytest.raises(BaseMismatchError):
            apply_bundle(None, read_bundle(out), base_fingerprint=device_fp)


def test_bare_safetensors_adapter_with_fingerprint_option(tmp_path: Path, app: typer.Typer) -> None:
    path = tmp_path / "adapter.safetensors"
    safetensors.numpy.save_file(random_adapter(np.random.default_rng(2)), str(path))
    out = tmp_path / "x.bundle"
    r = runner.invoke(
        app,
        [
            "package",
            "--base-fingerprint",
            FP_X,
            "--new",
            str(path),
            "--out",
            str(out),
            "--encoding",
            "fp16",
        ],
    )
    assert r.exit_code == 0, r.output
    assert read_bundle(out).manifest.adapter_config.rank == 4


def test_cli_errors_are_one_line_with_documented_exit_codes(tmp_path: Path) -> None:
    """Through the real ``fedota`` entry point: 3 for a rejected bundle, 2 for bad input."""
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(b"\x28\xb5\x2f\xfd garbage")
    cmd = [sys.executable, "-c", "from fedota.cli import main; main()"]
    rejected = subprocess.run(
        [*cmd, "bundle", "inspect", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert rejected.returncode == 3, rejected.stderr
    assert rejected.stderr.startswith("error: ") and rejected.stderr.count("\n") == 1
    missing = subprocess.run(
        [*cmd, "bundle", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "cannot read bundle" in missing.stderr


_PEAK_RSS_GROWTH = """
import os, resource, sys
import delta_packager.format  # imported before the baseline: only the command is measured
from fedota.cli import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    main()
finally:
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    os.write(1, f"peak-rss-growth-kib {grown}\\n".encode())
"""


def test_inspect_refuses_a_gigabyte_bomb_holding_little_memory(tmp_path: Path) -> None:
    """Issue 22 item 4: a 32 KB zstd frame of zeros that declares 1 GiB.

    Before the fix ``fedota bundle inspect`` decoded all of it (about 1.07 GB resident)
    before refusing; now it refuses from the first decoded bytes.
    """
    bomb = tmp_path / "bomb.bundle"
    bomb.write_bytes(zstd_frame_declaring(2**30))
    assert bomb.stat().st_size < 64 * 2**10
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_GROWTH, "bundle", "inspect", str(bomb)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("error: safetensors header") and proc.stderr.count("\n") == 1
    grown_kib = int(proc.stdout.split("peak-rss-growth-kib ")[1])
    assert grown_kib < 64 * 2**10, f"inspect grew peak RSS by {grown_kib} KiB"


def _fedota(*args: str) -> subprocess.CompletedProcess[str]:
    """The real ``fedota`` entry point, with its error-to-exit-code handling."""
    cmd = [sys.executable, "-c", "from fedota.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_keys_init_on_an_unwritable_path_is_one_line_exit_2(tmp_path: Path) -> None:
    """Issue 22 item 9: was a NotADirectoryError traceback with exit 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = _fedota("keys", "init", "--out", str(blocker / "keys"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot write keys to ") and proc.stderr.count("\n") == 1
    assert "--out" in proc.stderr
    assert blocker.read_text() == "not a directory"


def test_keys_init_failing_midway_leaves_nothing_half_written(tmp_path: Path) -> None:
    """Keys and root are written before targets; a failure there removes them all.

    A regular file named ``metadata`` in OUT makes the last write (targets) fail
    (and does so as root too, unlike a permission bit).
    """
    out = tmp_path / "keys"
    out.mkdir()
    (out / "metadata").write_text("in the way")
    proc = _fedota("keys", "init", "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot write keys to ") and proc.stderr.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["metadata"]
    assert (out / "metadata").read_text() == "in the way"
    (out / "metadata").unlink()
    retry = _fedota("keys", "init", "--out", str(out))
    assert retry.returncode == 0, retry.stderr  # not refused as "already holds keys"


def test_keys_rotate_and_release_commands(tmp_path: Path, app: typer.Typer) -> None:
    keys = tmp_path / "keys"
    r = runner.invoke(app, ["keys", "init", "--out", str(keys), "--root-threshold", "2"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (keys / "private").glob("root*.pem")) == [
        "root-1.pem",
        "root-2.pem",
    ]
    r = runner.invoke(
        app, ["keys", "rotate", "--keys", str(keys), "--role", "root", "--replace", "1"]
    )
    assert r.exit_code == 0 and "root is now v2; root threshold 2" in r.output
    r = runner.invoke(
        app, ["keys", "rotate", "--keys", str(keys), "--role", "targets", "--threshold", "2"]
    )
    assert r.exit_code == 0 and "root is now v3; targets threshold 2" in r.output
    assert sorted(p.name for p in (keys / "private").glob("targets*.pem")) == [
        "targets-1.pem",
        "targets-2.pem",
    ]
    bundle = tmp_path / "x.bundle"
    adapter = tmp_path / "a.safetensors"
    safetensors.numpy.save_file(random_adapter(np.random.default_rng(3)), str(adapter))
    r = runner.invoke(
        app, ["package", "--base-fingerprint", FP_X, "--new", str(adapter), "--out", str(bundle)]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["keys", "release", str(bundle), "--keys", str(keys)])
    assert r.exit_code == 0, r.output
    targets = load_targets(keys)
    assert "adapters/1/x.bundle" in targets.signed.targets and len(targets.signatures) == 2
