"""⑤–⑨ on one simulated phone: enroll, poll, download, verify, apply, check, report.

A ``SimDevice`` is a profile plus a real device state directory; every poll is one run
of the real update agent (``client.update.check_and_update``) against the real OTA
server. Nothing is held in memory between polls but a few numbers: the runtime is the
shared one of the device's tier (``simulation.fleet.runtimes``).

``consistency`` is the E20 invariant as the fleet checks it: the journal is idle, the
active pointer names a complete slot whose adapter is bit-identical to a released
version's device-exact adapter — exactly the old or exactly the new one, never a mix.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import httpx

from client.update import (
    GOLDEN_FILE,
    DeviceConfig,
    DeviceState,
    DeviceStateError,
    GoldenLossChecker,
    Retrier,
    RetryPolicy,
    UpdateBusyError,
    UpdateOutcome,
    UpdateRejectedError,
    UpdateRetryError,
    UpdateStatus,
    UpdateTransientError,
    api,
    check_and_update,
)
from delta_packager import rank_target
from simulation.fleet.bases import BaseCopy
from simulation.fleet.config import Tier
from simulation.fleet.faults import DeviceFault, KillAt, Killed
from simulation.fleet.runtimes import RuntimePool, adapter_digest

__all__ = ["ByteCounter", "DeviceProfile", "PollResult", "PollStatus", "SimDevice", "consistency"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceProfile:
    """Who a simulated phone is.

    Attributes:
        index: Position in the fleet (0-based).
        tier: Memory budget, bandwidth and availability.
        fault: The fault planted on it (``DeviceFault.NONE``: a healthy phone).
        kill_step: The agent step a ``killed`` device dies at on its first update.
    """

    index: int
    tier: Tier
    fault: DeviceFault = DeviceFault.NONE
    kill_step: str | None = None

    @property
    def name(self) -> str:
        """Stable label, e.g. ``dev-00042``."""
        return f"dev-{self.index:05d}"


class PollStatus(StrEnum):
    """How one poll of one device ended.

    The first three are the update agent's own outcomes (``UpdateOutcome.status``);
    the rest are the errors it raised, as the fleet counts them.
    """

    UPDATED = UpdateStatus.UPDATED.value
    NO_UPDATE = UpdateStatus.NO_UPDATE.value
    ROLLED_BACK = UpdateStatus.ROLLED_BACK.value
    REJECTED = "rejected"  # the release was refused (UpdateRejectedError)
    RETRY = "retry"  # a local or transport problem with an offered release (ADR 0007)
    TRANSIENT = "transient"  # the server was unavailable, or another update was running


@dataclass(frozen=True)
class PollResult:
    """What one poll of one device did.

    Attributes:
        status: How the poll ended.
        version: Active version afterwards (``None``: no adapter).
        offered: Whether the device was offered (and started) an update.
        reason: Rejection reason code or rollback reason.
        bytes_downloaded: Bundle bytes received during the poll (measured).
        apply_ms: Stage → commit wall time (includes the health check), if updated.
        killed_at: Step the updater was killed at (and then restarted), if any.
        killed_state_ok: After the kill, before the restart, state was consistent.
        health_peak_bytes: Peak memory the health check measured, if it ran.
    """

    status: PollStatus
    version: int | None
    offered: bool
    reason: str = ""
    bytes_downloaded: int = 0
    apply_ms: float | None = None
    killed_at: str | None = None
    killed_state_ok: bool = True
    health_peak_bytes: int | None = None


@dataclass
class _Timer:
    """Step hook that records when steps happen and optionally kills the updater."""

    kill: KillAt | None = None
    times: dict[str, float] = field(default_factory=dict)

    def __call__(self, step: str) -> None:
        self.times.setdefault(step, time.perf_counter())
        if self.kill is not None:
            self.kill(step)

    def apply_ms(self) -> float | None:
        start, end = self.times.get("stage"), self.times.get("commit")
        return None if start is None or end is None else (end - start) * 1000.0


def consistency(state: DeviceState, digests: dict[int, str], *, idle: bool = True) -> str | None:
    """Why the device is in a mixed state, or ``None`` when it is consistent.

    Args:
        state: The device state directory.
        digests: Released version -> device-exact adapter digest.
        idle: Also require the update journal to be idle (not right after a kill).
    """
    try:
        if idle and state.journal().get("step") != "idle":
            return f"journal at step {state.journal().get('step')}"
        active = state.active()
        if active is None:
            return None
        adapter = state.read_slot(active.slot)
    except DeviceStateError as e:
        return str(e)
    if adapter.version != active.version:
        return f"pointer says v{active.version}, slot {active.slot} holds v{adapter.version}"
    want = digests.get(active.version)
    if want is None or adapter_digest(dict(adapter.tensors)) != want:
        return f"slot {active.slot} does not hold released v{active.version} exactly"
    return None


class SimDevice:
    """One simulated phone with its state directory.

    Args:
        profile: The device's profile.
        root: Its state directory.
        base: The base it holds (a GGUF file on llama.cpp, an NF4 directory on NF4).
    """

    def __init__(self, profile: DeviceProfile, root: Path, base: BaseCopy) -> None:
        self.profile = profile
        self.state = DeviceState(root)
        self.base = base
        self.updates = 0
        self.last_eval_version: int | None = None

    def enroll(
        self,
        http: httpx.Client,
        *,
        server_url: str,
        trusted_root: bytes,
        secret: str,
        golden: list[str],
    ) -> None:
        """Enroll with the server and provision root, golden prompts and config.

        Raises:
            UpdateRejectedError: wrong enrollment secret.
            UpdateTransientError: the server is unavailable.
        """
        budget = self.profile.tier.budget_bytes
        rank = self.profile.tier.lora_rank
        # A phone of rank r asks for the bundles of its base at that rank (ADR 0016).
        target = self.base.fingerprint if rank is None else rank_target(self.base.fingerprint, rank)
        report = api.DeviceReport(target, None, budget)
        retrier = Retrier(RetryPolicy(budget_s=30.0))
        device_id, token = api.enroll(http, retrier, report=report, enrollment_secret=secret)
        self.state.tuf_dir.mkdir(parents=True, exist_ok=True)
        (self.state.tuf_dir / "root.json").write_bytes(trusted_root)
        (self.state.root / GOLDEN_FILE).write_text(json.dumps(golden))
        self.state.write_config(
            DeviceConfig(
                server_url=server_url,
                device_id=device_id,
                token=token,
                base_dir=str(self.base.path),
                base_fingerprint=target,
                memory_budget_bytes=budget,
                runtime=self.profile.tier.runtime,
                lora_rank=rank,
            )
        )

    def poll(
        self,
        http: httpx.Client,
        pool: RuntimePool,
        digests: dict[int, str],
        *,
        golden: list[str],
        counter: ByteCounter,
    ) -> PollResult:
        """Run the update agent once (and once more after an injected kill)."""
        tier = self.profile.tier
        checker = GoldenLossChecker(
            measure=pool.measure_fn(self.base.path, tier.budget_bytes, golden),
            budget_bytes=tier.budget_bytes,
        )
        before = counter.bytes
        kill = None
        if (
            self.profile.fault == DeviceFault.KILLED
            and self.updates == 0
            and self.profile.kill_step
        ):
            kill = KillAt(self.profile.kill_step)
        timer = _Timer(kill)
        killed_at, killed_ok = None, True
        retrier = Retrier(RetryPolicy(budget_s=20.0))
        try:
            try:
                outcome = check_and_update(
                    self.state, checker=checker, http=http, retrier=retrier, hook=timer
                )
            except Killed as k:
                killed_at = k.step
                killed_ok = consistency(self.state, digests, idle=False) is None
                timer.kill = None
                outcome = check_and_update(  # the restart
                    self.state, checker=checker, http=http, retrier=retrier, hook=timer
                )
        except UpdateRejectedError as e:
            return self._result(
                PollStatus.REJECTED, True, e.reason, counter.bytes - before, killed_at
            )
        except UpdateRetryError as e:
            return self._result(PollStatus.RETRY, True, e.reason, counter.bytes - before, killed_at)
        except (UpdateTransientError, UpdateBusyError) as e:
            logger.info("%s: transient: %s", self.profile.name, e)
            return self._result(
                PollStatus.TRANSIENT, False, str(e)[:120], counter.bytes - before, killed_at
            )
        return self._from_outcome(outcome, timer, counter.bytes - before, killed_at, killed_ok)

    def _result(
        self, status: PollStatus, offered: bool, reason: str, nbytes: int, killed_at: str | None
    ) -> PollResult:
        active = self.state.active()
        return PollResult(
            status,
            active.version if active else None,
            offered,
            reason,
            bytes_downloaded=nbytes,
            killed_at=killed_at,
        )

    def _from_outcome(
        self,
        outcome: UpdateOutcome,
        timer: _Timer,
        nbytes: int,
        killed_at: str | None,
        killed_ok: bool,
    ) -> PollResult:
        status = PollStatus(outcome.status)
        if status == PollStatus.UPDATED:
            self.updates += 1
        active = self.state.active()
        return PollResult(
            status=status,
            version=active.version if active else None,
            offered=status != PollStatus.NO_UPDATE or killed_at is not None,
            reason=outcome.reason if status == PollStatus.ROLLED_BACK else "",
            bytes_downloaded=nbytes,
            apply_ms=timer.apply_ms() if status == PollStatus.UPDATED else None,
            killed_at=killed_at,
            killed_state_ok=killed_ok,
            health_peak_bytes=outcome.health.peak_bytes if outcome.health else None,
        )


class ByteCounter(httpx.BaseTransport):
    """Counts bundle bytes received through a transport (one device polls at a time)."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.bytes = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path.startswith("/tuf/targets/"):
            body = response.read()
            response.close()
            self.bytes += len(body)
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                content=body,
                request=request,
            )
        return response

    def close(self) -> None:
        self.inner.close()
