"""Rate limits: on the token endpoint, and on repeated failed authentication.

Two implementations of one interface (:class:`Limiter`):

- :class:`SharedRateLimiter`, what the server uses: counters in the database (table
  ``auth_rate_window``), so that every worker of ``fhir-norse serve --workers N`` counts against
  the same limit: ``limit`` requests per key (a client address, a client id, a token's hash) in each
  fixed window of ``period`` seconds, whichever worker takes them. One atomic upsert per counted
  request; once a key is over its limit a worker remembers it until the window ends, so a flood of
  refused requests costs a dictionary look-up each, not a database write.
- :class:`RateLimiter`: a token bucket per key in memory (one process), refilled continuously.

Both are thread-safe.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import ClassVar, Protocol

import sqlalchemy as sa

from fhir_norse.auth.tables import RateWindowRow
from fhir_norse.outcomes import FhirError

log = logging.getLogger(__name__)


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


class Limiter(Protocol):
    """What the token endpoint and the authenticator need of a rate limit."""

    limit: int
    period: float

    def hit(self, key: str) -> float | None:
        """Count one request; None if allowed, else the seconds until one more would be."""
        ...

    def blocked(self, key: str) -> float | None:
        """Without counting: None if a request would be allowed, else the seconds to wait."""
        ...

    def reset(self, key: str | None = None) -> None: ...


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


_RATE = RateWindowRow.__table__  # type: ignore[attr-defined]
_MAX_KEY = 128
# Counted and refused: upsert of the window's counter, the count after it returned.
_UPSERT = sa.text(
    "INSERT INTO auth_rate_window (limiter, key, slot, hits) VALUES (:limiter, :key, :slot, 1) "
    "ON CONFLICT (limiter, key, slot) DO UPDATE SET hits = auth_rate_window.hits + 1 "
    "RETURNING hits"
)


class SharedRateLimiter:
    """``limit`` requests per key in each fixed window of ``period`` seconds, counted in the database
    (shared by all workers and processes on it). ``limit <= 0`` switches the limiter off.

    ``name`` tells this limiter's counters from the others' in the table. A fixed window lets a
    client spend its limit at the end of one window and again at the start of the next (at most
    twice the limit in ``period``), a bound that suits a guard against guessing and floods.
    Should the database refuse the count (it is unavailable, or locked past the busy timeout), the
    worker falls back to its own in-memory limit rather than answer 500.
    """

    def __init__(
        self,
        engine: sa.Engine,
        name: str,
        limit: int,
        period: float = 60.0,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not name or len(name) > 32:
            raise ValueError("a shared rate limiter needs a name of 1 to 32 characters")
        self.engine = engine
        self.name = name
        self.limit = int(limit)
        self.period = float(period)
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> the window in which it went over the limit (refused from memory until it ends)
        self._over: dict[str, int] = {}
        self._slot = -1
        self._fallback = RateLimiter(limit, period, max_keys=max_keys)
        self._write_options = {"sqlite_begin": "IMMEDIATE"} if engine.dialect.name == "sqlite" else {}

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def _window(self) -> tuple[int, float]:
        """The current window's number and the seconds left in it."""
        now = self._clock()
        slot = int(now // self.period)
        return slot, max((slot + 1) * self.period - now, 0.001)

    def _remembered(self, key: str, slot: int) -> bool:
        with self._lock:
            new_window = slot > self._slot
            if new_window:
                self._over.clear()
                self._slot = slot
            over = self._over.get(key) == slot
        if new_window:
            self._purge(slot)
        return over

    def _purge(self, slot: int) -> None:
        """First request of a new window in this worker: delete the counters of past windows (each
        worker does this once a window; the delete is cheap and idempotent)."""
        try:
            with self._begin() as conn, conn.begin():
                conn.execute(sa.delete(_RATE).where(_RATE.c.limiter == self.name, _RATE.c.slot < slot))
        except sa.exc.DBAPIError as exc:  # pragma: no cover - a purge can wait for the next window
            log.warning("rate limit %s: old counters not deleted (%s)", self.name, type(exc).__name__)

    def _begin(self) -> sa.engine.base.Connection:
        return self.engine.connect().execution_options(**self._write_options)

    def hit(self, key: str) -> float | None:
        if not self.enabled:
            return None
        key = _short_key(key)
        slot, left = self._window()
        if self._remembered(key, slot):
            return left
        try:
            with self._begin() as conn, conn.begin():
                hits = int(
                    conn.execute(_UPSERT, {"limiter": self.name, "key": key, "slot": slot}).scalar_one()
                )
        except sa.exc.DBAPIError as exc:
            log.warning(
                "rate limit %s: the database did not count (%s); this worker's own count applies",
                self.name,
                type(exc).__name__,
            )
            return self._fallback.hit(key)
        if hits <= self.limit:
            return None
        with self._lock:
            if self._slot == slot:
                if len(self._over) >= self.max_keys:
                    self._over.clear()
                self._over[key] = slot
        return left

    def blocked(self, key: str) -> float | None:
        if not self.enabled:
            return None
        key = _short_key(key)
        slot, left = self._window()
        if self._remembered(key, slot):
            return left
        with self.engine.connect() as conn:
            hits = conn.execute(
                sa.select(_RATE.c.hits).where(
                    _RATE.c.limiter == self.name, _RATE.c.key == key, _RATE.c.slot == slot
                )
            ).scalar_one_or_none()
        return left if hits is not None and hits >= self.limit else None

    def reset(self, key: str | None = None) -> None:
        condition = _RATE.c.limiter == self.name
        with self._lock:
            if key is None:
                self._over.clear()
            else:
                key = _short_key(key)
                self._over.pop(key, None)
                condition = sa.and_(condition, _RATE.c.key == key)
        with self._begin() as conn, conn.begin():
            conn.execute(sa.delete(_RATE).where(condition))
        self._fallback.reset(key)


def _short_key(key: str) -> str:
    """The key as stored: itself if short enough, else a hash of it."""
    if len(key) <= _MAX_KEY:
        return key
    return "h:" + hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=32).hexdigest()
