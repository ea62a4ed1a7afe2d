"""Domain values of the OTA service: frozen, validated once, free of HTTP and SQL.

The bundle custom metadata contract (``target.custom["fedota"]``) is parsed here:
``{"format_version": 1, "kind": "full"|"delta", "from_version": int|None,
"to_version": int, "release_counter": int, "base_fingerprint": "sha256:<hex>",
"uncompressed_bytes": int}``, for target paths ``adapters/<to_version>/<name>``, plus
``"compatible_bases": ["sha256:<hex>", ...]`` (sorted, unique, without the primary) when
the bundle also applies to other bases (GGUF exports; DESIGN decision 11), plus
``"privacy": {"record_epsilon", "record_delta", "user_epsilon", "user_delta"}`` (each
optional) when the provenance records the privacy spend (the release gate, ADR 0014).
A bundle is offered to a device whose base is its ``base_fingerprint`` or any
compatible base.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocol import PrivacyPolicy, PrivacySpend, ReleaseKind, privacy_violation
from server.ota.errors import ReleaseRejectedError

FORMAT_VERSION = 1
FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TARGET_PATH_RE = re.compile(r"^adapters/(\d{1,9})/([A-Za-z0-9][A-Za-z0-9._-]{0,199})$")
MAX_COMPATIBLE_BASES = 64  # as delta_packager's manifest parser


class RolloutState(StrEnum):
    """Where a rollout stands (stored as text in ``rollouts.state``)."""

    ACTIVE = "active"  # offering its release to the devices of its stages so far
    PAUSED = "paused"  # by an operator or the failure threshold; offers nothing
    CANCELLED = "cancelled"  # final; devices keep what they installed


ROLLOUT_STATES = tuple(RolloutState)
BUCKETS = 10_000  # bucket resolution: 0.01 percent


@dataclass(frozen=True)
class BundleTarget:
    """One TUF target that is a fedota bundle."""

    path: str
    length: int
    hashes: dict[str, str]
    kind: str
    from_version: int | None
    to_version: int
    base_fingerprint: str
    release_counter: int
    uncompressed_bytes: int
    compatible_bases: tuple[str, ...] = ()
    privacy: PrivacySpend | None = None  # the signed ``privacy`` block (ADR 0014)

    @property
    def bases(self) -> tuple[str, ...]:
        """Every base the bundle applies to: the primary first, then the compatible ones."""
        return (self.base_fingerprint, *self.compatible_bases)

    def applies_to(self, fingerprint: str) -> bool:
        """Whether a device holding base ``fingerprint`` may be offered this bundle."""
        return fingerprint == self.base_fingerprint or fingerprint in self.compatible_bases

    @property
    def sha256(self) -> str:
        """The SHA-256 of the bundle bytes (the blob name and the ETag)."""
        return self.hashes["sha256"]

    @property
    def url_path(self) -> str:
        """Path under ``/tuf/targets/`` as python-tuf builds it for consistent snapshots.

        ``tuf.ngclient`` prefixes the file name with the *first* hash of the target.
        """
        directory, _, name = self.path.rpartition("/")
        return f"{directory}/{next(iter(self.hashes.values()))}.{name}"


def _int(value: Any, what: str, *, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 2**31:
        raise ReleaseRejectedError(f"{what} must be an integer in [{minimum}, 2^31), got {value!r}")
    return value


def parse_bundle_target(
    path: str, length: int, hashes: dict[str, str], custom: Any
) -> BundleTarget:
    """Validate one target entry against the bundle metadata contract.

    Raises:
        ReleaseRejectedError: naming the field that breaks the contract.
    """
    match = TARGET_PATH_RE.match(path)
    if match is None:
        raise ReleaseRejectedError(f"target path {path!r} is not adapters/<version>/<file name>")
    if "sha256" not in hashes or not re.fullmatch(r"[0-9a-f]{64}", hashes["sha256"]):
        raise ReleaseRejectedError(f"target {path} has no sha256 hash")
    for algorithm in hashes:
        if algorithm not in hashlib.algorithms_guaranteed:
            raise ReleaseRejectedError(f"target {path} uses unknown hash algorithm {algorithm!r}")
    meta = custom.get("fedota") if isinstance(custom, dict) else None
    if not isinstance(meta, dict):
        raise ReleaseRejectedError(f"target {path} lacks the custom 'fedota' metadata")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ReleaseRejectedError(
            f"target {path} has format_version {meta.get('format_version')!r}; "
            f"this server understands {FORMAT_VERSION}"
        )
    kind = meta.get("kind")
    to_version = _int(meta.get("to_version"), f"{path}: to_version", minimum=1)
    if to_version != int(match.group(1)):
        raise ReleaseRejectedError(
            f"target {path} is under adapters/{match.group(1)}/ but its to_version is {to_version}"
        )
    from_raw = meta.get("from_version")
    if kind == ReleaseKind.FULL:
        if from_raw is not None:
            raise ReleaseRejectedError(f"full bundle {path} must have from_version null")
        from_version = None
    elif kind == "delta":
        from_version = _int(from_raw, f"{path}: from_version")
        if from_version >= to_version:
            raise ReleaseRejectedError(f"delta {path} goes from v{from_version} to v{to_version}")
    else:
        raise ReleaseRejectedError(f"target {path} has kind {kind!r}; expected full or delta")
    fingerprint = meta.get("base_fingerprint")
    if not isinstance(fingerprint, str) or not FINGERPRINT_RE.match(fingerprint):
        raise ReleaseRejectedError(f"target {path} has no sha256:<hex> base_fingerprint")
    compatible = _compatible_bases(path, fingerprint, meta)
    return BundleTarget(
        path=path,
        length=_int(length, f"{path}: length", minimum=1),
        hashes=dict(hashes),
        kind=kind,
        from_version=from_version,
        to_version=to_version,
        base_fingerprint=fingerprint,
        release_counter=_int(meta.get("release_counter"), f"{path}: release_counter"),
        uncompressed_bytes=_int(meta.get("uncompressed_bytes"), f"{path}: uncompressed_bytes"),
        compatible_bases=compatible,
        privacy=_privacy(path, meta),
    )


def _privacy(path: str, meta: dict[str, Any]) -> PrivacySpend | None:
    if "privacy" not in meta:
        return None
    try:
        return PrivacySpend.from_json(meta["privacy"])
    except ValueError as e:
        raise ReleaseRejectedError(f"target {path}: {e}") from e


def release_gate_violation(policy: PrivacyPolicy, bundle: BundleTarget) -> str | None:
    """Why the operator's privacy policy refuses ``bundle``, naming the numbers, or None.

    E.g. ``release v7 spent record-level ε=9.1 > policy max_record_epsilon=8``.
    """
    if not policy.is_set:
        return None
    why = privacy_violation(policy, bundle.privacy)
    return None if why is None else f"release v{bundle.to_version} {why}"


def _compatible_bases(path: str, primary: str, meta: dict[str, Any]) -> tuple[str, ...]:
    if "compatible_bases" not in meta:
        return ()
    bases = meta["compatible_bases"]
    if (
        not isinstance(bases, list)
        or not 0 < len(bases) <= MAX_COMPATIBLE_BASES
        or not all(isinstance(b, str) and FINGERPRINT_RE.match(b) for b in bases)
        or bases != sorted(set(bases))
        or primary in bases
    ):
        raise ReleaseRejectedError(
            f"target {path}: compatible_bases must be 1..{MAX_COMPATIBLE_BASES} sorted, "
            "unique sha256:<hex> fingerprints other than base_fingerprint (or be omitted)"
        )
    return tuple(bases)


@dataclass(frozen=True)
class DeviceCapabilities:
    """What the device's runtime can apply."""

    supports_delta: bool = True
    format_versions: tuple[int, ...] = (FORMAT_VERSION,)
    runtime: str = ""


@dataclass(frozen=True)
class DeviceReport:
    """State a device reports at enrollment and with every check (authoritative)."""

    base_fingerprint: str
    installed_version: int | None
    capabilities: DeviceCapabilities
    memory_budget_bytes: int


@dataclass(frozen=True)
class TelemetryEvent:
    """An outcome a device reports. ``seq`` is the device's own monotonic counter."""

    event_id: str
    seq: int
    type: str  # "installed" | "failed" | "retry" (ADR 0007)
    version: int
    installed_version: int | None
    detail: str = ""
    golden_loss: float | None = None  # the new adapter's, measured by the health check
    previous_golden_loss: float | None = None  # the replaced adapter's


@dataclass(frozen=True)
class RolloutSpec:
    """What an operator asks for when creating a rollout (``base_fingerprint``: any base
    the version's bundles name; the rollout reaches every base named with it)."""

    base_fingerprint: str
    to_version: int
    stages: tuple[int, ...]
    max_failure_rate: float
    min_reports: int
    # quality gate (ADR 0014): a stage advances only if the mean golden-prompt loss its
    # devices report for the new adapter is at most (1 + tolerance) x the mean loss they
    # report for the adapter it replaces; None: no quality gate
    quality_tolerance: float | None = None
    # a stage smaller than min_reports needs ceil(fraction x its devices), at least 1
    min_reports_fraction: float = 1.0


@dataclass(frozen=True)
class StageStats:
    """Outcomes reported by the devices a stage owns, and the quality they measured:
    mean golden-prompt loss of the new and of the replaced adapter over the
    ``quality_reports`` reports that carry both (``None`` when there are none)."""

    percent: int
    installed: int
    failed: int
    quality_reports: int = 0
    golden_loss: float | None = None
    previous_golden_loss: float | None = None


@dataclass(frozen=True)
class RolloutView:
    """A rollout as operators see it."""

    id: int
    base_fingerprint: str
    to_version: int
    stages: tuple[int, ...]
    stage_index: int
    state: str
    pause_reason: str | None
    max_failure_rate: float
    min_reports: int
    stage_stats: tuple[StageStats, ...]
    quality_tolerance: float | None = None
    min_reports_fraction: float = 1.0
    progress: str = ""  # why it stands where it does ("waiting: 3/5 reports")


def bucket_of(salt: str, device_id: str) -> int:
    """Deterministic bucket in ``[0, BUCKETS)`` of a device within one rollout."""
    digest = hashlib.sha256(f"{salt}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def stage_of(stages: tuple[int, ...], bucket: int) -> int:
    """Index of the first stage whose percentage covers ``bucket``."""
    for index, percent in enumerate(stages):
        if bucket < percent * BUCKETS // 100:
            return index
    return len(stages)  # not reached by any stage (only when the last stage is < 100)


def select_target(
    report: DeviceReport,
    *,
    assigned_version: int | None,
    failed_versions: frozenset[int],
    candidates: list[BundleTarget],
) -> BundleTarget | None:
    """The bundle that moves this device to its assigned version, or None.

    Never a bundle that does not name the device's base (as its primary or a compatible
    base), never a downgrade or a re-install, never a version the device reported as
    failed, and never a delta whose ``from_version`` is not exactly what the device has
    installed (else the full bundle) — so a device is never handed a chain.
    """
    if assigned_version is None or assigned_version in failed_versions:
        return None
    if FORMAT_VERSION not in report.capabilities.format_versions:
        return None
    installed = report.installed_version
    if installed is not None and assigned_version <= installed:
        return None
    usable = [
        t
        for t in candidates
        if t.applies_to(report.base_fingerprint) and t.to_version == assigned_version
    ]
    if report.capabilities.supports_delta and installed is not None:
        for target in usable:
            if target.kind == "delta" and target.from_version == installed:
                return target
    fulls = [t for t in usable if t.kind == ReleaseKind.FULL]
    return fulls[0] if fulls else None
