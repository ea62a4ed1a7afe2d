"""④ publish: the OTA update service as a FastAPI app.

Routes are thin: they parse (pydantic), call one domain function, and shape the answer.
Every domain error becomes JSON ``{"error", "detail"}`` with its status in one handler;
framework errors (unparsable or invalid bodies, unknown routes) take the same shape.
The app refuses to be built on an unmigrated database (see :mod:`server.ota.database`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import func, select, text
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.ota import (
    fleet_stats,
    routes_devices,
    routes_inventory,
    routes_operator,
    routes_publish,
    routes_tuf,
)
from server.ota.console import mount_console
from server.ota.errors import (
    AuthenticationError,
    OtaError,
    OverloadedError,
    RangeNotSatisfiableError,
    TooManyRequestsError,
)
from server.ota.models import RolloutRow
from server.ota.observability import (
    DeviceStateCollector,
    OpsMiddleware,
    RolloutStateCollector,
    StageReportCollector,
)
from server.ota.schemas import ErrorOut, HealthOut
from server.ota.services import Services, build_services
from server.ota.settings import OtaSettings

logger = logging.getLogger(__name__)

_ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 416, 422, 503)}
_MAX_VALIDATION_PROBLEMS = 5
_METADATA_BYTES = 4 * 1024 * 1024


def create_app(settings: OtaSettings | None = None, *, services: Services | None = None) -> FastAPI:
    """Build the app (from the environment when ``settings`` is None).

    Raises:
        DatabaseNotMigratedError: the database is not at the head revision.
        OtaConfigError: missing secrets, unusable keys or trusted root.
    """
    if services is None:
        services = build_services(settings or OtaSettings())  # type: ignore[call-arg]
    app = FastAPI(
        title="fedota OTA update server",
        version="1",
        lifespan=_lifespan,
        responses=_ERRORS,  # type: ignore[arg-type]
    )
    app.state.services = services
    for module in (routes_devices, routes_operator, routes_inventory, routes_publish, routes_tuf):
        app.include_router(module.router)
    mount_console(app)
    app.add_exception_handler(OtaError, _handle_domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _handle_validation_error)  # type: ignore[arg-type]
    app.add_api_route("/healthz", _healthz, methods=["GET"], tags=["ops"])
    app.add_api_route("/readyz", _readyz, methods=["GET"], tags=["ops"])
    app.add_api_route(
        "/metrics",
        _metrics,
        methods=["GET"],
        tags=["ops"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "metrics"}},
    )
    services.metrics.add_collector(RolloutStateCollector(lambda: _rollout_states(services)))
    services.metrics.add_collector(
        DeviceStateCollector(
            lambda: fleet_stats.device_state_counts(
                services.db, stale_after_s=services.settings.stale_after_s
            )
        )
    )
    services.metrics.add_collector(
        StageReportCollector(lambda: fleet_stats.live_stage_reports(services.db))
    )
    settings = services.settings

    def body_limit(path: str) -> int:
        if path.startswith("/v1/blobs/"):
            return settings.max_blob_bytes
        if path in ("/v1/releases", "/v1/tuf/root"):
            return _METADATA_BYTES
        return settings.max_body_bytes

    app.add_middleware(
        OpsMiddleware,  # type: ignore[arg-type]
        metrics=services.metrics,
        max_in_flight=settings.max_concurrent_requests,
        retry_after_s=settings.retry_after_s,
        body_limit=body_limit,
    )
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (each worker reads ``FEDOTA_OTA_*``)."""
    app = create_app()
    freeze_startup_heap()
    return app


def freeze_startup_heap() -> None:
    """Exempt everything alive now (modules, the app, its routes and schemas) from the
    garbage collector.

    A full collection over those long-lived objects stalls every request in flight
    (it shows in the p99 of update checks; measured in
    docs/adr/0009-update-check-hot-path.md, "Context").
    Call it once per server process, after the app is built; not in a process that
    builds many apps (tests), where frozen apps would never be freed.
    """
    gc.collect()
    gc.freeze()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    services: Services = app.state.services
    tasks = [asyncio.create_task(_keep_fresh(services)), asyncio.create_task(_flush_seen(services))]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await run_in_threadpool(_final_flush, services)
        services.db.dispose()
        services.metrics.process_exiting()


async def _flush_seen(services: Services) -> None:
    """Write the last-seen times update checks collected (see server.ota.inventory)."""
    while True:
        await asyncio.sleep(services.settings.seen_flush_interval_s)
        try:
            await run_in_threadpool(services.seen.flush)
        except Exception:  # the marks were kept; the next round retries
            logger.exception("writing last-seen times failed")


def _final_flush(services: Services) -> None:
    try:
        services.seen.flush()
    except Exception:
        logger.exception("writing last-seen times at shutdown failed")


async def _keep_fresh(services: Services) -> None:
    """Re-sign timestamp/snapshot before they expire, even when nobody asks for them."""
    while True:
        try:
            await run_in_threadpool(services.repo.refresh)
        except Exception:  # keep the loop alive; the next round retries
            logger.exception("refreshing TUF metadata failed")
        await asyncio.sleep(services.settings.refresh_interval_s)


def _handle_domain_error(request: Request, exc: OtaError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(exc.retry_after_s)
        request.app.state.services.metrics.shed.inc()
    if isinstance(exc, TooManyRequestsError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, RangeNotSatisfiableError):
        headers["Content-Range"] = f"bytes */{exc.length}"
    if exc.http_status >= 500 and not isinstance(exc, OverloadedError):
        logger.error("server error on %s: %s", request.url.path, exc)
    return JSONResponse(
        {"error": type(exc).__name__, "detail": str(exc)},
        status_code=exc.http_status,
        headers=headers,
    )


def _handle_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Framework-raised errors (unparsable body, 404 route, 405) in the same shape.
    return JSONResponse(
        {"error": "HTTPError", "detail": str(exc.detail)},
        status_code=exc.status_code,
        headers=exc.headers,
    )


def _handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes each offending input back, which fails on a NaN or
    # Infinity literal (not JSON: a 500 that drops the keep-alive connection) and would
    # echo a mistyped secret. Say where and what, never the value, in the usual shape.
    problems = [_describe_problem(error) for error in exc.errors()]
    detail = "; ".join(problems[:_MAX_VALIDATION_PROBLEMS])
    if len(problems) > _MAX_VALIDATION_PROBLEMS:
        detail += f"; and {len(problems) - _MAX_VALIDATION_PROBLEMS} more"
    return JSONResponse({"error": "ValidationError", "detail": detail}, status_code=422)


def _describe_problem(error: dict[str, object]) -> str:
    loc = error.get("loc")
    parts = [str(part) for part in loc] if isinstance(loc, list | tuple) else []
    if error.get("type") == "json_invalid":
        ctx = error.get("ctx")
        reason = ctx.get("error") if isinstance(ctx, dict) else None
        at = f" at character {parts[1]}" if len(parts) > 1 else ""
        return f"body is not valid JSON ({reason or 'decode error'}{at}); send a JSON object"
    where = ".".join(parts)[:120] or "request"  # field names are the caller's, bound them
    return f"{where}: {error.get('msg', 'invalid')}"


def _rollout_states(services: Services) -> dict[str, int]:
    with services.db.read() as session:
        rows = session.execute(select(RolloutRow.state, func.count()).group_by(RolloutRow.state))
        return {state: count for state, count in rows}


def _healthz() -> HealthOut:
    """Liveness: the process answers."""
    return HealthOut(status="ok")


def _readyz(request: Request) -> HealthOut:
    """Readiness: the database answers."""
    services: Services = request.app.state.services
    try:
        with services.db.read() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        raise OverloadedError(
            f"database unavailable: {type(exc).__name__}",
            retry_after_s=services.settings.retry_after_s,
        ) from exc
    return HealthOut(status="ready")


def _metrics(request: Request) -> Response:
    """Prometheus metrics."""
    metrics = request.app.state.services.metrics
    return Response(metrics.scrape(), media_type=CONTENT_TYPE_LATEST)
