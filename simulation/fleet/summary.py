"""The ``fleet``, ``rollouts`` and ``ota_rounds`` parts of ``summary.json`` (schema:
docs/simulate.md), as frozen records; their ``to_dict()`` is the JSON.

``mixed_state`` and ``budget_violations`` must be 0; ``healthy_not_on_latest`` must be
0 after the catch-up sweep; ``other_base_offered`` must be 0 (C12).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from simulation.fleet.faults import DeviceFault
from simulation.fleet.fleet import Fleet
from simulation.fleet.ota_client import Operator
from simulation.fleet.publisher import Publisher, Release, ReleaseRole
from simulation.fleet.rank_release import RankedPublisher
from simulation.json_form import JsonRecord, json_form

__all__ = [
    "FleetOutcome",
    "FleetSummary",
    "OtaRoundSummary",
    "RolloutSummary",
    "RuntimeSummary",
    "TierSummary",
    "fleet_outcome",
    "fleet_summary",
    "rollouts_summary",
]


@dataclass(frozen=True)
class TierSummary(JsonRecord):
    """``fleet.tiers.<name>``: a tier's phones, budget, network and measured peak."""

    devices: int
    budget_bytes: int
    bandwidth_bps: float
    availability: float
    runtime: str
    peak_memory_bytes_max: int | None
    lora_rank: int | None = None  # with several LoRA ranks (ADR 0016)


@dataclass(frozen=True)
class RuntimeSummary(JsonRecord):
    """``fleet.runtimes.<name>``: the outcomes of the phones on one runtime."""

    devices: int
    base_fingerprint: str
    updates: int
    rollbacks: int
    rejections: int
    apply_ms_p50: float | None
    peak_memory_bytes_max: int | None
    budget_violations: int
    heldout_loss_mean: float | None


@dataclass(frozen=True)
class FleetSummary(JsonRecord):
    """``fleet``: outcomes over the whole run, read from the devices' state directories."""

    devices: int
    updated: int
    failed: int
    rolled_back: int
    mixed_state: int
    budget_violations: int
    apply_ms_p50: float | None
    peak_memory_bytes_max: int | None
    bytes_downloaded: int
    bytes_if_full_model: int
    downloads: int
    latest_good_version: int | None
    healthy_devices: int
    healthy_on_latest: int
    healthy_not_on_latest: int
    other_base_offered: int
    updates_by_bundle: Mapping[str, int]
    far_behind_caught_up_with_full: int
    killed_mid_apply: int
    killed_inconsistent_before_restart: int
    rejections: Mapping[str, int]
    retries: Mapping[str, int]
    final_versions: Mapping[str, int]  # "none" for a phone without an adapter
    faults: Mapping[DeviceFault, int]
    tiers: Mapping[str, TierSummary]
    runtimes: Mapping[str, RuntimeSummary]
    lightweight: bool
    inferences: int
    simulated_time_s: float
    mixed_examples: tuple[str, ...]


@dataclass(frozen=True)
class RolloutSummary(JsonRecord):
    """``rollouts[]``: one release, the stages its rollout reached, and what rolled it back."""

    version: int
    round: int
    kind: ReleaseRole
    rollout_id: int
    stages: tuple[int, ...]
    stages_reached: int
    percent_reached: int
    state: str
    paused: bool
    auto_paused: bool
    pause_reason: str | None
    installed: int
    failed: int
    rolled_back_by: int | None
    golden_loss: float
    bundle_bytes: int
    full_bundle_bytes: int
    # release gates (ADR 0014), added after the fields above
    stopped_by: str | None = None  # "health_check", "quality" or "operator" when paused
    quality_tolerance: float | None = None
    reported_golden_loss: float | None = None  # mean the phones measured for this release
    reported_previous_golden_loss: float | None = None  # ... for the adapter it replaced
    quality_reports: int = 0
    # heterogeneous LoRA ranks (ADR 0016): one rollout per rank and release
    lora_rank: int | None = None


@dataclass(frozen=True)
class OtaRoundSummary(JsonRecord):
    """``ota_rounds[]``: what the OTA half did after one training round."""

    round: int
    releases: tuple[int, ...]
    bundle_bytes: int
    adoption: float
    paused: bool
    planted: tuple[int, ...]


@dataclass(frozen=True)
class FleetOutcome:
    """The fleet's parts of ``summary.json`` once the OTA half has finished."""

    fleet: FleetSummary
    rollouts: tuple[RolloutSummary, ...]

    def to_dict(self) -> dict[str, Any]:
        """``{"fleet": {...}, "rollouts": [...]}``."""
        return {"fleet": self.fleet.to_dict(), "rollouts": json_form(self.rollouts)}


def _final_versions(fleet: Fleet, mixed: list[tuple[int, str]]) -> list[int | None]:
    """Each device's active version at the end (``None``: none, or a mixed state)."""
    mixed_devices = {i for i, _ in mixed}
    finals: list[int | None] = []
    for dev in fleet.devices:
        active = dev.state.active() if dev.profile.index not in mixed_devices else None
        finals.append(active.version if active else None)
    return finals


def _tiers(fleet: Fleet) -> dict[str, TierSummary]:
    peaks = fleet.stats.peak_by_tier
    return {
        t.name: TierSummary(
            devices=sum(p.tier.name == t.name for p in fleet.profiles),
            budget_bytes=t.budget_bytes,
            bandwidth_bps=t.bandwidth_bps,
            availability=t.availability,
            runtime=t.runtime,
            peak_memory_bytes_max=peaks.get(t.name),
            lora_rank=t.lora_rank,
        )
        for t in fleet.cfg.tiers
    }


def _runtimes(fleet: Fleet) -> dict[str, RuntimeSummary]:
    return {
        name: RuntimeSummary(
            devices=sum(p.tier.runtime == name for p in fleet.profiles),
            base_fingerprint=fleet.bases.held_by(name).fingerprint,
            updates=r.updates,
            rollbacks=r.rollbacks,
            rejections=r.rejections,
            apply_ms_p50=statistics.median(r.apply_ms) if r.apply_ms else None,
            peak_memory_bytes_max=r.peak_bytes or None,
            budget_violations=r.budget_violations,
            heldout_loss_mean=statistics.fmean(r.heldout_losses) if r.heldout_losses else None,
        )
        for name, r in sorted(fleet.stats.by_runtime.items())
    }


def fleet_summary(
    fleet: Fleet, publisher: Publisher | RankedPublisher, *, full_model_bytes: int
) -> FleetSummary:
    """Outcomes over the whole run, read from the devices' state directories."""
    s = fleet.stats
    mixed = fleet.mixed_states()
    latest = publisher.last_good.version if publisher.last_good else None
    finals = _final_versions(fleet, mixed)
    healthy = [p.index for p in fleet.profiles if p.fault != DeviceFault.OTHER_BASE]
    not_latest = [i for i in healthy if finals[i] != latest]
    bundle_size = publisher.releases[-1].bundles[None] if publisher.releases else 0
    return FleetSummary(
        devices=len(fleet.devices),
        updated=len(s.updated_devices),
        failed=len(s.failed_devices),
        rolled_back=len(s.rolled_back_devices),
        mixed_state=len(mixed),
        budget_violations=s.budget_violations,
        apply_ms_p50=fleet.apply_ms_p50(),
        peak_memory_bytes_max=max(s.peak_by_tier.values(), default=None),
        bytes_downloaded=s.bytes_downloaded,
        bytes_if_full_model=s.downloads * (full_model_bytes + bundle_size),
        downloads=s.downloads,
        latest_good_version=latest,
        healthy_devices=len(healthy),
        healthy_on_latest=len(healthy) - len(not_latest),
        healthy_not_on_latest=len(not_latest),
        other_base_offered=s.other_base_offered,
        updates_by_bundle=dict(s.update_kinds),
        far_behind_caught_up_with_full=sum(s.far_behind_last_full.values()),
        killed_mid_apply=len(s.killed),
        killed_inconsistent_before_restart=s.killed_inconsistent,
        rejections=dict(s.rejections),
        retries=dict(s.retries),
        final_versions=dict(Counter("none" if v is None else str(v) for v in finals)),
        faults=dict(Counter(p.fault for p in fleet.profiles)),
        tiers=_tiers(fleet),
        runtimes=_runtimes(fleet),
        lightweight=fleet.cfg.lightweight,
        inferences=fleet.pool.inferences,
        simulated_time_s=fleet.clock_s,
        mixed_examples=tuple(f"device {i}: {why}" for i, why in mixed[:5]),
    )


_STOPPED_BY = {"threshold": "health_check", "quality": "quality", "operator": "operator"}


def _reported_quality(stats: list[dict[str, Any]]) -> tuple[int, float | None, float | None]:
    """(paired reports, mean new loss, mean replaced loss) over every stage."""
    paired = [s for s in stats if s.get("quality_reports") and s.get("golden_loss") is not None]
    n = sum(int(s["quality_reports"]) for s in paired)
    if n == 0:
        return 0, None, None
    new = sum(int(s["quality_reports"]) * float(s["golden_loss"]) for s in paired) / n
    old = sum(int(s["quality_reports"]) * float(s["previous_golden_loss"]) for s in paired) / n
    return n, new, old


def _rollout(rel: Release, operator: Operator, rolled_back_by: int | None) -> RolloutSummary:
    view = operator.rollout(rel.rollout_id)
    actions = [e["action"] for e in operator.events(rel.rollout_id)]
    reached = int(view["stage_index"]) + 1
    paused = any(a in ("auto_pause", "pause") for a in actions)
    quality_reports, new_loss, old_loss = _reported_quality(view.get("stage_quality", []))
    return RolloutSummary(
        version=rel.version,
        round=rel.round,
        kind=rel.kind,
        rollout_id=rel.rollout_id,
        stages=tuple(view["stages"]),
        stages_reached=reached,
        percent_reached=view["stages"][reached - 1],
        state=view["state"],
        paused=paused,
        auto_paused=any(a == "auto_pause" for a in actions),
        pause_reason=view.get("pause_reason"),
        installed=sum(int(s["installed"]) for s in view["stage_stats"]),
        failed=sum(int(s["failed"]) for s in view["stage_stats"]),
        rolled_back_by=rolled_back_by,
        golden_loss=rel.golden_loss,
        bundle_bytes=rel.primary_bytes,
        full_bundle_bytes=rel.bundles[None],
        stopped_by=_STOPPED_BY.get(str(view.get("pause_reason"))) if paused else None,
        quality_tolerance=view.get("quality_tolerance"),
        reported_golden_loss=new_loss,
        reported_previous_golden_loss=old_loss,
        quality_reports=quality_reports,
        lora_rank=rel.lora_rank,
    )


def rollouts_summary(
    publisher: Publisher | RankedPublisher, operator: Operator
) -> tuple[RolloutSummary, ...]:
    """Per release (and LoRA rank): stages reached, paused or not, and what rolled it
    back."""
    rollback_of: dict[int, int] = {}
    for prev, rel in zip(publisher.releases, publisher.releases[1:], strict=False):
        if rel.kind == ReleaseRole.ROLLBACK and prev.kind == ReleaseRole.BAD:
            rollback_of[prev.version] = rel.version
    return tuple(
        _rollout(per_rank, operator, rollback_of.get(rel.version))
        for rel in publisher.releases
        for per_rank in rel.ranks
    )


def fleet_outcome(
    fleet: Fleet,
    publisher: Publisher | RankedPublisher,
    operator: Operator,
    *,
    full_model_bytes: int,
) -> FleetOutcome:
    """The ``fleet`` and ``rollouts`` parts of the summary."""
    return FleetOutcome(
        fleet=fleet_summary(fleet, publisher, full_model_bytes=full_model_bytes),
        rollouts=rollouts_summary(publisher, operator),
    )
