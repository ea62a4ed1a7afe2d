"""Routes for operators (rollouts, fleet state, device administration)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, status
from sqlalchemy import func, select

from server.ota import devices, rollouts, telemetry
from server.ota.auth import Caller, require_role
from server.ota.errors import NotFoundError
from server.ota.models import DeviceRow
from server.ota.schemas import (
    DEVICE_ID_PATTERN,
    MAX_VERSION,
    FleetOut,
    InstalledVersionOut,
    RolloutEventOut,
    RolloutIn,
    RolloutOut,
)
from server.ota.services import services_of

router = APIRouter(prefix="/v1", tags=["operators"])
operator = [Depends(require_role("operator"))]
Operator = Annotated[Caller, Depends(require_role("operator"))]
Admin = Annotated[Caller, Depends(require_role("admin"))]
RolloutId = Path(ge=1, le=MAX_VERSION)


@router.post("/rollouts", status_code=status.HTTP_201_CREATED)
def create_rollout(body: RolloutIn, request: Request, caller: Operator) -> RolloutOut:
    """Start a staged rollout of a published version to the devices of one base and of
    every base the version's bundles name with it (their compatible bases). Refused
    (400) when the version's signed privacy spend is over the server's policy."""
    services = services_of(request)
    policy = services.settings.privacy_policy()
    view = rollouts.create_rollout(
        services.db,
        body.to_domain(),
        actor=caller.actor,
        policy=policy,
        salt_seed=services.settings.simulation_seed,
    )
    return RolloutOut.of(view)


@router.get("/rollouts", dependencies=operator)
def list_rollouts(request: Request) -> list[RolloutOut]:
    """All rollouts, newest first."""
    return [RolloutOut.of(v) for v in rollouts.list_rollouts(services_of(request).db)]


@router.get("/rollouts/{rollout_id}", dependencies=operator)
def get_rollout(request: Request, rollout_id: int = RolloutId) -> RolloutOut:
    """One rollout with per-stage outcomes."""
    return RolloutOut.of(rollouts.get_rollout(services_of(request).db, rollout_id))


@router.get("/rollouts/{rollout_id}/events", dependencies=operator)
def get_rollout_events(request: Request, rollout_id: int = RolloutId) -> list[RolloutEventOut]:
    """The rollout's transitions with time and actor, oldest first (each appears once)."""
    db = services_of(request).db
    rollouts.get_rollout(db, rollout_id)
    return [
        RolloutEventOut(**dataclasses.asdict(e)) for e in rollouts.rollout_event_log(db, rollout_id)
    ]


@router.post("/rollouts/{rollout_id}/pause")
def pause_rollout(request: Request, caller: Operator, rollout_id: int = RolloutId) -> RolloutOut:
    """Stop offering the version to anyone new."""
    db = services_of(request).db
    return RolloutOut.of(rollouts.pause_rollout(db, rollout_id, actor=caller.actor))


@router.post("/rollouts/{rollout_id}/resume")
def resume_rollout(request: Request, caller: Operator, rollout_id: int = RolloutId) -> RolloutOut:
    """Resume; after an automatic pause this starts the next stage."""
    db = services_of(request).db
    return RolloutOut.of(rollouts.resume_rollout(db, rollout_id, actor=caller.actor))


@router.post("/rollouts/{rollout_id}/advance")
def advance_rollout(request: Request, caller: Operator, rollout_id: int = RolloutId) -> RolloutOut:
    """Start the next stage now, whatever its reports (audited)."""
    db = services_of(request).db
    return RolloutOut.of(rollouts.advance_rollout(db, rollout_id, actor=caller.actor))


@router.post("/rollouts/{rollout_id}/cancel")
def cancel_rollout(request: Request, caller: Operator, rollout_id: int = RolloutId) -> RolloutOut:
    """Stop the rollout for good."""
    db = services_of(request).db
    return RolloutOut.of(rollouts.cancel_rollout(db, rollout_id, actor=caller.actor))


@router.get("/fleet", dependencies=operator)
def fleet_status(request: Request) -> FleetOut:
    """Versions installed across the fleet, and every rollout's per-stage outcomes."""
    db = services_of(request).db
    with db.read() as session:
        rows = session.execute(
            select(DeviceRow.base_fingerprint, DeviceRow.installed_version, func.count())
            .where(DeviceRow.revoked_at.is_(None))
            .group_by(DeviceRow.base_fingerprint, DeviceRow.installed_version)
            .order_by(DeviceRow.base_fingerprint, DeviceRow.installed_version)
        ).all()
    return FleetOut(
        installed=[
            InstalledVersionOut(base_fingerprint=b, version=v, devices=n) for b, v, n in rows
        ],
        rollouts=[RolloutOut.of(v) for v in rollouts.list_rollouts(db)],
    )


@router.post("/devices/{device_id}/revoke", status_code=204)
def revoke_device(
    request: Request, caller: Admin, device_id: str = Path(pattern=DEVICE_ID_PATTERN)
) -> None:
    """Revoke a device's token; it must enroll again."""
    devices.revoke(services_of(request).db, device_id, actor=caller.actor)


@router.delete("/devices/{device_id}/failures/{version}", status_code=204)
def clear_failure(
    request: Request,
    caller: Operator,
    device_id: str = Path(pattern=DEVICE_ID_PATTERN),
    version: int = Path(ge=1, le=MAX_VERSION),
) -> None:
    """Allow a version this device reported as failed to be offered to it again."""
    db = services_of(request).db
    if not telemetry.clear_failure(db, device_id, version, actor=caller.actor):
        raise NotFoundError(f"device {device_id} has no recorded failure of v{version}")
