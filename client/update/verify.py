"""⑥ verify: TUF metadata via ``tuf.ngclient``, then the pre-fetch and payload checks.

Order (each a separate function, called top to bottom by the agent):

1. ``refresh_metadata`` — ngclient walks root rotations from the provisioned root and
   loads timestamp → snapshot → targets; expired, unsigned, under-threshold, rolled
   back or mixed-and-matched metadata is refused by the reference implementation
   (THREATS A3, B9, B10).
2. ``select_target`` — the offered path must be a signed target, and its signed
   ``custom.fedota`` block must name this device's base fingerprint (as its
   ``base_fingerprint`` or one of its ``compatible_bases``), a release counter above
   the device's floor, (for a delta) the installed version, and a privacy spend
   within the device's own policy — all *before* a payload byte is fetched (B8,
   C12, C13, C14, I42; ADR 0014).
3. ``verify_payload`` — length and SHA-256 against the signed target, strict parse
   bounded by the signed uncompressed size, manifest equal to the signed fields
   (A1, A2, A4–A7, via ``delta_packager.verify.check_bundle_target``). Only this
   function constructs a ``VerifiedBundle``; staging takes nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tuf.api.exceptions import DownloadError, ExpiredMetadataError, RepositoryError
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from client.update.errors import UpdateRejectedError, UpdateRetryError, UpdateTransientError
from client.update.transport import Retrier, TufFetcher
from delta_packager import (
    DEFAULT_MAX_UNCOMPRESSED_BYTES,
    BaseMismatchError,
    Bundle,
    BundleFormatError,
    BundleIntegrityError,
    BundleRejectedError,
    ChainMismatchError,
    RollbackError,
)
from delta_packager.verify import check_bundle_target
from protocol import PrivacyPolicy, PrivacySpend, privacy_violation

__all__ = [
    "VerifiedBundle",
    "payload_url",
    "refresh_metadata",
    "reject_reason",
    "select_target",
    "verify_payload",
]

logger = logging.getLogger(__name__)
_FORMAT_VERSIONS = (1,)
_VERIFIER = object()  # only this module holds it: VerifiedBundle cannot be forged


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose bytes matched a target of verified TUF metadata.

    Attributes:
        bundle: The strictly parsed bundle.
        target: The signed target it matched.
    """

    bundle: Bundle
    target: TargetFile
    _proof: object = field(repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self._proof is not _VERIFIER:
            raise TypeError("only client.update.verify.verify_payload constructs VerifiedBundle")


def reject_reason(error: BundleRejectedError) -> str:
    """Short machine-readable reason code of a packager rejection."""
    for cls, code in (
        (BaseMismatchError, "base_mismatch"),
        (RollbackError, "rollback"),
        (ChainMismatchError, "chain_mismatch"),
        (BundleIntegrityError, "integrity"),
        (BundleFormatError, "malformed_bundle"),
    ):
        if isinstance(error, cls):
            return code
    return "rejected"


def refresh_metadata(
    *, tuf_dir: Path, server_url: str, http: httpx.Client, retrier: Retrier
) -> Updater:
    """Refresh TUF metadata from ``server_url/tuf/`` against the trusted root in ``tuf_dir``.

    Returns:
        The refreshed ``Updater`` (its trusted set is now current).

    Raises:
        UpdateRejectedError: stale (``stale_metadata``) or untrusted
            (``untrusted_metadata``) metadata.
        UpdateTransientError: the metadata could not be fetched.
    """
    base = server_url.rstrip("/")
    updater = Updater(
        metadata_dir=str(tuf_dir),
        metadata_base_url=f"{base}/tuf/",
        target_base_url=f"{base}/tuf/targets/",
        fetcher=TufFetcher(http, retrier),
        config=UpdaterConfig(prefix_targets_with_hash=True),
        bootstrap=None,  # the provisioned root.json, or newer roots ngclient persisted
    )
    try:
        updater.refresh()
    except ExpiredMetadataError as e:
        raise UpdateRejectedError(
            f"the server's TUF metadata has expired ({e}); installing nothing. The server "
            "is frozen or misconfigured: tell its operator",
            reason="stale_metadata",
        ) from e
    except DownloadError as e:
        raise UpdateTransientError(f"cannot fetch TUF metadata: {e}; try again later") from e
    except RepositoryError as e:
        raise UpdateRejectedError(
            f"TUF metadata rejected: {type(e).__name__}: {e}; installing nothing",
            reason="untrusted_metadata",
        ) from e
    return updater


def select_target(
    updater: Updater,
    path: str,
    *,
    base_fingerprint: str,
    release_floor: int,
    installed_version: int | None,
    max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES,
    privacy_policy: PrivacyPolicy | None = None,
) -> TargetFile:
    """Find ``path`` in verified targets metadata and check it fits this device.

    Raises:
        UpdateRejectedError: unsigned target, wrong base, rollback, a delta from another
            version, an unknown format, a declared size above the limit, or a signed
            privacy spend above the device's own policy (``privacy_budget``).
    """
    try:
        target = updater.get_targetinfo(path)
    except RepositoryError as e:
        raise UpdateRejectedError(
            f"TUF target lookup failed: {e}", reason="untrusted_metadata"
        ) from e
    if target is None:
        raise UpdateRejectedError(
            f"the server offered {path!r}, which is not in the signed targets metadata; "
            "refusing it (there is no permissive fallback)",
            reason="unsigned_target",
        )
    custom: Any = target.custom.get("fedota") if isinstance(target.custom, dict) else None
    if not isinstance(custom, dict):
        raise UpdateRejectedError(f"target {path} has no fedota custom block", reason="integrity")

    def refuse(reason: str, message: str) -> UpdateRejectedError:
        return UpdateRejectedError(
            f"target {path}: {message}; nothing was downloaded", reason=reason
        )

    if custom.get("format_version") not in _FORMAT_VERSIONS:
        raise refuse("format", f"bundle format {custom.get('format_version')!r} is unsupported")
    if not _names_base(custom, base_fingerprint):
        raise refuse(
            "base_mismatch",
            f"built for base {custom.get('base_fingerprint')}, "
            f"this device holds {base_fingerprint}",
        )
    counter = custom.get("release_counter")
    if not isinstance(counter, int) or counter <= release_floor:
        raise refuse(
            "rollback",
            f"release counter {counter!r} is not above the device's {release_floor} "
            "(a rollback or replay)",
        )
    if custom.get("kind") == "delta" and custom.get("from_version") != installed_version:
        raise refuse(
            "chain_mismatch",
            f"delta from version {custom.get('from_version')}, device holds {installed_version}",
        )
    size = custom.get("uncompressed_bytes")
    if not isinstance(size, int) or not 0 < size <= max_uncompressed_bytes:
        raise refuse(
            "too_large", f"declares {size!r} uncompressed bytes (limit {max_uncompressed_bytes})"
        )
    if privacy_policy is not None and privacy_policy.is_set:
        _check_privacy(custom, privacy_policy, refuse)
    return target


def _check_privacy(
    custom: dict[str, Any],
    policy: PrivacyPolicy,
    refuse: Callable[[str, str], UpdateRejectedError],
) -> None:
    """The device's own budget against the *signed* spend: whatever the server's policy
    is, or whether it has one, this device installs nothing past its budget (ADR 0014).

    Raises:
        UpdateRejectedError: over the budget, or the spend is not recorded (unbounded).
    """
    version = custom.get("to_version")
    try:
        spend = PrivacySpend.from_json(custom["privacy"]) if "privacy" in custom else None
    except ValueError as e:
        raise refuse(
            "privacy_budget", f"release v{version} has a malformed privacy block ({e})"
        ) from e
    why = privacy_violation(policy, spend)
    if why is not None:
        raise refuse("privacy_budget", f"release v{version} {why} of this device")


def _names_base(custom: dict[str, Any], base_fingerprint: str) -> bool:
    """Whether a signed ``custom.fedota`` block names this base, primary or compatible."""
    compatible = custom.get("compatible_bases", [])
    return custom.get("base_fingerprint") == base_fingerprint or (
        isinstance(compatible, list) and base_fingerprint in compatible
    )


def payload_url(server_url: str, target: TargetFile) -> str:
    """Consistent-snapshot URL of a target: ``/tuf/targets/<dir>/<sha256>.<name>``."""
    directory, name = posixpath.split(target.path)
    sha = target.hashes["sha256"]
    prefix = f"{directory}/" if directory else ""
    return f"{server_url.rstrip('/')}/tuf/targets/{prefix}{sha}.{name}"


def verify_payload(path: Path, target: TargetFile) -> VerifiedBundle:
    """Check the downloaded file against its signed target and parse it strictly.

    Raises:
        UpdateRetryError: the bytes are not the signed payload (truncated, swapped or
            corrupted on the way: a transport problem, ``payload_mismatch``).
        UpdateRejectedError: the signed payload itself is refused (malformed bundle,
            fields that contradict its signed metadata).
    """
    size = path.stat().st_size
    if size != target.length:
        raise UpdateRetryError(
            f"downloaded {size} bytes, the signed length is {target.length}: the payload "
            "was truncated or swapped on the way; will retry later",
            reason="payload_mismatch",
        )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != target.hashes.get("sha256"):
        raise UpdateRetryError(
            "the downloaded payload does not match its signed sha256: it was corrupted or "
            "swapped on the way (a bad mirror or CDN edge); will retry later",
            reason="payload_mismatch",
        )
    try:
        bundle = check_bundle_target(data, target)
    except BundleRejectedError as e:
        raise UpdateRejectedError(str(e), reason=reject_reason(e)) from e
    return VerifiedBundle(bundle=bundle, target=target, _proof=_VERIFIER)
