"""⑥ verify (packager side) — checks on TUF metadata and on a bundle against its target.

Used by ``delta_packager.trust`` before it writes anything, by tests, and by the client
SDK after ``tuf.ngclient`` has verified the metadata chain:

* ``verify_root_update`` — a new root is signed by a threshold of the old root's keys
  and of its own, and is exactly one version newer (TUF spec §5.3.4; THREATS B10);
* ``verify_targets`` — targets metadata meets root's threshold and is unexpired (A3);
* ``check_bundle_target`` — bundle bytes match the signed length and SHA-256 (A1, A2,
  A5), parse within the signed uncompressed size (A6, A7), and the manifest repeats
  the signed ``custom.fedota`` fields (A4).

``target_custom`` defines the ``custom`` block the OTA server reads; it repeats the
manifest's ``compatible_bases`` only when the manifest names some, and the
provenance's privacy spend (``privacy``) only when recorded, so older targets keep
their exact form.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from delta_packager.errors import BundleIntegrityError, TrustError
from delta_packager.format import Bundle, parse_bundle

__all__ = ["check_bundle_target", "target_custom", "verify_root_update", "verify_targets"]


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).replace(microsecond=0)


def target_custom(bundle: Bundle) -> dict[str, Any]:
    """The ``custom`` field of a bundle's TUF target (read by the server and clients)."""
    m = bundle.manifest
    fedota: dict[str, Any] = {
        "format_version": m.format_version,
        "kind": m.kind,
        "from_version": m.from_version,
        "to_version": m.to_version,
        "release_counter": m.release_counter,
        "base_fingerprint": m.base_fingerprint,
        "uncompressed_bytes": m.uncompressed_bytes,
    }
    if m.compatible_bases:
        fedota["compatible_bases"] = list(m.compatible_bases)
    privacy = m.provenance.privacy()
    if privacy is not None:  # signed beside the payload: judged before any download
        fedota["privacy"] = privacy.to_signed()
    return {"fedota": fedota}


def check_bundle_target(data: bytes, target: TargetFile) -> Bundle:
    """Check downloaded bundle bytes against their signed TUF target, then parse them.

    The target must come from verified targets metadata (``tuf.ngclient`` on a device).
    Checks, in order: length and SHA-256 (THREATS A1, A2, A5), the fedota ``custom``
    block, a parse bounded by the signed ``uncompressed_bytes`` (A6, A7), and that the
    manifest repeats the signed fields exactly (A4: metadata of one release with the
    payload of another).

    Returns:
        The parsed bundle.

    Raises:
        BundleIntegrityError: bytes or fields differ from the signed target.
        BundleFormatError: the bundle is malformed.
    """
    try:
        target.verify_length_and_hashes(data)
    except LengthOrHashMismatchError as e:
        raise BundleIntegrityError(
            f"bundle bytes do not match signed target {target.path}: {e}; discard the download"
        ) from e
    custom = target.custom.get("fedota") if isinstance(target.custom, dict) else None
    if not isinstance(custom, dict) or not isinstance(custom.get("uncompressed_bytes"), int):
        raise BundleIntegrityError(
            f"target {target.path} has no fedota custom block; expected custom.fedota with "
            "uncompressed_bytes: it was not released by `fedota package --keys`"
        )
    size = custom["uncompressed_bytes"]
    bundle = parse_bundle(data, max_uncompressed_bytes=size, expected_uncompressed_bytes=size)
    expected = target_custom(bundle)["fedota"]
    if custom != expected:
        diff = sorted(
            k for k in expected.keys() | custom.keys() if custom.get(k) != expected.get(k)
        )
        raise BundleIntegrityError(
            f"bundle manifest and signed target {target.path} disagree on {diff}: "
            "payload and metadata are from different releases; refusing it"
        )
    return bundle


def verify_root_update(trusted: Metadata[Root] | None, new: Metadata[Root]) -> None:
    """Check ``new`` is a valid successor of ``trusted`` (TUF spec §5.3.4-5.3.5).

    ``new`` must be signed by a threshold of ``trusted``'s root keys and by a threshold
    of its own; its version must be exactly one above. With ``trusted=None`` only the
    self-signature is checked (first root).

    Raises:
        TrustError: thresholds not met or wrong version.
    """
    try:
        if trusted is not None:
            if new.signed.version != trusted.signed.version + 1:
                raise TrustError(
                    f"new root has version {new.signed.version}; expected "
                    f"{trusted.signed.version + 1}"
                )
            trusted.signed.verify_delegate("root", new.signed_bytes, new.signatures)
        new.signed.verify_delegate("root", new.signed_bytes, new.signatures)
    except UnsignedMetadataError as e:
        raise TrustError(
            f"root v{new.signed.version} rejected: {e}; it needs a threshold of "
            "both the old and the new root keys"
        ) from e


def verify_targets(root: Root, targets: Metadata[Targets], *, now: datetime | None = None) -> None:
    """Check targets metadata meets root's targets threshold and has not expired.

    Raises:
        TrustError: under threshold, signed by unknown or revoked keys only, or expired.
    """
    try:
        root.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    except UnsignedMetadataError as e:
        raise TrustError(
            f"targets v{targets.signed.version} rejected: {e} of root "
            f"v{root.version}'s targets keys; re-sign it with the current targets keys"
        ) from e
    reference = _now(now)
    if targets.signed.is_expired(reference):
        raise TrustError(
            f"targets v{targets.signed.version} expired at "
            f"{targets.signed.expires:%Y-%m-%dT%H:%M:%SZ} (now {reference:%Y-%m-%dT%H:%M:%SZ}); "
            "publish a fresh release"
        )
