"""The update agent: ``check → download → verify → stage → health check → commit or
roll back → report``, one persisted state machine (``STATE/journal.json``).

``check_and_update`` reads top to bottom. Journal steps and what a restart does:

=============  ===============================================================
``idle``       nothing in flight
``download``   partial file kept; the next run resumes it
``staged``     new adapter complete in the inactive slot: re-verify, health check
``health``     a check was running (``attempts`` counts them); after
               ``crash_loop_limit`` starts without an answer: roll back
``commit``     health passed: (re)swap the pointer, raise the floor, report
``committed``  reported; only cleanup is left
``rollback``   reported; only cleanup is left
=============  ===============================================================

The active pointer is swapped exactly once, after the health check passed, so a kill
anywhere leaves exactly the old or exactly the new adapter active (THREATS E20).
``hook(step)`` is called at every named step (crash tests kill the process there).
"""

from __future__ import annotations

import errno
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
from tuf.api.metadata import TargetFile

from client.update import api
from client.update.download import DownloadStats, download
from client.update.errors import (
    DeviceStateError,
    UpdateRejectedError,
    UpdateRetryError,
    UpdateTransientError,
)
from client.update.health import HealthChecker, HealthReport
from client.update.state import ActivePointer, DeviceConfig, DeviceState, JournalStep, StepHook
from client.update.telemetry import TelemetryQueue
from client.update.transport import Retrier
from client.update.verify import (
    VerifiedBundle,
    payload_url,
    refresh_metadata,
    reject_reason,
    select_target,
    verify_payload,
)
from delta_packager import (
    BundleRejectedError,
    PackagerError,
    apply_bundle,
    fingerprint_base,
    rank_target,
)
from protocol import EventType

__all__ = ["CRASH_LOOP_LIMIT", "UpdateOutcome", "UpdateStatus", "check_and_update"]

logger = logging.getLogger(__name__)
CRASH_LOOP_LIMIT = 3


class UpdateStatus(StrEnum):
    """How one update run ended."""

    UPDATED = "updated"  # a new (or repaired) adapter is active
    NO_UPDATE = "no_update"  # nothing newer is offered
    ROLLED_BACK = "rolled_back"  # the new adapter failed its health check


@dataclass(frozen=True)
class UpdateOutcome:
    """How a run ended: its :class:`UpdateStatus`, the version, and why."""

    status: UpdateStatus
    version: int | None
    reason: str = ""
    health: HealthReport | None = None


def _no_hook(step: str) -> None:
    del step


@dataclass(frozen=True)
class _Run:
    state: DeviceState
    config: DeviceConfig
    http: httpx.Client
    retrier: Retrier
    checker: HealthChecker
    hook: StepHook
    crash_loop_limit: int
    repairing: bool = False  # the active slot is damaged: restore it from a signed release

    @property
    def queue(self) -> TelemetryQueue:
        return TelemetryQueue(self.state.telemetry_dir)

    def report(self) -> api.DeviceReport:
        active = self.state.active()
        return api.DeviceReport(
            base_fingerprint=self.config.base_fingerprint,
            installed_version=active.version if active and not self.repairing else None,
            memory_budget_bytes=self.config.memory_budget_bytes,
        )

    def flush_telemetry(self) -> None:
        def post(event: dict[str, Any]) -> bool:
            return api.post_event(
                self.http,
                self.retrier,
                device_id=self.config.device_id,
                token=self.config.token,
                event=event,
            )

        self.queue.flush(post)

    def event(
        self,
        kind: str,
        version: int,
        event_id: str | None = None,
        quality: dict[str, float] | None = None,
        **detail: Any,
    ) -> None:
        active = self.state.active()
        self.queue.enqueue(
            kind,
            version=version,
            installed_version=active.version if active else None,
            detail=detail,
            event_id=event_id,
            quality=quality,
        )


def check_and_update(
    state: DeviceState,
    *,
    checker: HealthChecker,
    http: httpx.Client | None = None,
    retrier: Retrier | None = None,
    hook: StepHook | None = None,
    crash_loop_limit: int = CRASH_LOOP_LIMIT,
) -> UpdateOutcome:
    """Run one update cycle on the device whose state lives in ``state``.

    Args:
        state: The device state directory.
        checker: Health check a staged adapter must pass before it is committed.
        http: HTTP client (default: one for the enrolled server URL).
        retrier: Retry policy and budget for the whole run.
        hook: Called with each step name (tests).
        crash_loop_limit: Health-check starts without an answer before rolling back.

    Returns:
        The outcome (``updated``, ``no_update`` or ``rolled_back`` with the report).

    Raises:
        UpdateBusyError: another updater runs on this device.
        UpdateRejectedError: the offered release was refused (reason code attached); the
            server is told ``failed`` and stops offering it to this device.
        UpdateRetryError: disk full, or a payload that is not the signed one (truncated,
            swapped, corrupted on the way); the server is told ``retry`` and keeps
            offering the release (ADR 0007). Nothing was applied.
        UpdateTransientError: network/server trouble; nothing was applied.
        DeviceStateError: the state directory is not enrolled or is corrupt.
    """
    with state.lock():
        state.clean_stale()
        config = _current_base(state.read_config())
        own_http = http is None
        client = http or httpx.Client(base_url=config.server_url, timeout=30.0)
        try:
            run = _Run(
                state,
                config,
                client,
                retrier or Retrier(),
                checker,
                hook or _no_hook,
                crash_loop_limit,
            )
            resumed = _recover(run)
            try:
                run.flush_telemetry()
            except UpdateTransientError as e:
                logger.info("telemetry not flushed: %s", e)
            return resumed or _cycle(run)
        except OSError as e:  # the device's own storage failed (full, read-only, gone)
            raise UpdateTransientError(
                f"device storage error in {state.root}: {e}; the active adapter is exactly "
                "the old or the new one: free space or fix the disk and retry"
            ) from e
        finally:
            if own_http:
                client.close()


def _current_base(config: DeviceConfig) -> DeviceConfig:
    """The config with the fingerprint of the base actually on disk (C12, C13, I42): an
    NF4 checkpoint directory or a GGUF file."""
    try:
        fingerprint = fingerprint_base(config.base_dir)
        if config.lora_rank is not None:  # ADR 0016: the bundles of this base and rank
            fingerprint = rank_target(fingerprint, config.lora_rank)
    except PackagerError as e:
        raise DeviceStateError(
            f"cannot fingerprint the device's base model at {config.base_dir}: {e}"
        ) from e
    if fingerprint != config.base_fingerprint:
        logger.warning(
            "base model at %s changed since enrollment: now %s", config.base_dir, fingerprint
        )
    return replace(config, base_fingerprint=fingerprint)


def _cycle(run: _Run) -> UpdateOutcome:
    """One update run: ask, select and check the target, download, verify, then stage."""
    state = run.state
    damage = state.active_damage()
    if damage is not None:
        # Repair: ask for the release as a device without an adapter would (a full bundle),
        # verify it like any update and commit it to the other slot.
        logger.warning("the active adapter is damaged (%s): repairing it", damage)
        run = replace(run, repairing=True)
    config = run.config
    offer = api.check_for_update(
        run.http, run.retrier, device_id=config.device_id, token=config.token, report=run.report()
    )
    if offer is None:
        return _nothing_offered(run, damage)
    active = state.active()
    if active is not None and offer.to_version == active.version and not run.repairing:
        return UpdateOutcome(UpdateStatus.NO_UPDATE, active.version)  # a server behind our report
    target = _select(run, offer)
    version = int(target.custom["fedota"]["to_version"])
    journal: dict[str, Any] = {
        "step": JournalStep.DOWNLOAD,
        "version": version,
        "target": _target_json(target),
    }
    state.write_journal(journal)
    started = time.monotonic()
    bundle_path = state.downloads_dir / target.hashes["sha256"]
    stats = _download(run, target, version, bundle_path)
    timings = {"download_s": round(time.monotonic() - started, 3), "bytes": stats.received_bytes}
    run.hook("verify")
    verified = _verify(run, target, version, bundle_path)
    return _stage_and_commit(run, verified, journal, timings)


def _nothing_offered(run: _Run, damage: str | None) -> UpdateOutcome:
    """No release is offered: drop a partial download; a damaged adapter cannot be fixed.

    Raises:
        DeviceStateError: the active adapter is damaged and nothing can restore it.
    """
    state = run.state
    if state.journal().get("step") == JournalStep.DOWNLOAD:  # no longer offered
        for stale in state.downloads_dir.glob("*"):
            stale.unlink(missing_ok=True)
        state.write_journal({"step": JournalStep.IDLE})
    if damage is not None:
        raise DeviceStateError(
            f"the active adapter is damaged ({damage}) and the server offers no release "
            "to restore it from: ask the operator to roll a release out to this device, "
            "then run `fedota device update` again"
        )
    return UpdateOutcome(UpdateStatus.NO_UPDATE, run.report().installed_version)


def _select(run: _Run, offer: api.Offer) -> TargetFile:
    """The signed target of ``offer``, checked against this device's base and floor.

    Raises:
        UpdateRejectedError: the target is not one this device may install (reported).
    """
    state, config = run.state, run.config
    active = state.active()
    # A repair may re-install the active release itself, whose counter is the floor: allow
    # exactly that counter again (any lower one is still a rollback).
    floor = state.release_floor() - (1 if run.repairing else 0)
    try:
        updater = refresh_metadata(
            tuf_dir=state.tuf_dir, server_url=config.server_url, http=run.http, retrier=run.retrier
        )
        return select_target(
            updater,
            offer.path,
            base_fingerprint=config.base_fingerprint,
            release_floor=floor,
            installed_version=active.version if active and not run.repairing else None,
            privacy_policy=config.policy(),
        )
    except UpdateRejectedError as e:
        _report_rejection(run, offer.to_version, e)
        raise


def _download(run: _Run, target: TargetFile, version: int, bundle_path: Path) -> DownloadStats:
    """Fetch the bundle to ``bundle_path`` (resuming a partial of the same target).

    Raises:
        UpdateRetryError: a transient failure, the disk included (reported as retry).
        UpdateRejectedError: the server sent what the signed target does not allow.
    """
    for stale in run.state.downloads_dir.glob("*"):
        if not stale.name.startswith(bundle_path.name):
            stale.unlink(missing_ok=True)  # a partial of a release no longer offered
    try:
        return download(
            run.http,
            run.retrier,
            url=payload_url(run.config.server_url, target),
            dest=bundle_path,
            length=target.length,
            hook=run.hook,
        )
    except UpdateRetryError as e:
        _cleanup(run, target)
        _report_retry(run, version, e)
        raise
    except UpdateRejectedError as e:
        _cleanup(run, target)
        _report_rejection(run, version, e)
        raise
    except OSError as e:
        _cleanup(run, target)
        retry = UpdateRetryError(
            f"writing the download failed ({e}); space was reclaimed, the old adapter "
            "stays active: free some space and try again",
            reason=_storage_reason(e),
        )
        _report_retry(run, version, retry)
        raise retry from e


def _verify(run: _Run, target: TargetFile, version: int, bundle_path: Path) -> VerifiedBundle:
    """Check the downloaded bytes against the signed target and parse the bundle.

    Raises:
        UpdateRetryError: the bytes are not what was signed (fetched again next time).
        UpdateRejectedError: the bundle itself is refused (reported as failed).
    """
    try:
        return verify_payload(bundle_path, target)
    except (UpdateRetryError, UpdateRejectedError) as e:
        bundle_path.unlink(missing_ok=True)
        run.state.write_journal({"step": JournalStep.IDLE})
        if isinstance(e, UpdateRetryError):
            _report_retry(run, version, e)
        else:
            _report_rejection(run, version, e)
        raise


def _stage_and_commit(
    run: _Run, verified: VerifiedBundle, journal: dict[str, Any], timings: dict[str, Any]
) -> UpdateOutcome:
    state = run.state
    version = verified.bundle.manifest.to_version
    run.hook("stage")
    try:
        previous = None if run.repairing else state.read_active()
        new = apply_bundle(previous, verified.bundle, base_fingerprint=run.config.base_fingerprint)
    except BundleRejectedError as e:
        rejection = UpdateRejectedError(str(e), reason=reject_reason(e))
        _cleanup(run, verified.target)
        _report_rejection(run, version, rejection)
        raise rejection from e
    slot = state.inactive_slot()
    try:
        config = verified.bundle.manifest.adapter_config
        state.write_slot(
            slot,
            new,
            hook=run.hook,
            shape=config,
        )
    except OSError as e:
        _cleanup(run, verified.target)
        retry = UpdateRetryError(
            f"staging version {version} failed ({e}); space was reclaimed and the old "
            "adapter stays active: free some space and try again",
            reason=_storage_reason(e),
        )
        _report_retry(run, version, retry, **timings)
        raise retry from e
    state.write_journal({**journal, "step": JournalStep.STAGED, "slot": slot, "attempts": 0})
    return _health_then_commit(run, verified, slot, timings)


def _health_then_commit(
    run: _Run, verified: VerifiedBundle, slot: str, timings: dict[str, Any]
) -> UpdateOutcome:
    state = run.state
    journal = state.journal()
    attempts = int(journal.get("attempts", 0)) + 1
    state.write_journal({**journal, "step": JournalStep.HEALTH, "attempts": attempts})
    run.hook("health_check")
    manifest = verified.bundle.manifest
    # the adapter still active is the one the new release replaces: its loss, measured
    # on the same golden prompts when it was committed, is the quality to beat
    previous = None if run.repairing else state.active_quality()
    report = run.checker.check(state.read_slot(slot), manifest)
    quality = _quality(report, previous)
    if not report.ok:
        return _roll_back(run, verified.target, manifest.to_version, report.reason, report, quality)
    state.write_journal(
        {
            **state.journal(),
            "step": JournalStep.COMMIT,
            "health": asdict(report),
            "quality": quality,
        }
    )
    return _commit(run, verified.target, slot, report, timings)


def _quality(report: HealthReport | None, previous: float | None) -> dict[str, float] | None:
    """The golden-prompt losses an outcome reports for the quality gate: the new
    adapter's (``golden_loss``) and the replaced one's (``previous_golden_loss``)."""
    if report is None or report.measured_loss is None or not math.isfinite(report.measured_loss):
        return None
    out = {"golden_loss": float(report.measured_loss)}
    if previous is not None and math.isfinite(previous):
        out["previous_golden_loss"] = float(previous)
    return out


def _commit(
    run: _Run, target: TargetFile, slot: str, report: HealthReport | None, timings: dict[str, Any]
) -> UpdateOutcome:
    state = run.state
    fedota = target.custom["fedota"]
    version, counter = int(fedota["to_version"]), int(fedota["release_counter"])
    quality = state.journal().get("quality")
    state.set_active(ActivePointer(slot, version, counter), hook=run.hook)
    run.hook("commit")
    state.raise_floor(counter)
    if isinstance(quality, dict) and "golden_loss" in quality:
        state.write_quality(version, float(quality["golden_loss"]))
    run.event(
        EventType.INSTALLED,
        version,
        event_id=_installed_event_id(target),
        quality=quality if isinstance(quality, dict) else None,
        **timings,
        loss=report.measured_loss if report else None,
    )
    state.write_journal({**state.journal(), "step": JournalStep.COMMITTED})
    _cleanup(run, target)
    _try_flush(run)
    logger.info("committed adapter version %d in slot %s", version, slot)
    return UpdateOutcome(
        UpdateStatus.UPDATED, version, "repaired" if run.repairing else "ok", report
    )


def _roll_back(
    run: _Run,
    target: TargetFile,
    version: int,
    reason: str,
    report: HealthReport | None,
    quality: dict[str, float] | None = None,
) -> UpdateOutcome:
    logger.warning("rolling back version %d: %s", version, reason)
    run.state.write_journal({**run.state.journal(), "step": JournalStep.ROLLBACK, "reason": reason})
    measured = asdict(report) if report else {}
    run.event(
        EventType.FAILED,
        version,
        quality=quality,
        reason="health_check",
        why=reason[:200],
        **{k: measured.get(k) for k in ("measured_loss", "expected_loss", "peak_bytes")},
    )
    _cleanup(run, target)
    _try_flush(run)
    return UpdateOutcome(UpdateStatus.ROLLED_BACK, version, reason, report)


def _cleanup(run: _Run, target: TargetFile) -> None:
    """Drop the staged slot unless it became active, the download, and the journal."""
    state = run.state
    run.hook("cleanup")
    journal = state.journal()
    active = state.active()
    staged = journal.get("slot")
    if staged in ("a", "b") and (active is None or active.slot != staged):
        state.wipe_slot(staged)
    sha = target.hashes.get("sha256", "")
    for path in state.downloads_dir.glob(f"{sha}*"):
        path.unlink(missing_ok=True)
    state.write_journal({"step": JournalStep.IDLE})


def _report_rejection(run: _Run, version: int, error: UpdateRejectedError) -> None:
    run.event(EventType.FAILED, version, reason=error.reason, why=str(error)[:300])
    _try_flush(run)


def _installed_event_id(target: TargetFile) -> str:
    """One id per installed release, so a commit finished after a crash reports once."""
    fedota = target.custom["fedota"]
    return f"installed-{fedota['to_version']}-{target.hashes['sha256'][:32]}"


def _report_retry(run: _Run, version: int, error: UpdateRetryError, **detail: Any) -> None:
    """A device-local or transport problem: the release stays offered (ADR 0007)."""
    run.event(EventType.RETRY, version, reason=error.reason, why=str(error)[:300], **detail)
    _try_flush(run)


def _storage_reason(error: OSError) -> str:
    return "disk_full" if error.errno == errno.ENOSPC else "storage_failed"


def _try_flush(run: _Run) -> None:
    try:
        run.flush_telemetry()
    except UpdateTransientError as e:
        logger.info("telemetry queued: %s", e)


def _target_json(target: TargetFile) -> dict[str, Any]:
    return {"path": target.path, **target.to_dict()}


def _recover(run: _Run) -> UpdateOutcome | None:
    """Finish or undo what a killed run left (see the table in the module docstring)."""
    state = run.state
    journal = state.journal()
    step = journal.get("step", JournalStep.IDLE)
    if step in (JournalStep.IDLE, JournalStep.DOWNLOAD):
        return None  # a partial download simply resumes
    try:
        raw = dict(journal["target"])
        path = raw.pop("path")
        target = TargetFile.from_dict(raw, path)
        slot = str(journal["slot"])
    except (KeyError, TypeError, ValueError) as e:
        raise DeviceStateError(f"journal.json is malformed ({e}); delete it to start over") from e
    version = int(journal["version"])
    logger.warning("recovering an interrupted update to version %d (step %s)", version, step)
    active = state.active()
    if step == JournalStep.ROLLBACK:  # killed while cleaning up after a rollback (already reported)
        _cleanup(run, target)
        return UpdateOutcome(UpdateStatus.ROLLED_BACK, version, str(journal.get("reason", "")))
    if active is not None and active.version == version and active.slot == slot:
        # Killed after the pointer swap: the new adapter is active; finish the commit.
        run.hook("commit")
        state.raise_floor(active.release_counter)
        quality = journal.get("quality")
        if isinstance(quality, dict) and isinstance(quality.get("golden_loss"), float):
            state.write_quality(version, quality["golden_loss"])
        if step != JournalStep.COMMITTED:
            # Same id as the report _commit may have queued before the kill: sent once.
            run.event(
                EventType.INSTALLED, version, event_id=_installed_event_id(target), recovered=True
            )
        _cleanup(run, target)
        return UpdateOutcome(UpdateStatus.UPDATED, version, "recovered after restart")
    if step == JournalStep.COMMIT:
        return _commit(run, target, slot, None, {"recovered": True})
    if step == JournalStep.HEALTH and int(journal.get("attempts", 0)) >= run.crash_loop_limit:
        reason = f"crash loop: health check started {journal['attempts']} times without finishing"
        return _roll_back(run, target, version, reason, None)
    try:
        verified = verify_payload(state.downloads_dir / target.hashes["sha256"], target)
    except (UpdateRejectedError, OSError) as e:
        return _roll_back(run, target, version, f"staged bundle unusable after restart: {e}", None)
    return _health_then_commit(run, verified, slot, {"recovered": True})
