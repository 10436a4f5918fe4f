"""In-memory rate limits: on the token endpoint, and on repeated failed authentication.

A token bucket per key (a client address, or a client id): ``limit`` requests per ``period``
seconds, refilled continuously, so a burst of ``limit`` is allowed and then one request every
``period / limit`` seconds. Limits are per process: with N workers a client gets up to N times the
limit, which is still a bound on guessing. Thread-safe.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import ClassVar

from fhir_norse.outcomes import FhirError


class TooManyRequests(FhirError):
    """429 with ``Retry-After``: https://hl7.org/fhir/R4/codesystem-issue-type.html#issue-type-throttled."""

    status: ClassVar[int] = 429
    default_code: ClassVar[str] = "throttled"

    @classmethod
    def after(cls, seconds: float, message: str = "Too many requests") -> TooManyRequests:
        wait = retry_after_header(seconds)
        return cls(f"{message}; retry after {wait} s", headers={"Retry-After": wait})


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class RateLimiter:
    """Token buckets by key. ``limit <= 0`` switches the limiter off."""

    def __init__(
        self,
        limit: int,
        period: float = 60.0,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = int(limit)
        self.period = float(period)
        self.max_keys = max_keys
        self._rate = self.limit / self.period if self.limit > 0 else 0.0
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (tokens left, time of the last update)
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.limit), now))
        return min(float(self.limit), tokens + (now - at) * self._rate)

    def hit(self, key: str) -> float | None:
        """Count one request; None if allowed, else the seconds until one more would be."""
        if not self.enabled:
            return None
        with self._lock:
            now = self._clock()
            tokens = self._level(key, now)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                if len(self._buckets) > self.max_keys:
                    self._prune(now)
                return None
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._rate

    def blocked(self, key: str) -> float | None:
        """Without counting: None if a request would be allowed, else the seconds to wait."""
        if not self.enabled:
            return None
        with self._lock:
            tokens = self._level(key, self._clock())
            return None if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def reset(self, key: str | None = None) -> None:
        with self._lock:
            if key is None:
                self._buckets.clear()
            else:
                self._buckets.pop(key, None)

    def _prune(self, now: float) -> None:
        # Full buckets carry no information; drop them first, then the oldest keys.
        for key in [k for k in self._buckets if self._level(k, now) >= self.limit]:
            del self._buckets[key]
        excess = len(self._buckets) - self.max_keys
        if excess > 0:
            for key in list(self._buckets)[:excess]:
                del self._buckets[key]
