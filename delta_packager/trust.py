"""④ publish (offline half) — TUF keys, signed release metadata and key rotation.

Uses python-tuf's Metadata API and securesystemslib's ``CryptoSigner``; no new crypto.
The offline root and targets keys live here; the OTA server holds the online snapshot
and timestamp keys and makes snapshot/timestamp metadata itself (docs/adr/0003).

Keys directory layout (the OTA server relies on it)::

    KEYS/root.json                 current root metadata
    KEYS/<N>.root.json             every root version N (clients walk this chain)
    KEYS/metadata/targets.json     current signed targets metadata
    KEYS/private/<role>.pem        the role's key when it has one key, or
    KEYS/private/<role>-<i>.pem    i = 1..n when it has n keys (threshold > 1)
    KEYS/private/retired/          keys removed by a rotation, kept for the operator

Private keys are unencrypted PKCS#8 PEM Ed25519 files (mode 0600). Root metadata uses
``consistent_snapshot=True``. A bundle's target path is
``adapters/<to_version>/<bundle file name>`` and its ``custom`` is
``{"fedota": {format_version, kind, from_version, to_version, release_counter,
base_fingerprint, uncompressed_bytes}}``, plus ``compatible_bases`` (a sorted list of
fingerprints) when the bundle names further bases.

The checks themselves live in ``delta_packager.verify`` (re-exported here).

Invariants: every metadata file is written atomically; a new root is written only
after it verifies against both the old and the new root's thresholds (THREATS B10);
targets metadata is written only if its signatures meet the root's targets threshold;
``init_keys`` that fails (an unwritable ``--out``, a full disk) removes what it wrote.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from delta_packager.errors import KeysError
from delta_packager.format import read_bundle
from delta_packager.verify import (
    check_bundle_target,
    target_custom,
    verify_root_update,
    verify_targets,
)
from protocol import atomic_write

__all__ = [
    "ROLES",
    "check_bundle_target",
    "init_keys",
    "load_root",
    "load_signer",
    "load_targets",
    "release",
    "rotate_keys",
    "target_custom",
    "target_path",
    "verify_root_update",
    "verify_targets",
]

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
_SERIALIZER = JSONSerializer(compact=False)
_INIT_ENTRIES = ("private", "metadata", "root.json", "1.root.json")
_KEYFILE = re.compile(r"^(?P<role>[a-z]+)(?:-(?P<i>[1-9][0-9]*))?\.pem$")


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).replace(microsecond=0)


def target_path(to_version: int, bundle_name: str) -> str:
    """TUF target path of a bundle: ``adapters/<to_version>/<bundle file name>``."""
    return f"adapters/{to_version}/{bundle_name}"


# ------------------------------------------------------------------ keys on disk


def load_signer(pem_path: Path) -> Signer:
    """Load an unencrypted PKCS#8 PEM private key as a securesystemslib signer.

    Raises:
        KeysError: the file is missing or is not an unencrypted PEM private key.
    """
    try:
        private_key = load_pem_private_key(pem_path.read_bytes(), password=None)
        return CryptoSigner(private_key)
    except OSError as e:
        raise KeysError(f"cannot read private key {pem_path}: {e.strerror}") from e
    except (ValueError, TypeError) as e:
        raise KeysError(
            f"{pem_path} is not an unencrypted PKCS#8 PEM private key ({e}); "
            "use the files `fedota keys init` writes"
        ) from e


def _role_key_files(keys_dir: Path, role: str) -> list[Path]:
    files = []
    for path in (keys_dir / "private").glob(f"{role}*.pem"):
        match = _KEYFILE.match(path.name)
        if match and match["role"] == role:
            files.append((int(match["i"] or 0), path))
    return [p for _, p in sorted(files)]


def _role_signers(keys_dir: Path, role: str) -> list[Signer]:
    signers = [load_signer(p) for p in _role_key_files(keys_dir, role)]
    if not signers:
        raise KeysError(
            f"no private key for role {role} in {keys_dir / 'private'}; expected "
            f"{role}.pem or {role}-1.pem ...: run `fedota keys init` or restore the keys"
        )
    return signers


def _write_role_keys(keys_dir: Path, role: str, signers: Sequence[CryptoSigner]) -> None:
    private = keys_dir / "private"
    for old in _role_key_files(keys_dir, role):
        old.unlink()
    for i, signer in enumerate(signers, start=1):
        name = f"{role}.pem" if len(signers) == 1 else f"{role}-{i}.pem"
        atomic_write(private / name, signer.private_bytes, mode=0o600)


def _load(path: Path, cls: type[Root] | type[Targets]) -> Metadata[Any]:
    try:
        md = Metadata.from_bytes(path.read_bytes())
    except FileNotFoundError as e:
        raise KeysError(f"{path} does not exist; run `fedota keys init --out DIR` first") from e
    except (OSError, DeserializationError) as e:
        raise KeysError(f"{path} is not readable TUF metadata: {e}") from e
    if not isinstance(md.signed, cls):
        raise KeysError(f"{path} holds {md.signed.type} metadata; expected {cls.type}")
    return md


def load_root(keys_dir: Path) -> Metadata[Root]:
    """Load ``KEYS/root.json``.

    Raises:
        KeysError: missing or not root metadata.
    """
    return _load(keys_dir / "root.json", Root)


def load_targets(keys_dir: Path) -> Metadata[Targets]:
    """Load ``KEYS/metadata/targets.json``.

    Raises:
        KeysError: missing or not targets metadata.
    """
    return _load(keys_dir / "metadata" / "targets.json", Targets)


def _write_root(keys_dir: Path, root: Metadata[Root]) -> None:
    data = root.to_bytes(_SERIALIZER)
    atomic_write(keys_dir / f"{root.signed.version}.root.json", data)
    atomic_write(keys_dir / "root.json", data)


def _sign_targets(keys_dir: Path, root: Root, targets: Metadata[Targets]) -> None:
    targets.signatures.clear()
    for signer in _role_signers(keys_dir, "targets"):
        targets.sign(signer, append=True)
    verify_targets(root, targets)
    atomic_write(keys_dir / "metadata" / "targets.json", targets.to_bytes(_SERIALIZER))


def init_keys(
    out: Path,
    *,
    thresholds: Mapping[str, int] | None = None,
    root_expiry_days: int = 365,
    targets_expiry_days: int = 90,
) -> Metadata[Root]:
    """Create keys for the four roles, root v1 and an empty signed targets v1.

    Each role gets as many Ed25519 keys as its threshold (default 1).

    Args:
        out: The keys directory; must not already hold a root.
        thresholds: Role -> signature threshold (missing roles: 1).
        root_expiry_days: Validity of root metadata.
        targets_expiry_days: Validity of targets metadata.

    Returns:
        The root metadata written to ``out/root.json`` and ``out/1.root.json``.

    Raises:
        KeysError: ``out`` already holds keys, a threshold is not a positive integer,
            or ``out`` cannot be written (then nothing is left behind).
    """
    thresholds = {role: 1 for role in ROLES} | dict(thresholds or {})
    if set(thresholds) != set(ROLES) or any(not 1 <= t <= 16 for t in thresholds.values()):
        raise KeysError(f"thresholds {thresholds} invalid; expected 1..16 for each of {ROLES}")
    if (out / "root.json").exists() or (out / "private").exists():
        raise KeysError(f"{out} already holds keys; refusing to overwrite them (pick a new dir)")
    created_dir = _outermost_missing(out)
    new_entries = [out / n for n in _INIT_ENTRIES if not (out / n).exists()]
    try:
        root = _write_new_keys(out, thresholds, root_expiry_days, targets_expiry_days)
    except BaseException as e:
        # Nothing half-written: a later `keys init` into the same dir must not be refused.
        _remove_quietly([created_dir] if created_dir is not None else new_entries)
        if isinstance(e, OSError):
            raise KeysError(
                f"cannot write keys to {out}: {e.strerror or e} ({e.filename or out}); "
                "nothing was written: pass --out a directory you can create and write"
            ) from e
        raise
    logger.info("initialised TUF keys in %s with thresholds %s", out, thresholds)
    return root


def _outermost_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet; ``None`` if it does."""
    missing = None
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


def _remove_quietly(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _write_new_keys(
    out: Path, thresholds: Mapping[str, int], root_expiry_days: int, targets_expiry_days: int
) -> Metadata[Root]:
    out.mkdir(parents=True, exist_ok=True)
    now = _now(None)
    root = Metadata(Root(expires=now + timedelta(days=root_expiry_days), consistent_snapshot=True))
    for role in ROLES:
        signers = [CryptoSigner.generate_ed25519() for _ in range(thresholds[role])]
        for signer in signers:
            root.signed.add_key(signer.public_key, role)
        root.signed.roles[role].threshold = thresholds[role]
        _write_role_keys(out, role, signers)
    for root_signer in _role_signers(out, "root"):
        root.sign(root_signer, append=True)
    verify_root_update(None, root)
    _write_root(out, root)
    targets = Metadata(Targets(expires=now + timedelta(days=targets_expiry_days)))
    _sign_targets(out, root.signed, targets)
    return root


# ------------------------------------------------------------------ release and rotation


def release(bundle_paths: Sequence[Path], keys_dir: Path, *, expiry_days: int = 90) -> Path:
    """Add bundles as TUF targets to ``KEYS/metadata/targets.json`` and re-sign it.

    Each bundle is parsed strictly first; its target path is
    ``adapters/<to_version>/<file name>`` with the fedota ``custom`` block. The targets
    version is bumped and its expiry set to now + ``expiry_days``.

    Returns:
        The path of the rewritten targets metadata.

    Raises:
        BundleFormatError: a bundle is malformed.
        KeysError: the keys directory is incomplete.
        TrustError: the available targets keys do not meet root's threshold.
    """
    root = load_root(keys_dir)
    targets = load_targets(keys_dir)
    for path in bundle_paths:
        bundle = read_bundle(path)
        tpath = target_path(bundle.manifest.to_version, path.name)
        target = TargetFile.from_file(tpath, str(path), ["sha256"])
        target.unrecognized_fields["custom"] = target_custom(bundle)
        targets.signed.targets[tpath] = target
        logger.info("release: %s (%d bytes)", tpath, target.length)
    targets.signed.version += 1
    targets.signed.expires = _now(None) + timedelta(days=expiry_days)
    _sign_targets(keys_dir, root.signed, targets)
    return keys_dir / "metadata" / "targets.json"


def rotate_keys(
    keys_dir: Path,
    role: str,
    *,
    replace: Sequence[int] | None = None,
    threshold: int | None = None,
    expiry_days: int = 365,
) -> Metadata[Root]:
    """Rotate ``role``'s keys in a new root version signed by old and new root keys.

    Args:
        keys_dir: The keys directory.
        role: One of ``ROLES``.
        replace: 1-based indices of the role's keys to replace (default: all).
        threshold: New threshold; extra keys are generated if it exceeds the key count.
        expiry_days: Validity of the new root.

    Returns:
        The new root metadata (also written as ``root.json`` and ``<N>.root.json``).
        Replaced private keys move to ``private/retired/``. Rotating ``targets``
        re-signs ``metadata/targets.json``; snapshot/timestamp need the server to
        re-sign with its new online keys.

    Raises:
        KeysError: unknown role, bad indices or threshold, missing private keys.
        TrustError: the new root does not verify (should not happen).
    """
    if role not in ROLES:
        raise KeysError(f"unknown role {role!r}; expected one of {ROLES}")
    old = load_root(keys_dir)
    old_root_signers = _role_signers(keys_dir, "root")
    current = [
        CryptoSigner(load_pem_private_key(p.read_bytes(), None))
        for p in _role_key_files(keys_dir, role)
    ]
    indices = set(range(1, len(current) + 1)) if replace is None else set(replace)
    if not indices <= set(range(1, len(current) + 1)):
        raise KeysError(f"key indices {sorted(indices)} out of range 1..{len(current)}")
    new_threshold = threshold or old.signed.roles[role].threshold
    keep = [s for i, s in enumerate(current, start=1) if i not in indices]
    fresh = [CryptoSigner.generate_ed25519() for _ in indices]
    fresh += [
        CryptoSigner.generate_ed25519() for _ in range(new_threshold - len(keep) - len(fresh))
    ]
    signers = keep + fresh
    if not 1 <= new_threshold <= len(signers):
        raise KeysError(f"threshold {new_threshold} invalid for {len(signers)} keys")
    new = Metadata(copy.deepcopy(old.signed))
    for i in sorted(indices):
        new.signed.revoke_key(current[i - 1].public_key.keyid, role)
    for signer in fresh:
        new.signed.add_key(signer.public_key, role)
    new.signed.roles[role].threshold = new_threshold
    new.signed.version += 1
    new.signed.expires = _now(None) + timedelta(days=expiry_days)
    new_root_signers = signers if role == "root" else old_root_signers
    for signer in [*old_root_signers, *new_root_signers]:
        new.sign(signer, append=True)
    verify_root_update(old, new)
    # Order matters for recovery by hand after a crash: replaced keys are copied to
    # retired/ first, new private keys are written before the root that names them.
    retired = keys_dir / "private" / "retired"
    for i in sorted(indices):
        s = current[i - 1]
        atomic_write(retired / f"{role}-{s.public_key.keyid[:16]}.pem", s.private_bytes, mode=0o600)
    _write_role_keys(keys_dir, role, signers)
    _write_root(keys_dir, new)
    if role == "targets":
        targets = load_targets(keys_dir)
        targets.signed.version += 1
        targets.signed.expires = max(targets.signed.expires, _now(None) + timedelta(days=1))
        _sign_targets(keys_dir, new.signed, targets)
    logger.info("rotated %s keys: root is now v%d", role, new.signed.version)
    return new
