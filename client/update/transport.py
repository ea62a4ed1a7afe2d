"""⑤ download, the wire: retries with backoff, jitter, ``Retry-After``, one budget.

Every HTTP call the agent makes goes through one ``Retrier`` per update run, so the
whole run has one overall budget (THREATS D18): a flaky server is retried with
exponential backoff plus jitter, ``429``/``503`` wait at least what ``Retry-After``
asks (D19), and when the attempts or the seconds are spent the run fails with
``UpdateTransientError``. Time and randomness are injected (``Clock``, ``random.Random``)
so tests run without sleeping.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

import httpx
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

from client.update.errors import UpdateTransientError

__all__ = [
    "Clock",
    "Retrier",
    "RetryPolicy",
    "RetryableError",
    "SystemClock",
    "TufFetcher",
    "check_response",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class Clock(Protocol):
    """Time source (injectable for tests)."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block for ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """``time.sleep()``."""
        time.sleep(seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one update run tries.

    Attributes:
        max_attempts: Attempts per operation (first try included).
        base_delay_s: Backoff before the second attempt; doubles each time.
        max_delay_s: Cap on one backoff (and on an honoured ``Retry-After``).
        budget_s: Total seconds (waiting included) the whole run may spend retrying.
        jitter: Fraction of each delay added at random (0..jitter), so a fleet spreads out.
    """

    max_attempts: int = 8
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0
    budget_s: float = 300.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay_s < 0 or self.budget_s < 0 or self.jitter < 0:
            raise ValueError(f"invalid retry policy {self}")


class RetryableError(Exception):
    """Raised inside a retried operation for a failure that may go away."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _retry_after(value: str | None, now: datetime | None = None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def check_response(response: httpx.Response) -> httpx.Response:
    """Raise ``RetryableError`` for statuses worth retrying; return the response otherwise.

    Raises:
        RetryableError: 408, 425, 429 or 5xx (with ``Retry-After`` when given).
    """
    if response.status_code in _RETRY_STATUS:
        raise RetryableError(
            f"server answered {response.status_code}",
            retry_after_s=_retry_after(response.headers.get("retry-after")),
        )
    return response


class Retrier:
    """Runs operations under one ``RetryPolicy`` and one overall budget."""

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self._started = self.clock.monotonic()
        self.attempts = 0
        self.waits_s: list[float] = []

    def delay_s(self, failures: int, retry_after_s: float | None) -> float:
        """Backoff after ``failures`` consecutive failures (jittered, Retry-After honoured)."""
        p = self.policy
        backoff = min(p.max_delay_s, p.base_delay_s * 2 ** (failures - 1))
        if retry_after_s is not None:
            backoff = max(backoff, min(retry_after_s, p.max_delay_s))
        return backoff * (1 + self.rng.uniform(0, p.jitter))

    def run(self, operation: Callable[[], T], *, what: str) -> T:
        """Call ``operation`` until it succeeds, raises a non-retryable error, or the
        attempts or budget are spent.

        Raises:
            UpdateTransientError: retries exhausted (wraps the last failure).
        """
        failures = 0
        while True:
            self.attempts += 1
            try:
                return operation()
            except (RetryableError, httpx.TransportError) as e:
                failures += 1
                retry_after = e.retry_after_s if isinstance(e, RetryableError) else None
                delay = self.delay_s(failures, retry_after)
                spent = self.clock.monotonic() - self._started
                if failures >= self.policy.max_attempts or spent + delay > self.policy.budget_s:
                    raise UpdateTransientError(
                        f"{what} failed {failures} times (last: {e}); gave up after "
                        f"{spent:.1f}s of a {self.policy.budget_s:.0f}s retry budget: the "
                        "server is unreachable or overloaded, try again later"
                    ) from e
                logger.info("%s failed (%s); retrying in %.2fs", what, e, delay)
                self.waits_s.append(delay)
                self.clock.sleep(delay)


class TufFetcher(FetcherInterface):
    """tuf.ngclient fetcher over ``httpx`` with the run's retry policy (metadata only;
    payloads use ``client.update.download``)."""

    def __init__(self, http: httpx.Client, retrier: Retrier) -> None:
        self._http = http
        self._retrier = retrier

    def _fetch(self, url: str) -> Iterator[bytes]:
        def open_stream() -> httpx.Response:
            response = self._http.send(self._http.build_request("GET", url), stream=True)
            try:
                check_response(response)
                if response.status_code != 200:
                    raise DownloadHTTPError(
                        f"GET {url} answered {response.status_code}", response.status_code
                    )
            except BaseException:
                response.close()
                raise
            return response

        # Streamed, so ngclient's per-role max lengths bound what is read (endless data).
        response = self._retrier.run(open_stream, what=f"GET {url}")
        try:
            yield from response.iter_bytes(65536)
        finally:
            response.close()
