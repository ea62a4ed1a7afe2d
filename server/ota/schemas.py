"""HTTP request and response bodies (pydantic lives here and in settings only).

Every field is bounded (lengths, ranges, list sizes), so hostile bodies become 422s at
the edge and never reach the database as values it cannot store.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protocol import EventType, ReleaseKind
from server.ota.domain import (
    BundleTarget,
    DeviceCapabilities,
    DeviceReport,
    RolloutSpec,
    RolloutState,
    RolloutView,
    TelemetryEvent,
)
from server.ota.inventory import DeviceState, DeviceSummary

MAX_VERSION = 2**31 - 1
# A device's event counter: at most what every JSON parser holds exactly (2**53), which
# the BIGINT column stores with room to spare.
MAX_SEQ = 2**53
FINGERPRINT_PATTERN = r"^sha256:[0-9a-f]{64}$"
DEVICE_ID_PATTERN = r"^[0-9a-f]{32}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# Free text that is stored: no NUL (PostgreSQL text cannot hold it) and no other C0
# control characters except tab and newline.
TEXT_PATTERN = r"^[^\x00-\x08\x0b-\x1f\x7f]*$"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CapabilitiesIn(_In):
    supports_delta: bool = True
    format_versions: list[int] = Field(default=[1], min_length=1, max_length=8)
    runtime: str = Field(default="", max_length=64, pattern=TEXT_PATTERN)


class DeviceReportIn(_In):
    base_fingerprint: str = Field(pattern=FINGERPRINT_PATTERN)
    installed_version: int | None = Field(default=None, ge=0, le=MAX_VERSION)
    capabilities: CapabilitiesIn = Field(default_factory=CapabilitiesIn)
    memory_budget_bytes: int = Field(ge=0, le=2**62)

    def to_domain(self) -> DeviceReport:
        return DeviceReport(
            base_fingerprint=self.base_fingerprint,
            installed_version=self.installed_version,
            capabilities=DeviceCapabilities(
                supports_delta=self.capabilities.supports_delta,
                format_versions=tuple(self.capabilities.format_versions),
                runtime=self.capabilities.runtime,
            ),
            memory_budget_bytes=self.memory_budget_bytes,
        )


class EnrollIn(DeviceReportIn):
    enrollment_secret: str = Field(min_length=1, max_length=256)


class EnrollOut(BaseModel):
    device_id: str
    token: str


class TargetOut(BaseModel):
    path: str
    url: str = Field(description="Relative URL of the immutable, content-addressed bundle.")
    length: int
    hashes: dict[str, str]
    kind: ReleaseKind
    from_version: int | None
    to_version: int
    base_fingerprint: str
    compatible_bases: list[str] = Field(
        default_factory=list,
        description="Further base fingerprints the bundle applies to (e.g. GGUF exports); "
        "it is offered to devices holding base_fingerprint or any of these.",
    )
    release_counter: int
    uncompressed_bytes: int

    @classmethod
    def of(cls, target: BundleTarget) -> TargetOut:
        return cls(
            path=target.path,
            url=f"/tuf/targets/{target.url_path}",
            length=target.length,
            hashes=target.hashes,
            kind=ReleaseKind(target.kind),
            from_version=target.from_version,
            to_version=target.to_version,
            base_fingerprint=target.base_fingerprint,
            compatible_bases=list(target.compatible_bases),
            release_counter=target.release_counter,
            uncompressed_bytes=target.uncompressed_bytes,
        )


class CheckOut(BaseModel):
    update: TargetOut | None


class AssignmentOut(BaseModel):
    device_id: str
    base_fingerprint: str
    installed_version: int | None
    assigned_version: int | None
    failed_versions: list[int]
    revoked: bool


class TelemetryIn(_In):
    event_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    seq: int = Field(ge=0, le=MAX_SEQ)
    type: EventType
    version: int = Field(ge=1, le=MAX_VERSION)
    installed_version: int | None = Field(default=None, ge=0, le=MAX_VERSION)
    detail: str = Field(default="", max_length=500, pattern=TEXT_PATTERN)
    # the quality gate (ADR 0014): golden-prompt losses of the new and the replaced adapter
    golden_loss: float | None = Field(default=None, ge=0, le=1e6, allow_inf_nan=False)
    previous_golden_loss: float | None = Field(default=None, ge=0, le=1e6, allow_inf_nan=False)

    def to_domain(self) -> TelemetryEvent:
        return TelemetryEvent(
            event_id=self.event_id,
            seq=self.seq,
            type=self.type,
            version=self.version,
            installed_version=self.installed_version,
            detail=self.detail,
            golden_loss=self.golden_loss,
            previous_golden_loss=self.previous_golden_loss,
        )


class TelemetryOut(BaseModel):
    stored: bool = Field(description="False when this event id was already stored.")


class RolloutIn(_In):
    base_fingerprint: str = Field(pattern=FINGERPRINT_PATTERN)
    to_version: int = Field(ge=1, le=MAX_VERSION)
    stages: list[int] = Field(default=[1, 10, 50, 100], min_length=1, max_length=20)
    max_failure_rate: float = Field(default=0.2, ge=0.0, le=1.0)
    min_reports: int = Field(default=10, ge=1, le=1_000_000)
    quality_tolerance: float | None = Field(
        default=None,
        ge=0.0,
        le=10.0,
        allow_inf_nan=False,
        description="Quality gate: a stage advances only if its devices' mean golden-prompt "
        "loss for the new adapter is at most (1 + this) x their loss for the replaced one; "
        "otherwise the rollout pauses (reason quality). Omitted: no quality gate.",
    )
    min_reports_fraction: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="A stage that targets fewer devices than min_reports is judged after "
        "ceil(this x its devices) reports (at least 1); a stage with none passes at once.",
    )

    def to_domain(self) -> RolloutSpec:
        return RolloutSpec(
            base_fingerprint=self.base_fingerprint,
            to_version=self.to_version,
            stages=tuple(self.stages),
            max_failure_rate=self.max_failure_rate,
            min_reports=self.min_reports,
            quality_tolerance=self.quality_tolerance,
            min_reports_fraction=self.min_reports_fraction,
        )


class StageOut(BaseModel):
    percent: int
    installed: int
    failed: int


class StageQualityOut(BaseModel):
    """What a stage's devices measured (ADR 0014): mean golden-prompt loss of the new
    and of the replaced adapter over the reports that carry both."""

    quality_reports: int
    golden_loss: float | None
    previous_golden_loss: float | None


class RolloutOut(BaseModel):
    id: int
    base_fingerprint: str
    to_version: int
    stages: list[int]
    stage_index: int
    state: RolloutState
    pause_reason: str | None
    max_failure_rate: float
    min_reports: int
    stage_stats: list[StageOut]
    quality_tolerance: float | None = None
    stage_quality: list[StageQualityOut] = Field(default_factory=list)
    min_reports_fraction: float = 1.0
    progress: str = Field(
        default="", description="Why it stands where it does, e.g. 'waiting: 3/5 reports'."
    )

    @classmethod
    def of(cls, view: RolloutView) -> RolloutOut:
        return cls(
            id=view.id,
            base_fingerprint=view.base_fingerprint,
            to_version=view.to_version,
            stages=list(view.stages),
            stage_index=view.stage_index,
            state=view.state,  # type: ignore[arg-type]
            pause_reason=view.pause_reason,
            max_failure_rate=view.max_failure_rate,
            min_reports=view.min_reports,
            stage_stats=[
                StageOut(percent=s.percent, installed=s.installed, failed=s.failed)
                for s in view.stage_stats
            ],
            quality_tolerance=view.quality_tolerance,
            stage_quality=[
                StageQualityOut(
                    quality_reports=s.quality_reports,
                    golden_loss=s.golden_loss,
                    previous_golden_loss=s.previous_golden_loss,
                )
                for s in view.stage_stats
            ],
            min_reports_fraction=view.min_reports_fraction,
            progress=view.progress,
        )


class RolloutEventOut(BaseModel):
    action: str
    stage_index: int
    detail: str
    actor: str = Field(description="Who: <role>:<key id>, or system:<rule>.")
    at: dt.datetime


class InstalledVersionOut(BaseModel):
    base_fingerprint: str
    version: int | None
    devices: int


class FleetOut(BaseModel):
    installed: list[InstalledVersionOut]
    rollouts: list[RolloutOut]


class BlobOut(BaseModel):
    sha256: str
    length: int


class ReleaseOut(BaseModel):
    version: int
    snapshot_version: int
    targets: list[TargetOut]


class RootOut(BaseModel):
    version: int


class ErrorOut(BaseModel):
    error: str = Field(description="Machine-readable error class.")
    detail: str = Field(description="What was wrong and what to do.")


class HealthOut(BaseModel):
    status: str


# ---- the fleet inventory and the audit log --------------------------------------------


class DeviceOut(BaseModel):
    id: str
    base_fingerprint: str
    installed_version: int | None
    runtime: str
    memory_budget_bytes: int
    state: DeviceState = Field(
        description="stale: not seen for stale_after_s; else failed / retrying by its last "
        "outcome; else ok."
    )
    revoked: bool
    created_at: dt.datetime
    last_seen_at: dt.datetime
    last_outcome: str | None
    last_outcome_version: int | None
    last_outcome_reason: str
    last_outcome_at: dt.datetime | None

    @classmethod
    def of(cls, device: DeviceSummary) -> DeviceOut:
        return cls(**dataclasses.asdict(device))


class DevicePageOut(BaseModel):
    devices: list[DeviceOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: last.")


class HistoryEntryOut(BaseModel):
    event_id: str
    seq: int
    type: str
    version: int | None
    installed_version: int | None
    detail: str
    received_at: dt.datetime


class HistoryPageOut(BaseModel):
    device_id: str
    events: list[HistoryEntryOut]
    next_cursor: str | None


class AuditEntryOut(BaseModel):
    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


class AuditPageOut(BaseModel):
    entries: list[AuditEntryOut]
    next_cursor: str | None
