"""The simulated fleet: profiles drawn from tiers, polls in simulated time, outcomes.

``Fleet.sweep`` is one round of the fleet after a release: every online device polls;
after each sweep the simulated clock moves one poll interval and the fleet reads the
rollout. When a sweep brings no offer and the rollout is active below its last stage,
the operator advances it (a stage whose reachable devices have all reported) — unless
the stage is failing with too few reports for the server to judge, then the fleet keeps
polling; a paused rollout ends the round. Download time is simulated from the bytes a
device actually received and its tier's bandwidth; install events carry that time for
the adoption plot.

Memory stays flat in the number of devices: a device is a profile, a directory on disk
and a few integers; runtimes are shared per tier (``simulation.fleet.runtimes``).
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from protocol import relaxed_durability
from simulation.fleet.bases import FleetBases
from simulation.fleet.config import FleetConfig, Tier
from simulation.fleet.device import (
    ByteCounter,
    DeviceProfile,
    PollResult,
    PollStatus,
    SimDevice,
    consistency,
)
from simulation.fleet.faults import KILL_STEPS, CorruptingMirror, DeviceFault
from simulation.fleet.ota_client import Endpoint, Operator
from simulation.fleet.runtimes import RuntimePool

__all__ = ["Fleet", "RuntimeStats", "SweepResult", "draw_profiles"]

logger = logging.getLogger(__name__)
# The planted faults in the order of their FaultShares (each device has at most one).
FAULTS = (DeviceFault.KILLED, DeviceFault.MIRROR, DeviceFault.OTHER_BASE, DeviceFault.FAR_BEHIND)


def draw_profiles(cfg: FleetConfig) -> list[DeviceProfile]:
    """Deterministic profiles: tiers by share, faults on disjoint random subsets.

    A fault with a positive share hits at least one device (so small fleets test it).
    """
    rng = np.random.default_rng([cfg.seed, 11])
    shares = np.array([t.share for t in cfg.tiers], dtype=float)
    tiers = rng.choice(len(cfg.tiers), size=cfg.devices, p=shares / shares.sum())
    order = list(rng.permutation(cfg.devices))
    f = cfg.faults
    wanted = dict(
        zip(
            FAULTS,
            (f.killed_mid_apply, f.corrupted_mirror, f.other_base, f.far_behind),
            strict=True,
        )
    )
    faults: dict[int, DeviceFault] = {}
    for name, share in wanted.items():
        count = 0 if share <= 0 else max(1, round(share * cfg.devices))
        for _ in range(count):
            if len(order) <= 1:  # keep at least one healthy device
                break
            faults[int(order.pop())] = name
    profiles = []
    for i in range(cfg.devices):
        fault = faults.get(i, DeviceFault.NONE)
        step = KILL_STEPS[i % len(KILL_STEPS)] if fault == DeviceFault.KILLED else None
        profiles.append(DeviceProfile(i, cfg.tiers[int(tiers[i])], fault, step))
    return profiles


@dataclass
class SweepResult:
    """What the fleet did after one release."""

    polls: int = 0
    offers: int = 0
    updated: int = 0
    rolled_back: int = 0
    rejected: int = 0
    operator_advances: int = 0
    paused: bool = False


@dataclass
class RuntimeStats:
    """Outcomes of the phones on one runtime (``summary.json`` ``fleet.runtimes``)."""

    updates: int = 0
    rollbacks: int = 0
    rejections: int = 0
    apply_ms: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    budget_violations: int = 0
    heldout_losses: list[float] = field(default_factory=list)

    def record_peak(self, peak_bytes: int) -> None:
        """One measured peak of a phone of this runtime (health check or evaluation)."""
        self.peak_bytes = max(self.peak_bytes, peak_bytes)


@dataclass
class _Stats:
    updated_devices: set[int] = field(default_factory=set)
    failed_devices: set[int] = field(default_factory=set)
    rolled_back_devices: set[int] = field(default_factory=set)
    rejections: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    killed: dict[int, str] = field(default_factory=dict)
    killed_inconsistent: int = 0
    other_base_offered: int = 0
    update_kinds: Counter[str] = field(default_factory=Counter)
    far_behind_last_full: dict[int, bool] = field(default_factory=dict)
    apply_ms: list[float] = field(default_factory=list)
    bytes_downloaded: int = 0
    downloads: int = 0
    peak_by_tier: dict[str, int] = field(default_factory=dict)
    budget_violations: int = 0
    evals: list[dict[str, Any]] = field(default_factory=list)
    installs: list[tuple[float, int, int]] = field(default_factory=list)  # (t_s, device, v)
    by_runtime: dict[str, RuntimeStats] = field(default_factory=dict)


def _stage_healthy(view: dict[str, Any]) -> bool:
    """The current stage's failure rate is within the rollout's threshold."""
    stats = view["stage_stats"][view["stage_index"]]
    total = int(stats["installed"]) + int(stats["failed"])
    return total == 0 or int(stats["failed"]) / total <= float(view["max_failure_rate"])


def _may_advance(view: dict[str, Any]) -> bool:
    """What the operator checks before starting the next stage by hand: the rollout is
    active, below its last stage, and the current stage is not failing (a failing stage
    with too few reports for the server to judge is never pushed further)."""
    last = view["stage_index"] + 1 >= len(view["stages"])
    return view["state"] == "active" and not last and _stage_healthy(view)


class Fleet:
    """Every simulated device of one run.

    Args:
        cfg: The fleet configuration.
        work_dir: Device state directories live under ``work_dir/devices``.
        endpoint: The OTA server.
        bases: The bases devices hold.
        trusted_root: The TUF root devices are provisioned with.
        golden: Golden prompts provisioned on every device.
        heldout: Device index -> its held-out texts (full mode only).
        pool: Shared runtimes.
    """

    def __init__(
        self,
        cfg: FleetConfig,
        *,
        work_dir: Path,
        endpoint: Endpoint,
        bases: FleetBases,
        trusted_root: bytes,
        golden: Sequence[str],
        heldout: Callable[[int], Sequence[str]],
        pool: RuntimePool,
    ) -> None:
        self.cfg = cfg
        self.endpoint = endpoint
        self.bases = bases
        self.golden = list(golden)
        self.heldout = heldout
        self.pool = pool
        self.clock_s = 0.0
        self.stats = _Stats()
        self.rounds_seen = 0
        self.profiles = draw_profiles(cfg)
        self.devices = [
            SimDevice(
                p,
                work_dir / "devices" / p.name,
                bases.held_by(p.tier.runtime, other=p.fault == DeviceFault.OTHER_BASE),
            )
            for p in self.profiles
        ]
        for runtime in cfg.runtimes:
            self.stats.by_runtime[runtime] = RuntimeStats()
        self.versions: list[int | None] = [None] * cfg.devices
        self._counter = ByteCounter(httpx.HTTPTransport())
        self._mirror = CorruptingMirror(httpx.HTTPTransport())
        self._mirror_counter = ByteCounter(self._mirror)
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        self._http = httpx.Client(
            base_url=endpoint.url, transport=self._counter, timeout=60.0, limits=limits
        )
        self._mirror_http = httpx.Client(
            base_url=endpoint.url, transport=self._mirror_counter, timeout=60.0
        )
        self._rng = np.random.default_rng([cfg.seed, 23])
        self._trusted_root = trusted_root
        self.digests: dict[int, str] = {}  # version -> device-exact digest (orchestrator)
        self.full_bytes: dict[int, int] = {}  # version -> size of its full bundle
        # With several LoRA ranks (ADR 0016), the same two per rank: a phone of rank r
        # holds the rank-r adapter of each version.
        self.rank_digests: dict[int, dict[int, str]] = {}
        self.rank_full_bytes: dict[int, dict[int, int]] = {}

    def enroll_all(self) -> None:
        """Enroll every device (real ``POST /v1/devices``).

        Raises:
            UpdateRejectedError: the enrollment secret was refused.
            UpdateTransientError: the server is unavailable.
        """
        for dev in self.devices:
            dev.enroll(
                self._http,
                server_url=self.endpoint.url,
                trusted_root=self._trusted_root,
                secret=self.endpoint.enrollment_secret,
                golden=self.golden,
            )
        logger.info("enrolled %d devices", len(self.devices))

    def _online(self, dev: SimDevice, *, final: bool) -> bool:
        if final:
            return True
        if dev.profile.fault == DeviceFault.FAR_BEHIND:
            return self.rounds_seen == 1  # online for the first release only
        return bool(self._rng.random() < dev.profile.tier.availability)

    def _digests_of(self, dev: SimDevice) -> dict[int, str]:
        rank = dev.profile.tier.lora_rank
        return self.digests if rank is None else self.rank_digests.get(rank, {})

    def _full_bytes_of(self, dev: SimDevice) -> dict[int, int]:
        rank = dev.profile.tier.lora_rank
        return self.full_bytes if rank is None else self.rank_full_bytes.get(rank, {})

    def sweep(
        self,
        operator: Operator,
        rollout_ids: Sequence[int],
        *,
        round: int,
        final: bool = False,
    ) -> SweepResult:
        """Let the fleet poll until the rollouts are done, paused, or ``max_polls_per_round``.

        Args:
            operator: Reads (and advances) the rollouts.
            rollout_ids: The rollouts of the newest release (one per LoRA rank when the
                fleet runs several; ``Release.rollout_ids``).
            round: Training round (for the records).
            final: Catch-up sweep: every device online (also the far-behind ones).

        Raises:
            RemoteRejectedError: the server refused an operator call.
        """
        if not final:
            self.rounds_seen += 1
        self._mirror.active = self.rounds_seen == 1 and not final
        out = SweepResult()
        polls = self.cfg.max_polls_per_round * (2 if final else 1)
        for _ in range(polls):
            offers = 0
            for i, dev in enumerate(self.devices):
                if not self._online(dev, final=final):
                    continue
                result = self._poll(i, dev)
                offers += int(result.offered)
                out.updated += int(result.status == PollStatus.UPDATED)
                out.rolled_back += int(result.status == PollStatus.ROLLED_BACK)
                out.rejected += int(result.status == PollStatus.REJECTED)
            out.polls += 1
            out.offers += offers
            self.clock_s += self.cfg.poll_interval_s
            views = {rid: operator.rollout(rid) for rid in rollout_ids}
            if any(v["state"] == "paused" for v in views.values()):
                out.paused = True
                break
            if offers:
                continue
            advance = [rid for rid, v in views.items() if _may_advance(v)]
            for rid in advance:
                operator.action(rid, "advance")
            out.operator_advances += len(advance)
            if not advance and (final or all(_stage_healthy(v) for v in views.values())):
                break  # nothing left to offer to anyone online
            # else: failures below min_reports in a stage: wait for more reports
        logger.info("round %d sweep: %s", round, out)
        return out

    def _poll(self, i: int, dev: SimDevice) -> PollResult:
        mirror = dev.profile.fault == DeviceFault.MIRROR and self._mirror.active
        http = self._mirror_http if mirror else self._http
        counter = self._mirror_counter if mirror else self._counter
        digests = self._digests_of(dev)
        # Lightweight fleets model process kills, not power cuts: writes stay atomic
        # (temp + rename) but skip fsync, which otherwise dominates at 10,000 phones.
        durability = relaxed_durability() if self.cfg.lightweight else nullcontext()
        with durability:
            result = dev.poll(http, self.pool, digests, golden=self.golden, counter=counter)
        s = self.stats
        per_runtime = s.by_runtime[dev.profile.tier.runtime]
        s.bytes_downloaded += result.bytes_downloaded
        s.downloads += int(result.bytes_downloaded > 0)
        if dev.profile.fault == DeviceFault.OTHER_BASE and result.offered:
            s.other_base_offered += 1
        if result.killed_at is not None:
            s.killed[i] = result.killed_at
            s.killed_inconsistent += int(not result.killed_state_ok)
        if result.health_peak_bytes is not None:
            name = dev.profile.tier.name
            s.peak_by_tier[name] = max(s.peak_by_tier.get(name, 0), result.health_peak_bytes)
            per_runtime.record_peak(result.health_peak_bytes)
        if result.status == PollStatus.ROLLED_BACK:
            s.rolled_back_devices.add(i)
            per_runtime.rollbacks += 1
        elif result.status == PollStatus.REJECTED:
            s.failed_devices.add(i)
            s.rejections[result.reason] += 1
            per_runtime.rejections += 1
        elif result.status == PollStatus.RETRY:  # not the release's fault: it stays offered
            s.retries[result.reason] += 1
        elif result.status == PollStatus.UPDATED and result.version is not None:
            s.updated_devices.add(i)
            per_runtime.updates += 1
            full = result.bytes_downloaded == self._full_bytes_of(dev).get(result.version)
            s.update_kinds["full" if full else "delta"] += 1
            if dev.profile.fault == DeviceFault.FAR_BEHIND:
                s.far_behind_last_full[i] = full
            if result.apply_ms is not None:
                s.apply_ms.append(result.apply_ms)
                per_runtime.apply_ms.append(result.apply_ms)
            t = self.clock_s + result.bytes_downloaded / dev.profile.tier.bandwidth_bps
            s.installs.append((t, i, result.version))
            if not self.cfg.lightweight:
                self._evaluate(i, dev, result.version)
        self.versions[i] = result.version
        return result

    def _evaluate(self, i: int, dev: SimDevice, version: int) -> None:
        """The device evaluates its new adapter on its own held-out text, in budget."""
        active = dev.state.active()
        if active is None:
            return
        adapter = dev.state.read_slot(active.slot)
        config = dev.state.read_shape(active.slot)
        tier: Tier = dev.profile.tier
        got = self.pool.evaluate(
            dev.base.path,
            tier.budget_bytes,
            dict(adapter.tensors),
            config,
            list(self.heldout(i)),
            version=version,
        )
        over = got.peak_bytes > tier.budget_bytes
        self.stats.budget_violations += int(over)
        peak = self.stats.peak_by_tier.get(tier.name, 0)
        self.stats.peak_by_tier[tier.name] = max(peak, got.peak_bytes)
        per_runtime = self.stats.by_runtime[tier.runtime]
        per_runtime.record_peak(got.peak_bytes)
        per_runtime.budget_violations += int(over)
        per_runtime.heldout_losses.append(got.loss)
        self.stats.evals.append(
            {
                "device": i,
                "tier": tier.name,
                "runtime": tier.runtime,
                "version": version,
                "loss": got.loss,
                "accuracy": got.accuracy,
                "peak_bytes": got.peak_bytes,
                "budget_bytes": tier.budget_bytes,
            }
        )

    def mixed_states(self) -> list[tuple[int, str]]:
        """Devices whose state is not exactly one released adapter (with why)."""
        bad = []
        for i, dev in enumerate(self.devices):
            why = consistency(dev.state, self._digests_of(dev))
            if why is not None:
                bad.append((i, why))
        return bad

    def apply_ms_p50(self) -> float | None:
        """Median stage → commit time over every committed update."""
        return statistics.median(self.stats.apply_ms) if self.stats.apply_ms else None

    def close(self) -> None:
        """Close the HTTP clients."""
        self._http.close()
        self._mirror_http.close()
