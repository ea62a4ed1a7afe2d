"""Routes devices call: enroll, check for an update, report outcomes, read own state."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import select

from server.ota import devices, telemetry
from server.ota.auth import (
    Caller,
    bearer,
    bearer_token,
    counting_token_failures,
    enrollment_throttle_keys,
    require_device,
    require_device_or_operator,
)
from server.ota.errors import AuthenticationError, NotFoundError
from server.ota.models import DeviceRow, DeviceVersionRow
from server.ota.releases import require_released
from server.ota.rollouts import assigned_version
from server.ota.schemas import (
    DEVICE_ID_PATTERN,
    AssignmentOut,
    CheckOut,
    DeviceReportIn,
    EnrollIn,
    EnrollOut,
    ErrorOut,
    TargetOut,
    TelemetryIn,
    TelemetryOut,
)
from server.ota.services import services_of

router = APIRouter(
    prefix="/v1/devices",
    tags=["devices"],
    responses={
        429: {
            "model": ErrorOut,
            "description": "Too many failed credentials from this client; retry later.",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        }
    },
)
_NO_UPDATE = CheckOut(update=None).model_dump_json()


@router.post("", status_code=status.HTTP_201_CREATED)
def enroll(body: EnrollIn, request: Request) -> EnrollOut:
    """Enroll a device with the fleet's enrollment secret; returns its token once."""
    services = services_of(request)
    keys = enrollment_throttle_keys(request)
    services.enrollment_failures.refuse_if_blocked(keys)
    try:
        devices.check_enrollment_secret(
            body.enrollment_secret, services.settings.secret("enrollment_secret")
        )
    except AuthenticationError:
        services.enrollment_failures.record_failure(keys)
        raise
    enrollment = devices.enroll(
        services.db, body.to_domain(), id_seed=services.settings.simulation_seed
    )
    return EnrollOut(device_id=enrollment.device_id, token=enrollment.token)


@router.post("/{device_id}/check", response_model=CheckOut)
async def check(
    body: DeviceReportIn,
    request: Request,
    device_id: str = Path(pattern=DEVICE_ID_PATTERN),
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
) -> Response:
    """Report current state; get the bundle that moves this device to its assigned version.

    The hot path: authentication and the decision share one worker-thread hop and one
    database query; the answer is serialized once, by pydantic, without FastAPI's
    response-model round trip (the declared model still documents it).
    """
    services = services_of(request)
    token = bearer_token(credentials)
    with counting_token_failures(request, device_id):
        target = await services.checker.check_async(token, device_id, body.to_domain())
    if target is None:
        services.metrics.checks_none.inc()
        return Response(_NO_UPDATE, media_type="application/json")
    services.metrics.checks_offered.inc()
    answer = CheckOut(update=TargetOut.of(target))
    return Response(answer.model_dump_json(), media_type="application/json")


@router.post("/{device_id}/events")
def report_event(
    body: TelemetryIn, request: Request, caller: Caller = Depends(require_device)
) -> TelemetryOut:
    """Report an install outcome; a repeated event id is accepted and stored once.

    An event about a version no release ever named is refused (404): it could only
    come from a confused or hostile device and would count toward nothing.
    """
    assert caller.device_id is not None
    db = services_of(request).db
    with db.read() as session:
        require_released(session, body.version)
    stored = telemetry.record_event(db, caller.device_id, body.to_domain())
    return TelemetryOut(stored=stored)


@router.get("/{device_id}/assignment")
def read_assignment(
    request: Request,
    device_id: str = Path(pattern=DEVICE_ID_PATTERN),
    caller: Caller = Depends(require_device_or_operator),
) -> AssignmentOut:
    """What the server believes about this device and what it is assigned."""
    with services_of(request).db.read() as session:
        row = session.get(DeviceRow, device_id)
        if row is None:
            raise NotFoundError(f"no device {device_id}")
        failed = session.scalars(
            select(DeviceVersionRow.version)
            .where(DeviceVersionRow.device_id == device_id, DeviceVersionRow.status == "failed")
            .order_by(DeviceVersionRow.version)
        ).all()
        return AssignmentOut(
            device_id=row.id,
            base_fingerprint=row.base_fingerprint,
            installed_version=row.installed_version,
            assigned_version=assigned_version(session, row.id, row.base_fingerprint),
            failed_versions=list(failed),
            revoked=row.revoked_at is not None,
        )
