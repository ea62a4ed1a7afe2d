"""The ``fleet`` and ``rollouts`` parts of ``summary.json`` (schema: docs/simulate.md).

``mixed_state`` and ``budget_violations`` must be 0; ``healthy_not_on_latest`` must be
0 after the catch-up sweep; ``other_base_offered`` must be 0 (C12).
"""

from __future__ import annotations

import statistics
from typing import Any

from simulation.fleet.fleet import Fleet
from simulation.fleet.publisher import Publisher
from simulation.fleet.server import Operator

__all__ = ["fleet_summary", "rollouts_summary"]


def fleet_summary(fleet: Fleet, publisher: Publisher, *, full_model_bytes: int) -> dict[str, Any]:
    """Outcomes over the whole run, read from the devices' state directories."""
    s = fleet.stats
    mixed = fleet.mixed_states()
    latest = publisher.last_good.version if publisher.last_good else None
    finals: list[int | None] = []
    for dev in fleet.devices:
        active = dev.state.active() if not any(i == dev.profile.index for i, _ in mixed) else None
        finals.append(active.version if active else None)
    healthy = [p.index for p in fleet.profiles if p.fault != "other_base"]
    not_latest = [i for i in healthy if finals[i] != latest]
    faults: dict[str, int] = {}
    for p in fleet.profiles:
        faults[p.fault] = faults.get(p.fault, 0) + 1
    per_version: dict[str, int] = {}
    for v in finals:
        key = "none" if v is None else str(v)
        per_version[key] = per_version.get(key, 0) + 1
    tiers = {
        t.name: {
            "devices": sum(p.tier.name == t.name for p in fleet.profiles),
            "budget_bytes": t.budget_bytes,
            "bandwidth_bps": t.bandwidth_bps,
            "availability": t.availability,
            "runtime": t.runtime,
            "peak_memory_bytes_max": s.peak_by_tier.get(t.name),
        }
        for t in fleet.cfg.tiers
    }
    runtimes = {
        name: {
            "devices": sum(p.tier.runtime == name for p in fleet.profiles),
            "base_fingerprint": fleet.bases.held_by(name).fingerprint,
            "updates": r.updates,
            "rollbacks": r.rollbacks,
            "rejections": r.rejections,
            "apply_ms_p50": statistics.median(r.apply_ms) if r.apply_ms else None,
            "peak_memory_bytes_max": r.peak_bytes or None,
            "budget_violations": r.budget_violations,
            "heldout_loss_mean": statistics.fmean(r.heldout_losses) if r.heldout_losses else None,
        }
        for name, r in sorted(s.by_runtime.items())
    }
    bundle_size = publisher.releases[-1].bundles[None] if publisher.releases else 0
    return {
        "devices": len(fleet.devices),
        "updated": len(s.updated_devices),
        "failed": len(s.failed_devices),
        "rolled_back": len(s.rolled_back_devices),
        "mixed_state": len(mixed),
        "budget_violations": s.budget_violations,
        "apply_ms_p50": fleet.apply_ms_p50(),
        "peak_memory_bytes_max": max(s.peak_by_tier.values(), default=None),
        "bytes_downloaded": s.bytes_downloaded,
        "bytes_if_full_model": s.downloads * (full_model_bytes + bundle_size),
        "downloads": s.downloads,
        "latest_good_version": latest,
        "healthy_devices": len(healthy),
        "healthy_on_latest": len(healthy) - len(not_latest),
        "healthy_not_on_latest": len(not_latest),
        "other_base_offered": s.other_base_offered,
        "updates_by_bundle": dict(s.update_kinds),
        "far_behind_caught_up_with_full": sum(s.far_behind_last_full.values()),
        "killed_mid_apply": len(s.killed),
        "killed_inconsistent_before_restart": s.killed_inconsistent,
        "rejections": dict(s.rejections),
        "retries": dict(s.retries),
        "final_versions": per_version,
        "faults": faults,
        "tiers": tiers,
        "runtimes": runtimes,
        "lightweight": fleet.cfg.lightweight,
        "inferences": fleet.pool.inferences,
        "simulated_time_s": fleet.clock_s,
        "mixed_examples": [f"device {i}: {why}" for i, why in mixed[:5]],
    }


def rollouts_summary(publisher: Publisher, operator: Operator) -> list[dict[str, Any]]:
    """Per release: stages reached, paused or not, and what rolled it back."""
    out = []
    rollback_of: dict[int, int] = {}
    for prev, rel in zip(publisher.releases, publisher.releases[1:], strict=False):
        if rel.kind == "rollback" and prev.kind == "bad":
            rollback_of[prev.version] = rel.version
    for rel in publisher.releases:
        view = operator.rollout(rel.rollout_id)
        events = operator.events(rel.rollout_id)
        reached = int(view["stage_index"]) + 1
        out.append(
            {
                "version": rel.version,
                "round": rel.round,
                "kind": rel.kind,
                "rollout_id": rel.rollout_id,
                "stages": list(view["stages"]),
                "stages_reached": reached,
                "percent_reached": view["stages"][reached - 1],
                "state": view["state"],
                "paused": any(e["action"] in ("auto_pause", "pause") for e in events),
                "auto_paused": any(e["action"] == "auto_pause" for e in events),
                "pause_reason": view.get("pause_reason"),
                "installed": sum(int(s["installed"]) for s in view["stage_stats"]),
                "failed": sum(int(s["failed"]) for s in view["stage_stats"]),
                "rolled_back_by": rollback_of.get(rel.version),
                "golden_loss": rel.golden_loss,
                "bundle_bytes": rel.primary_bytes,
                "full_bundle_bytes": rel.bundles[None],
            }
        )
    return out
