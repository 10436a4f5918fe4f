"""Delivery of topic-based Subscription notifications over rest-hook (Subscriptions R5 Backport IG).

https://hl7.org/fhir/uv/subscriptions-backport/channels.html#rest-hook and
https://hl7.org/fhir/uv/subscriptions-backport/errors.html. A background thread in every server process
runs :meth:`SubscriptionDelivery.tick` every ``interval_s``, and at once when a transaction that wrote
events or a ``requested`` Subscription commits (in this process, or on PostgreSQL in any:
:mod:`.wakeup`); a lease row
(``scheduler_lease``, name ``subscriptions``) lets one process at a time deliver, so each
Subscription's notifications leave in order. Per Subscription whose next attempt is due
(``subscription_state.retry_at``), one of:

* **handshake** while it is ``requested`` (or its handshake has not reached the endpoint yet): a
  ``handshake`` notification; a 2xx makes it ``active``;
* **events** while some are not acknowledged: one ``event-notification`` per event, in event-number
  order, the next only after the previous got a 2xx (at least once: an event is marked delivered only
  after its 2xx, so a crash between the two sends it again);
* **heartbeat** when ``backport-heartbeat-period`` seconds passed without a notification reaching it.

Every POST carries ``Content-Type: application/fhir+json`` and the Subscription's ``channel.header``
values (opened from their sealed form), and waits at most ``backport-timeout`` seconds (capped by the
site's ``timeout_s``; redirects are not followed). A failure (no answer, a timeout, a status other than
2xx) is logged, sets the Subscription to ``error`` (with ``Subscription.error`` saying what failed) and
schedules the next attempt after an exponential backoff (``retry_base_s`` doubled per consecutive
failure, at most ``retry_max_s``); after ``max_failures`` consecutive failures it is set ``off`` (its
owner sets it ``requested`` again to restart it). The first success after failures makes it ``active``.
Status changes are new versions of the Subscription written by the server as the client
``fhir-norse-subscriptions``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import sqlalchemy as sa

from fhir_norse.auth.caller import Caller
from fhir_norse.auth.sealed import SealError
from fhir_norse.outcomes import FhirError, Forbidden
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.leased import LeasedWorker, naive_utc
from fhir_norse.server.repository import JsonDict, loads
from fhir_norse.server.subscriptions import state
from fhir_norse.server.subscriptions.hooks import SubscriptionHook, doorbell_of
from fhir_norse.server.subscriptions.model import PAYLOAD_TYPE, SubscriptionSpec, parse_subscription
from fhir_norse.server.subscriptions.notifications import notification_bundle
from fhir_norse.server.subscriptions.state import Event, State
from fhir_norse.server.subscriptions.wakeup import Listener

log = logging.getLogger(__name__)

DELIVERY_CALLER = Caller(
    client_id="fhir-norse-subscriptions", scopes=frozenset({"system/Subscription.cru"}), source="local"
)
LEASE_NAME = "subscriptions"
# Events sent per Subscription and tick (the rest follow in the next tick).
_BATCH = 100


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class LeaseLost(Exception):
    """Another process holds the delivery lease (this one stalled past it): stop this tick."""


@dataclass
class DeliveryReport:
    """What one tick sent (subscription id, notification type, event number) and which failed."""

    ran: bool = True
    sent: list[tuple[str, str, int | None]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class SubscriptionDelivery(LeasedWorker):
    """The delivery worker (module doc)."""

    thread_name = "fhir-norse-subscriptions"
    lease_name = LEASE_NAME

    def __init__(
        self,
        service: FhirService,
        hook: SubscriptionHook,
        *,
        base_url: str,
        interval_s: float,
        retry_base_s: float,
        retry_max_s: float,
        max_failures: int,
        timeout_s: float,
        now: Callable[[], datetime] = _now,
        lease_s: float | None = None,
    ) -> None:
        # Renewed before every POST (:meth:`_send`), so it only has to outlast one POST and the steps
        # around it; a crashed holder's lease expires that soon after.
        super().__init__(
            service.storage,
            interval_s=interval_s,
            lease=timedelta(
                seconds=lease_s if lease_s is not None else max(5.0, 2 * timeout_s + 2 * interval_s)
            ),
        )
        self.service = service
        self.hook = hook
        self.base_url = base_url.rstrip("/")
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.max_failures = max_failures
        self.timeout_s = timeout_s
        self.now = now
        self.ctx = RequestContext(caller=DELIVERY_CALLER, base_url=self.base_url)
        self._http: httpx.Client | None = None
        self._last_failure = ""
        self._listener = Listener(service.storage.engine, f"{self.thread_name}-{self.holder}")
        doorbell = doorbell_of(service.kernel.hooks)
        if doorbell is not None:
            doorbell.listen(self.wake)
            doorbell.across_processes(self._listener.address)

    def http(self) -> httpx.Client:
        """The worker's HTTP client (connections kept alive between notifications), made on first use."""
        if self._http is None:
            self._http = httpx.Client(follow_redirects=False)
        return self._http

    # ------------------------------------------------------------------ the tick
    def tick(self) -> DeliveryReport:
        """One round over the due Subscriptions, if this process holds the lease."""
        now = self.now()
        if not self.acquire(now):
            return DeliveryReport(ran=False)
        report = DeliveryReport()
        with self.service.storage.read() as view:
            due = state.due_states(view.conn, now)
        for row in due:
            try:
                self._serve(row, report)
            except LeaseLost:
                log.warning("subscription delivery lease lost to another process; it delivers from here")
                report.ran = False
                break
            except Exception:
                log.exception("subscription %s: delivery failed unexpectedly", row.subscription_id)
        return report

    def _serve(self, row: State, report: DeliveryReport) -> None:
        with self.service.storage.read() as view:
            stored = view.current("Subscription", row.subscription_id)
        if stored is None or stored.deleted:
            return
        body = loads(stored.body_text)
        status = str(body.get("status"))
        if status == "off":
            return
        try:
            spec = parse_subscription(stored.res_id, body, self.hook.topics, allow_http=True)
        except FhirError as error:
            self._failed(row, None, f"the Subscription cannot be delivered: {error.message}", report)
            return
        if status == "requested" or not row.handshake_done:
            if not self._send(row, spec, "handshake", status, (), report):
                return
            with self.service.storage.write() as uow:
                state.update_state(
                    uow.conn, row.subscription_id, handshake_done=True, failures=0, last_sent_at=self.now()
                )
            self._set_status(row.subscription_id, "active", None)
            status = "active"
            row = state_of(self.service, row.subscription_id) or row
        if row.events > row.delivered:
            self._deliver_events(row, spec, status, report)
            return
        if spec.heartbeat_s is None:
            return
        last = row.last_sent_at
        due = last is None or self.now() - last >= timedelta(seconds=spec.heartbeat_s)
        if due and self._send(row, spec, "heartbeat", status, (), report):
            with self.service.storage.write() as uow:
                state.update_state(uow.conn, row.subscription_id, last_sent_at=self.now(), failures=0)

    def _deliver_events(
        self, row: State, spec: SubscriptionSpec, status: str, report: DeliveryReport
    ) -> None:
        """The pending events in order, in notifications of at most ``backport-max-count`` events (one
        without it), each POSTed only after the previous one got its 2xx. The
        acknowledged number is written once for the run of successes (before a failure is recorded, and
        at the end): a crash in between sends those events again, which at-least-once allows."""
        with self.service.storage.read() as view:
            events = state.events_between(
                view.conn, row.subscription_id, row.delivered + 1, row.events, _BATCH
            )
        acknowledged = row.delivered
        # Consecutive pending events share a notification up to the subscriber's backport-max-count
        # (without it, one event per notification).
        size = max(1, spec.max_count or 1)
        try:
            for start in range(0, len(events), size):
                chunk = tuple(events[start : start + size])
                if not self._send(
                    row, spec, "event-notification", status, chunk, report, record_failure=False
                ):
                    break
                acknowledged = chunk[-1].number
        finally:
            if acknowledged > row.delivered:
                self._acknowledge(row.subscription_id, acknowledged)
        if acknowledged < (events[-1].number if events else row.delivered):
            self._failed(row, spec, self._last_failure, report)
            return
        if events and status == "error":
            self._set_status(row.subscription_id, "active", None)
        if not events:
            # Nothing stored past the acknowledged number (the events were removed): nothing to wait for.
            with self.service.storage.write() as uow:
                state.update_state(uow.conn, row.subscription_id, delivered=row.events)

    def _acknowledge(self, subscription_id: str, number: int) -> None:
        now = self.now()
        with self.service.storage.write() as uow:
            uow.conn.execute(
                sa.update(state.STATE)
                .where(state.STATE.c.subscription_id == subscription_id, state.STATE.c.delivered < number)
                .values(delivered=number, last_sent_at=now, failures=0, updated_at=now)
            )

    # ------------------------------------------------------------------ one POST
    def _send(
        self,
        row: State,
        spec: SubscriptionSpec,
        notification_type: str,
        status: str,
        events: tuple[Event, ...],
        report: DeliveryReport,
        *,
        record_failure: bool = True,
    ) -> bool:
        """POST one notification; on failure answer False, and record it (:meth:`_failed`) unless the
        caller does (``record_failure`` False: the reason is kept in ``_last_failure``)."""
        bundle = notification_bundle(
            base=self.base_url,
            subscription_id=spec.res_id,
            topic=spec.topic,
            status=status,
            notification_type=notification_type,
            events_since_start=row.events if not events else max(e.number for e in events),
            events=events,
            content=spec.content,
            focus=self._focus_reader(row),
        )
        try:
            headers = {"Content-Type": PAYLOAD_TYPE}
            for header in self.hook.headers(row.headers_sealed, row.subscription_id):
                name, _, value = header.partition(":")
                headers[name.strip()] = value.strip()
        except SealError as error:
            return self._failure(row, spec, str(error), report, record_failure)
        timeout = min(float(spec.timeout_s or self.timeout_s), self.timeout_s)
        now = self.now()
        # Renewed when less than half of it is left: long enough for this POST, one write at most.
        if now >= self.lease_until - self.lease / 2 and not self.acquire(now):
            raise LeaseLost
        number = events[0].number if events else None
        try:
            answer = self.http().post(
                spec.endpoint, content=orjson.dumps(bundle), headers=headers, timeout=timeout
            )
        except httpx.HTTPError as error:
            reason = f"{notification_type} to {spec.endpoint} failed: {type(error).__name__}"
            return self._failure(row, spec, reason, report, record_failure)
        if not 200 <= answer.status_code < 300:
            reason = f"{notification_type} to {spec.endpoint} answered {answer.status_code}"
            return self._failure(row, spec, reason, report, record_failure)
        report.sent.append((spec.res_id, notification_type, number))
        return True

    def _failure(
        self, row: State, spec: SubscriptionSpec, reason: str, report: DeliveryReport, record: bool
    ) -> bool:
        self._last_failure = reason
        if record:
            self._failed(row, spec, reason, report)
        return False

    def _focus_reader(self, row: State) -> Callable[[Event], JsonDict | None]:
        """What a full-resource notification may carry: what the Subscription's owner (its client and
        the scopes it had when it created the Subscription) may read."""
        owner = Caller(client_id=row.owner_client_id, scopes=row.owner_scopes, source="subscription")
        return focus_reader(self.service, owner)

    def _failed(self, row: State, spec: SubscriptionSpec | None, reason: str, report: DeliveryReport) -> None:
        current = state_of(self.service, row.subscription_id) or row
        failures = current.failures + 1
        delay = min(self.retry_base_s * 2 ** (failures - 1), self.retry_max_s)
        with self.service.storage.write() as uow:
            state.update_state(
                uow.conn,
                row.subscription_id,
                failures=failures,
                retry_at=self.now() + timedelta(seconds=delay),
            )
        report.failed.append(row.subscription_id)
        off = failures >= self.max_failures
        log.warning(
            "subscription %s: %s (failure %d of %d%s)",
            row.subscription_id,
            reason,
            failures,
            self.max_failures,
            "; set off" if off else f"; next attempt in {delay:g} s",
        )
        self._set_status(row.subscription_id, "off" if off else "error", reason)

    def _set_status(self, subscription_id: str, status: str, error: str | None) -> None:
        """A new version of the Subscription with ``status`` (and ``error``), unless its owner turned it
        off meanwhile or nothing changes."""
        with self.service.session(self.ctx) as repo:
            stored = repo.current_locked("Subscription", subscription_id)
            if stored is None or stored.deleted:
                return
            body: dict[str, Any] = loads(stored.body_text)
            if body.get("status") == "off" or (body.get("status") == status and body.get("error") == error):
                return
            body["status"] = status
            if error:
                body["error"] = error
            else:
                body.pop("error", None)
            repo.as_server().update("Subscription", subscription_id, body)
            repo.audit("update", "Subscription", subscription_id)

    # ------------------------------------------------------------------ the thread
    def wake(self) -> None:
        """Deliver now rather than at the next poll: events were committed (from any thread)."""
        super().wake()
        self._listener.ring()

    def wait(self, timeout: float) -> None:
        """Wait for the next poll, a wake-up in this process or one from another (PostgreSQL: a
        ``NOTIFY``; SQLite: a datagram to the lease holder; module :mod:`.wakeup`). A listener just
        opened does not wait: events committed before it listened were announced to nobody, so the next
        round looks at once."""
        self._listener.holding = self.lease_until > naive_utc(self.now())
        if self._listener.open():
            return
        self._listener.wait(timeout, self._wake)

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread, give the lease back, close the listener and the HTTP client."""
        super().stop(timeout)
        self._listener.close()
        if self._http is not None:
            self._http.close()
            self._http = None


def state_of(service: FhirService, subscription_id: str) -> State | None:
    with service.storage.read() as view:
        return state.get_state(view.conn, subscription_id)


def focus_reader(service: FhirService, reader: Caller) -> Callable[[Event], JsonDict | None]:
    """The focus of an event at the event's version, if ``reader``'s scopes allow reading its type with
    system access (a Subscription belongs to no patient: only system clients own one); else None."""

    def read(event: Event) -> JsonDict | None:
        try:
            access = service.kernel.policy.grant(reader, "read", event.focus_type)
        except Forbidden:
            return None
        if access.restricted:
            return None
        with service.storage.read() as view:
            stored = view.version(event.focus_type, event.focus_id, event.focus_version)
        if stored is None or stored.deleted:
            return None
        return loads(stored.body_text)

    return read
