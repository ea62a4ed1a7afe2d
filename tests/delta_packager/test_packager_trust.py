"""TUF keys, release metadata and rotation (THREATS A1–A5, B10) at the packager level."""

from __future__ import annotations

import copy
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from delta_packager import BundleIntegrityError, KeysError, TrustError
from delta_packager.trust import (
    check_bundle_target,
    init_keys,
    load_root,
    load_signer,
    load_targets,
    release,
    rotate_keys,
    verify_root_update,
    verify_targets,
)
from tests.delta_packager.packager_helpers import edit_manifest, make_bundle_bytes


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    out = tmp_path / "keys"
    init_keys(out)
    return out


@pytest.fixture
def released(tmp_path: Path, keys: Path) -> tuple[Path, list[Path]]:
    paths = []
    for versions in (1, 2):
        path = tmp_path / f"adapter-v{versions}.bundle"
        path.write_bytes(make_bundle_bytes(seed=3, versions=versions))
        paths.append(path)
    release(paths, keys)
    return keys, paths


def _target(keys: Path, path: Path, version: int) -> TargetFile:
    return load_targets(keys).signed.targets[f"adapters/{version}/{path.name}"]


def test_keys_init_writes_the_documented_layout(tmp_path: Path) -> None:
    out = tmp_path / "k"
    root = init_keys(out, thresholds={"root": 2, "targets": 1})
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "1.root.json",
        "metadata/targets.json",
        "private/root-1.pem",
        "private/root-2.pem",
        "private/snapshot.pem",
        "private/targets.pem",
        "private/timestamp.pem",
        "root.json",
    ]
    assert root.signed.consistent_snapshot is True
    assert root.signed.roles["root"].threshold == 2 and len(root.signatures) == 2
    assert stat.S_IMODE((out / "private/targets.pem").stat().st_mode) == 0o600
    verify_root_update(None, Metadata[Root].from_file(str(out / "1.root.json")))
    verify_targets(root.signed, load_targets(out))
    with pytest.raises(KeysError, match="refusing to overwrite"):
        init_keys(out)


def test_load_signer_gives_a_key_listed_in_root(keys: Path) -> None:
    root = load_root(keys).signed
    for role in ("snapshot", "timestamp"):
        signer = load_signer(keys / "private" / f"{role}.pem")
        assert signer.public_key.keyid in root.roles[role].keyids
    (keys / "bad.pem").write_text("not a key")
    with pytest.raises(KeysError, match="PKCS#8"):
        load_signer(keys / "bad.pem")


def test_release_adds_targets_with_the_fedota_custom_block(
    released: tuple[Path, list[Path]],
) -> None:
    keys, paths = released
    targets = load_targets(keys)
    assert targets.signed.version == 2
    assert targets.signed.expires > datetime.now(UTC) + timedelta(days=80)
    verify_targets(load_root(keys).signed, targets)
    t = _target(keys, paths[1], 2)
    assert t.length == paths[1].stat().st_size
    custom = t.custom["fedota"]
    assert set(custom) == {
        "format_version",
        "kind",
        "from_version",
        "to_version",
        "release_counter",
        "base_fingerprint",
        "uncompressed_bytes",
    }
    assert (
        custom["kind"],
        custom["from_version"],
        custom["to_version"],
        custom["release_counter"],
    ) == ("delta", 1, 2, 2)
    assert check_bundle_target(paths[1].read_bytes(), t).manifest.to_version == 2


def test_a1_flipped_byte_is_rejected_for_every_position_sampled(
    released: tuple[Path, list[Path]],
) -> None:
    keys, paths = released
    data, target = paths[1].read_bytes(), _target(keys, paths[1], 2)
    for i in range(0, len(data), max(1, len(data) // 50)):
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        with pytest.raises(BundleIntegrityError, match="do not match signed target"):
            check_bundle_target(bytes(flipped), target)


def test_a2_manifest_edited_with_old_signature_is_rejected(
    released: tuple[Path, list[Path]],
) -> None:
    keys, paths = released
    edited = edit_manifest(paths[1].read_bytes(), lambda m: m.update(release_counter=99))
    with pytest.raises(BundleIntegrityError, match="do not match signed target"):
        check_bundle_target(edited, _target(keys, paths[1], 2))


def test_a4_metadata_of_one_release_with_payload_of_another_is_rejected(
    released: tuple[Path, list[Path]],
) -> None:
    keys, paths = released
    with pytest.raises(BundleIntegrityError):
        check_bundle_target(paths[0].read_bytes(), _target(keys, paths[1], 2))
    # Even if an attacker also rewrites length and hashes, the signed custom fields differ.
    forged = TargetFile.from_data("adapters/2/x", paths[0].read_bytes())
    forged.unrecognized_fields["custom"] = copy.deepcopy(_target(keys, paths[1], 2).custom)
    with pytest.raises(BundleIntegrityError, match="different releases"):
        check_bundle_target(paths[0].read_bytes(), forged)


def test_a5_more_bytes_than_signed_is_rejected(released: tuple[Path, list[Path]]) -> None:
    keys, paths = released
    with pytest.raises(BundleIntegrityError, match="do not match signed target"):
        check_bundle_target(paths[1].read_bytes() + b"\0", _target(keys, paths[1], 2))


def _resign(keys: Path, signers: list[CryptoSigner]) -> Metadata[Targets]:
    md = load_targets(keys)
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return md


@pytest.mark.parametrize(
    "how",
    ["unsigned", "unknown-key", "snapshot-key-not-targets-key", "revoked-key", "expired"],
)
def test_a3_targets_not_validly_signed_are_rejected(
    released: tuple[Path, list[Path]], how: str
) -> None:
    keys, _ = released
    old_targets_signer = load_signer(keys / "private" / "targets.pem")
    if how == "revoked-key":
        rotate_keys(keys, "targets")  # targets.pem is now a new key; the old one is revoked
    root = load_root(keys).signed
    md = {
        "unsigned": lambda: _resign(keys, []),
        "unknown-key": lambda: _resign(keys, [CryptoSigner.generate_ed25519()]),
        "snapshot-key-not-targets-key": lambda: _resign(
            keys, [load_signer(keys / "private" / "snapshot.pem")]
        ),
        "revoked-key": lambda: _resign(keys, [old_targets_signer]),
        "expired": lambda: load_targets(keys),
    }[how]()
    now = datetime.now(UTC) + (timedelta(days=365) if how == "expired" else timedelta(0))
    with pytest.raises(TrustError, match="expired" if how == "expired" else "signed by 0/1"):
        verify_targets(root, md, now=now)


# ------------------------------------------------------------------ B10: key rotation


def _root_signed_by(
    old: Metadata[Root], new: Metadata[Root], signers: list[CryptoSigner]
) -> Metadata[Root]:
    md = Metadata(copy.deepcopy(new.signed))
    for s in signers:
        md.sign(s, append=True)
    return md


def _signers(keys: Path, pattern: str) -> list[CryptoSigner]:
    return [load_signer(p) for p in sorted((keys / "private").glob(pattern))]  # type: ignore[misc]


@pytest.mark.parametrize(
    ("thresholds", "replace", "new_threshold"),
    [({"root": 1}, None, None), ({"root": 3}, [2], 2), ({"root": 1}, [], 2)],
    ids=["1-of-1-replaced", "one-of-threshold-replaced", "threshold-raised"],
)
def test_b10_root_rotation_needs_old_and_new_thresholds(
    tmp_path: Path, thresholds: dict[str, int], replace: list[int] | None, new_threshold: int | None
) -> None:
    keys = tmp_path / "keys"
    init_keys(keys, thresholds=thresholds)
    trusted = load_root(keys)
    old_signers = _signers(keys, "root*.pem")
    new = rotate_keys(keys, "root", replace=replace, threshold=new_threshold)
    assert new.signed.version == 2 and (keys / "2.root.json").exists()
    verify_root_update(trusted, Metadata[Root].from_file(str(keys / "2.root.json")))  # accepted
    new_signers = _signers(keys, "root*.pem")
    old_only = [s for s in old_signers if s.public_key.keyid not in new.signed.roles["root"].keyids]
    new_only = [
        s for s in new_signers if s.public_key.keyid not in trusted.signed.roles["root"].keyids
    ]
    # Signed by the new keys alone: the old root's threshold is not met (unless the
    # rotation kept enough old keys, as in the one-of-threshold case).
    if (
        len(set(trusted.signed.roles["root"].keyids) & {s.public_key.keyid for s in new_signers})
        < trusted.signed.roles["root"].threshold
    ):
        with pytest.raises(TrustError):
            verify_root_update(trusted, _root_signed_by(trusted, new, new_only))
    # Signed by the old keys alone: the new root's threshold is not met.
    with pytest.raises(TrustError):
        verify_root_update(trusted, _root_signed_by(trusted, new, old_only or old_signers[:1]))
    # A skipped version is refused even when properly signed.
    skipped = _root_signed_by(trusted, new, [*old_signers, *new_signers])
    skipped.signed.version = 3
    skipped = _root_signed_by(trusted, skipped, [*old_signers, *new_signers])
    with pytest.raises(TrustError, match="expected 2"):
        verify_root_update(trusted, skipped)


def test_b10_threshold_raised_rejects_a_single_signature(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    trusted = load_root(keys)
    new = rotate_keys(keys, "root", replace=[], threshold=2)
    assert new.signed.roles["root"].threshold == 2
    one_new_key = _signers(keys, "root-2.pem")
    with pytest.raises(TrustError, match="signed by 1/2"):
        verify_root_update(
            trusted,
            _root_signed_by(trusted, new, [*_signers(keys, "root-1.pem"), *one_new_key][:1]),
        )


def test_targets_rotation_re_signs_targets_with_the_new_key(
    released: tuple[Path, list[Path]],
) -> None:
    keys, paths = released
    before = load_targets(keys).signed.version
    rotate_keys(keys, "targets")
    root, targets = load_root(keys), load_targets(keys)
    verify_targets(root.signed, targets)
    assert targets.signed.version == before + 1 and len(targets.signed.targets) == 2
    assert len(list((keys / "private" / "retired").glob("targets-*.pem"))) == 1
    # Releasing still works after the rotation.
    release([paths[1]], keys)
    verify_targets(load_root(keys).signed, load_targets(keys))


def test_release_without_targets_key_says_what_to_do(released: tuple[Path, list[Path]]) -> None:
    keys, paths = released
    (keys / "private" / "targets.pem").unlink()
    with pytest.raises(KeysError, match="no private key for role targets"):
        release([paths[0]], keys)
    assert json.loads((keys / "metadata" / "targets.json").read_text())["signed"]["version"] == 2
