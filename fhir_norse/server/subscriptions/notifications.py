"""Notification Bundles and SubscriptionStatus in their R4 form (Subscriptions R5 Backport IG STU 1.1).

https://hl7.org/fhir/uv/subscriptions-backport/notifications.html and
https://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition-backport-subscription-notification-r4.html:
a notification is a ``history`` Bundle whose first entry is the SubscriptionStatus, a ``Parameters``
(profile ``backport-subscription-status-r4``: ``subscription``, ``topic``, ``status``, ``type``,
``events-since-subscription-start``, one ``notification-event`` per event with ``event-number``,
``timestamp`` and, unless the content is ``empty``, ``focus``), with ``request`` ``GET
Subscription/[id]/$status`` and ``response`` 200. Then, per event:

* ``empty``: nothing more (no focus either: https://hl7.org/fhir/uv/subscriptions-backport/payloads.html);
* ``id-only``: an entry with the focus's ``fullUrl`` and ``request``/``response`` but no resource;
* ``full-resource``: the same entry with the focus resource as it was at the event (that version), if
  the Subscription's owner may read it; otherwise without it (``request``/``response`` only, as the IG
  asks when a server cannot include the content).

``topic`` is left out of ``empty`` notifications (the profile: "SHOULD NOT be present when using empty
payloads").
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from fhir_norse.server.subscriptions.model import PROFILE_NOTIFICATION, PROFILE_STATUS
from fhir_norse.server.subscriptions.state import Event

JsonDict = dict[str, Any]
# (event) -> the focus resource to include, or None (not readable by the owner, or gone).
FocusReader = Callable[[Event], JsonDict | None]


def instant(moment: datetime) -> str:
    """A FHIR instant (UTC, milliseconds) for a naive-UTC or aware datetime."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_parameters(
    *,
    base: str,
    subscription_id: str,
    topic: str,
    status: str,
    notification_type: str,
    events_since_start: int,
    events: Sequence[Event] = (),
    content: str = "id-only",
    error: str | None = None,
) -> JsonDict:
    """The SubscriptionStatus as a ``Parameters`` (profile ``backport-subscription-status-r4``)."""
    params: list[JsonDict] = [
        {"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/{subscription_id}"}},
    ]
    if content != "empty":
        params.append({"name": "topic", "valueCanonical": topic})
    params += [
        {"name": "status", "valueCode": status},
        {"name": "type", "valueCode": notification_type},
        {"name": "events-since-subscription-start", "valueString": str(events_since_start)},
    ]
    for event in events:
        parts: list[JsonDict] = [
            {"name": "event-number", "valueString": str(event.number)},
            {"name": "timestamp", "valueInstant": instant(event.occurred_at)},
        ]
        if content != "empty":
            parts.append(
                {
                    "name": "focus",
                    "valueReference": {"reference": f"{base}/{event.focus_type}/{event.focus_id}"},
                }
            )
        params.append({"name": "notification-event", "part": parts})
    if error:
        params.append({"name": "error", "valueCodeableConcept": {"text": error}})
    return {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [PROFILE_STATUS]},
        "parameter": params,
    }


def notification_bundle(
    *,
    base: str,
    subscription_id: str,
    topic: str,
    status: str,
    notification_type: str,
    events_since_start: int,
    events: Sequence[Event] = (),
    content: str = "id-only",
    focus: FocusReader | None = None,
    error: str | None = None,
    now: datetime | None = None,
) -> JsonDict:
    """A notification Bundle (module doc): handshake, heartbeat, event-notification or query-event."""
    parameters = status_parameters(
        base=base,
        subscription_id=subscription_id,
        topic=topic,
        status=status,
        notification_type=notification_type,
        events_since_start=events_since_start,
        events=events,
        content=content,
        error=error,
    )
    entries: list[JsonDict] = [
        {
            "fullUrl": f"urn:uuid:{parameters['id']}",
            "resource": parameters,
            "request": {"method": "GET", "url": f"Subscription/{subscription_id}/$status"},
            "response": {"status": "200"},
        }
    ]
    if content != "empty":
        for event in events:
            created = event.interaction == "create"
            entry: JsonDict = {"fullUrl": f"{base}/{event.focus_type}/{event.focus_id}"}
            if content == "full-resource" and focus is not None:
                resource = focus(event)
                if resource is not None:
                    entry["resource"] = resource
            entry["request"] = {
                "method": "POST" if created else "PUT",
                "url": event.focus_type if created else f"{event.focus_type}/{event.focus_id}",
            }
            entry["response"] = {"status": "201" if created else "200", "etag": f'W/"{event.focus_version}"'}
            entries.append(entry)
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [PROFILE_NOTIFICATION]},
        "type": "history",
        "timestamp": instant(now or datetime.now(UTC)),
        "entry": entries,
    }
