"""Credential-failure throttling: slow down whoever guesses secrets, per client.

Each failed credential (a wrong enrollment secret, an unknown device token) is counted
under a few keys (the client address, the device id it claimed); a key with
``max_failures`` failures in the last ``window_s`` seconds is refused with 429 and a
``Retry-After`` of when its oldest counted failure leaves the window — before the
credential is even looked at, so a guess sent while refused tells nothing. A refused
attempt is not counted (the block ends on time, however hard a client hammers). Other
keys are unaffected: a correct secret from another address keeps working.

State lives in process memory, so each ``--workers`` process counts on its own (a
client spread over N workers gets up to N times the limit). It is bounded: at most
``max_keys`` keys, the least recently failed dropped first.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from server.ota.errors import TooManyRequestsError


class FailureThrottle:
    """Sliding-window counts of credential failures per key (thread-safe).

    Args:
        max_failures: Failures a key may have within ``window_s`` before it is refused.
        window_s: Length of the sliding window in seconds.
        clock: Monotonic seconds (injectable, so tests need no real waiting).
        max_keys: Bound on the keys remembered at once.
    """

    def __init__(
        self,
        *,
        max_failures: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 65_536,
    ) -> None:
        if max_failures < 1 or window_s <= 0 or max_keys < 1:
            raise ValueError("max_failures, window_s and max_keys must be positive")
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def refuse_if_blocked(self, keys: Iterable[str]) -> None:
        """Refuse the request when any of ``keys`` has used up its failures.

        Raises:
            TooManyRequestsError: with the seconds until that key may try again.
        """
        now = self._clock()
        wait_s = 0.0
        with self._lock:
            for key in keys:
                recent = self._recent(key, now)
                if recent is not None and len(recent) >= self.max_failures:
                    wait_s = max(wait_s, recent[0] + self.window_s - now)
        if wait_s > 0:
            raise TooManyRequestsError(
                f"too many failed credentials from this client ({self.max_failures} within "
                f"{self.window_s:g} s); check the secret or token and retry later",
                retry_after_s=max(1, math.ceil(wait_s)),
            )

    def record_failure(self, keys: Iterable[str]) -> None:
        """Count one failed credential under each of ``keys``."""
        now = self._clock()
        with self._lock:
            for key in keys:
                recent = self._recent(key, now)
                if recent is None:
                    recent = self._failures[key] = deque(maxlen=self.max_failures)
                recent.append(now)
                self._failures.move_to_end(key)
            while len(self._failures) > self._max_keys:
                self._failures.popitem(last=False)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        """The key's failures still inside the window (expired ones dropped)."""
        recent = self._failures.get(key)
        if recent is None:
            return None
        while recent and recent[0] <= now - self.window_s:
            recent.popleft()
        if not recent:
            del self._failures[key]
            return None
        return recent
