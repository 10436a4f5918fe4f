"""The audit of refused requests that no verified credential vouches for, aggregated per source.

Anyone can send a request without a token, with a bad one, or a token request with a bad assertion.
Recorded one AuditEvent each, they let an unauthenticated client grow the database at will (issue 12:
200 refused requests wrote 480 events). So these refusals are counted per (source address, kind of
refusal) and window (``refusal_audit_window_seconds``):

* the first refusal of a window is recorded in full at once (its reason, the client it claimed);
* the later ones in the same window are only counted; the count is recorded as one event
  (:meth:`AuditRecorder.refusal_summary`: ``period`` and an ``entity.detail`` ``count``) when the
  window is over: on the next refusal from that source, at the latest one window later on any
  refusal (a sweep), else when the server shuts down (:meth:`RefusalAudit.flush`).

Memory is bounded: at most ``max_sources`` windows are open; a source beyond that is counted in one
window per kind for "other addresses" (its first refusal is still recorded in full). Counts not yet
written are lost if the process is killed (not on a normal shutdown).

Refusals of a caller whose token verified (403, 404 of the authorization rules) and token requests
refused after the client proved itself are the client's own doing and stay one event each.
Thread-safe: the counting is done under a lock, the writing (to the database) outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir_norse.auth.audit import REFUSED, TOKEN_GRANT, AuditRecorder

log = logging.getLogger("fhir_norse.audit")

__all__ = ["RefusalAudit"]

Event = dict[str, Any]
# The source of the refusals that found no room of their own (max_sources windows open).
_OTHERS: str | None = None


@dataclass(slots=True)
class _Window:
    opened: float  # on the monotonic clock
    first: datetime  # of the refusals counted, not recorded one by one
    last: datetime
    more: int = 0


class RefusalAudit:
    """Counts refusals by (kind, source address) and window; see the module documentation.

    Each ``*_refused`` method counts one refusal and returns the AuditEvents to record now (often
    none); :meth:`write` records them (call it off the event loop: it writes to the database).
    """

    def __init__(
        self,
        recorder: AuditRecorder,
        *,
        window: float = 60.0,
        max_sources: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window <= 0:
            raise ValueError("the refusal audit window must be positive")
        self.recorder = recorder
        self.window = float(window)
        self.max_sources = max_sources
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str | None], _Window] = {}
        self._swept = clock()

    def authentication_refused(
        self, kind: str, source: str | None, reason: str, request_id: str | None = None
    ) -> list[Event]:
        """A FHIR request refused before any caller was known: ``kind`` :data:`AUTHENTICATION` (401)
        or :data:`THROTTLED` (429), ``reason`` the answer's status and message."""
        return self._count(
            kind, source, lambda: self.recorder.authentication_refused(reason, source, request_id)
        )

    def token_refused(
        self, source: str | None, client_id: str | None, reason: str, scopes: str | None
    ) -> list[Event]:
        """A token request refused before the client proved itself (``client_id`` as claimed)."""
        return self._count(
            TOKEN_GRANT,
            source,
            lambda: self.recorder.token_grant_event(client_id, REFUSED, reason, source, scopes),
        )

    @property
    def open_windows(self) -> int:
        """How many windows are open (at most ``max_sources``, plus one per kind for the others)."""
        return len(self._windows)

    def flush(self) -> list[Event]:
        """The counts of every open window, as events to record (at shutdown); the windows are closed."""
        with self._lock:
            windows, self._windows = self._windows, {}
        return [self._summary(key, window) for key, window in windows.items() if window.more]

    def write(self, events: list[Event]) -> None:
        """Record ``events``. One that cannot be stored is logged, not raised: the refusal it
        records stands either way, and its client must not be able to turn it into a 500."""
        for event in events:
            try:
                self.recorder.emit(event)
            except Exception:
                log.exception("a refusal's AuditEvent could not be recorded")

    def _count(self, kind: str, source: str | None, first: Callable[[], Event]) -> list[Event]:
        now = self._clock()
        at = self.recorder.now()
        with self._lock:
            closed = self._sweep(now) if now - self._swept >= self.window else []
            key = (kind, source)
            window = self._windows.get(key)
            if window is not None and now - window.opened >= self.window:
                del self._windows[key]
                if window.more:
                    closed.append((key, window))
                window = None
            if window is None and len(self._windows) >= self.max_sources:
                closed += self._sweep(now)
                if len(self._windows) >= self.max_sources:
                    key = (kind, _OTHERS)
                    window = self._windows.get(key)
            if window is None:
                self._windows[key] = _Window(opened=now, first=at, last=at)
                opens = True
            else:
                if not window.more:
                    window.first = at
                window.more += 1
                window.last = at
                opens = False
        events = [self._summary(k, w) for k, w in closed]
        if opens:
            events.append(first())
        return events

    def _sweep(self, now: float) -> list[tuple[tuple[str, str | None], _Window]]:
        """Close the windows that are over (under the lock); those with a count, to be recorded."""
        self._swept = now
        over = [key for key, window in self._windows.items() if now - window.opened >= self.window]
        closed = [(key, self._windows.pop(key)) for key in over]
        return [(key, window) for key, window in closed if window.more]

    def _summary(self, key: tuple[str, str | None], window: _Window) -> Event:
        kind, source = key
        return self.recorder.refusal_summary(kind, source, window.more, window.first, window.last)
