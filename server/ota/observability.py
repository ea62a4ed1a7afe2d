"""Operations edge: Prometheus metrics, JSON logs, body limits and load shedding.

One pure-ASGI middleware (cheaper than ``BaseHTTPMiddleware``) does, per request:
shed load with ``503`` + ``Retry-After`` beyond ``max_concurrent_requests`` in flight,
refuse bodies over the route's byte limit with ``413`` (declared ``Content-Length``
and the bytes actually streamed both count), time the request by route template,
and write one structured log line.

Under ``fedota serve --workers N`` every worker is a process of its own, so counters
and histograms live in prometheus_client's multiprocess mode: ``fedota serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh private directory before the workers start
(:func:`prepare_multiprocess_dir`), each worker writes its values to files there, and
``/metrics`` sums the files of every worker, live or exited (:meth:`Metrics.scrape`).
Gauges about fleet state are read from the database at scrape time instead, so every
worker reports the same, durable numbers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.ota.domain import RolloutState
from server.ota.errors import PayloadTooLargeError

logger = logging.getLogger("server.ota.access")
# prometheus_client's own switch: set before the library is imported, it makes every
# counter and histogram a per-process file in this directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    """The directory prometheus_client keeps per-process values in, if it is on."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def prepare_multiprocess_dir() -> tuple[Path, bool]:
    """Turn on multiprocess metrics for worker processes started after this call.

    An operator-set ``PROMETHEUS_MULTIPROC_DIR`` is kept and emptied of the value files
    of an earlier run (stale counters would be added to this run's); otherwise a fresh
    private directory is made. Returns the directory and whether it was made here (the
    caller removes it on exit).
    """
    given = multiprocess_dir()
    if given is not None:
        given.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in given.glob("*.db"):
            stale.unlink()
        return given, False
    made = Path(tempfile.mkdtemp(prefix="fedota-metrics-"))  # mode 0700
    os.environ[MULTIPROC_ENV] = str(made)
    return made, True


def remove_multiprocess_dir(path: Path) -> None:
    """Remove a directory :func:`prepare_multiprocess_dir` made (after the workers exit)."""
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(MULTIPROC_ENV) == str(path):
        del os.environ[MULTIPROC_ENV]


class Metrics:
    """The service's metrics, in a registry of their own (one per app).

    In multiprocess mode (:func:`multiprocess_dir`) the values live in per-process
    files and :meth:`scrape` sums every worker's; scrape-time collectors are added to
    the answer either way.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._scrape_collectors: list[Collector] = []
        self.request_seconds = Histogram(
            "fedota_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.checks = Counter(
            "fedota_update_checks", "Update checks by result.", ["result"], registry=self.registry
        )
        # Children bound once: ``labels()`` takes a lock and a dict lookup per call.
        self.checks_offered = self.checks.labels("offered")
        self.checks_none = self.checks.labels("none")
        self._timers: dict[tuple[str, str, str], Any] = {}
        self.downloads = Counter(
            "fedota_downloads",
            "Bundle download responses by status.",
            ["status"],
            registry=self.registry,
        )
        self.download_bytes = Counter(
            "fedota_download_bytes", "Bundle bytes sent.", registry=self.registry
        )
        self.shed = Counter(
            "fedota_overload_rejections",
            "Requests refused with 503 under overload.",
            registry=self.registry,
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one request's latency (label children cached: few routes, few codes)."""
        key = (method, route, str(status))
        timer = self._timers.get(key)
        if timer is None:
            timer = self._timers[key] = self.request_seconds.labels(*key)
        timer.observe(seconds)

    def add_collector(self, collector: Collector) -> None:
        """Register a scrape-time collector (e.g. rollout states read from the database)."""
        self.registry.register(collector)
        self._scrape_collectors.append(collector)

    def scrape(self) -> bytes:
        """The exposition text: this process's registry, or every worker's files summed."""
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(directory))
        for collector in self._scrape_collectors:
            registry.register(collector)
        return generate_latest(registry)

    def process_exiting(self) -> None:
        """Drop this worker's live-gauge files (its counters stay and keep counting)."""
        if multiprocess_dir() is not None:
            multiprocess.mark_process_dead(os.getpid())


class RolloutStateCollector(Collector):
    """``fedota_rollouts{state}``: read from the database at scrape time, so every worker
    reports the same, durable numbers."""

    def __init__(self, count_by_state: Callable[[], dict[str, int]]) -> None:
        self._count = count_by_state

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("fedota_rollouts", "Rollouts by state.", labels=["state"])
        counts = self._count()
        for state in RolloutState:
            family.add_metric([state.value], counts.get(state.value, 0))
        yield family


class DeviceStateCollector(Collector):
    """``fedota_devices{state}``: devices per state, read from the database at scrape
    time (``server.ota.fleet_stats.DEVICE_STATES``)."""

    def __init__(self, count_by_state: Callable[[], dict[str, int]]) -> None:
        self._count = count_by_state

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("fedota_devices", "Enrolled devices by state.", labels=["state"])
        for state, count in self._count().items():
            family.add_metric([state], count)
        yield family


class StageReportCollector(Collector):
    """Per stage of every rollout not cancelled, read from the database at scrape time:
    ``fedota_rollout_stage_reports{rollout,version,stage,outcome}`` (installed/failed
    devices) and ``fedota_rollout_stage_failure_rate{rollout,version,stage}``.

    ``reports`` returns objects with ``rollout_id``, ``to_version``, ``stage``,
    ``installed``, ``failed`` and ``failure_rate`` (``fleet_stats.StageReports``).
    """

    def __init__(self, reports: Callable[[], Iterable[Any]]) -> None:
        self._reports = reports

    def collect(self) -> Iterable[GaugeMetricFamily]:
        labels = ["rollout", "version", "stage"]
        outcomes = GaugeMetricFamily(
            "fedota_rollout_stage_reports",
            "Devices of a live rollout's stage by the outcome they reported.",
            labels=[*labels, "outcome"],
        )
        rates = GaugeMetricFamily(
            "fedota_rollout_stage_failure_rate",
            "Failed over reported outcomes in a live rollout's stage (0 before any).",
            labels=labels,
        )
        quality = GaugeMetricFamily(
            "fedota_rollout_stage_golden_loss",
            "Mean golden-prompt loss a live rollout's stage reported, for the new and the "
            "replaced adapter (stages with quality reports only).",
            labels=[*labels, "adapter"],
        )
        for report in self._reports():
            key = [str(report.rollout_id), str(report.to_version), str(report.stage + 1)]
            outcomes.add_metric([*key, "installed"], report.installed)
            outcomes.add_metric([*key, "failed"], report.failed)
            rates.add_metric(key, report.failure_rate)
            if report.quality_reports:
                quality.add_metric([*key, "new"], report.golden_loss)
                quality.add_metric([*key, "previous"], report.previous_golden_loss)
        yield outcomes
        yield rates
        yield quality


class JsonFormatter(logging.Formatter):
    """One JSON object per log line; extra fields given via ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: int = logging.INFO) -> None:
    """Send every log record to stderr as JSON (used by ``fedota serve``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class OpsMiddleware:
    """Load shedding, body limits, metrics and access logs (see module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_in_flight: int,
        retry_after_s: int,
        body_limit: Callable[[str], int],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.body_limit = body_limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        if self.in_flight >= self.max_in_flight:
            self.metrics.shed.inc()
            await _send_error(
                send,
                503,
                "overloaded",
                "server is busy; retry after the delay",
                [(b"retry-after", str(self.retry_after_s).encode())],
            )
            return
        limit = self.body_limit(scope["path"])
        declared = _content_length(scope)
        if declared is not None and (declared < 0 or declared > limit):
            status = 413 if declared > limit else 400
            await _send_error(
                send,
                status,
                "body_rejected",
                f"request body of {declared} bytes; the limit here is {limit}",
            )
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, limited_receive, tracking_send)
        finally:
            self.in_flight -= 1
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.observe_request(scope["method"], template, status, elapsed)
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "request",
                    extra={
                        "fields": {
                            "request_id": uuid.uuid4().hex[:16],
                            "method": scope["method"],
                            "route": template,
                            "status": status,
                            "duration_ms": round(elapsed * 1e3, 2),
                        }
                    },
                )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


async def _send_error(
    send: Send,
    status: int,
    error: str,
    detail: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
