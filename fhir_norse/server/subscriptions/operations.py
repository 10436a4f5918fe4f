"""``Subscription/$status`` and ``Subscription/[id]/$events`` (Subscriptions R5 Backport IG STU 1.1).

* ``$status`` (https://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition-backport-subscription-status.html),
  instance or type level, GET or POST: a ``searchset`` Bundle with one SubscriptionStatus
  (``Parameters``, type ``query-status``) per Subscription: its status, topic,
  ``events-since-subscription-start`` and, when it failed, the ``error``. At type level, ``id`` and
  ``status`` (each repeatable, alternatives) choose the Subscriptions; without them, all (at most the
  server's page size).
* ``$events`` (https://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition-backport-subscription-events.html),
  instance level, GET or POST: the stored events numbered ``eventsSinceNumber`` (default 1) to
  ``eventsUntilNumber`` (default the last), at most the server's page size, as a notification Bundle
  (``history``, status type ``query-event``) with the content level ``content`` (default the
  Subscription's). A client that sees a gap in event numbers replays it here. ``full-resource`` includes
  what the caller may read.

Both need a token that may read Subscriptions (system scopes: 403 otherwise) and are audited as
``operation:status`` / ``operation:events``; an unknown Subscription is 404, a malformed parameter 400.
"""

from __future__ import annotations

import uuid
from typing import Any

from fhir_norse.outcomes import BadRequest
from fhir_norse.server.context import Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.operations.registry import PASSED_OVER, Operation, OperationCall, non_negative
from fhir_norse.server.repository import Repository, loads
from fhir_norse.server.resources import check_id
from fhir_norse.server.search.typed import Where
from fhir_norse.server.subscriptions import state
from fhir_norse.server.subscriptions.delivery import focus_reader
from fhir_norse.server.subscriptions.model import CONTENT_LEVELS, OP_EVENTS, OP_STATUS, content_level
from fhir_norse.server.subscriptions.notifications import notification_bundle, status_parameters

_STATUSES = frozenset({"requested", "active", "error", "off"})


def _status_of(repo: Repository, base: str, res_id: str, body: dict[str, Any]) -> dict[str, Any]:
    row = state.get_state(repo.uow.conn, res_id)
    error = body.get("error")
    return status_parameters(
        base=base,
        subscription_id=res_id,
        topic=str(body.get("criteria")),
        status=str(body.get("status")),
        notification_type="query-status",
        events_since_start=0 if row is None else row.events,
        error=error if isinstance(error, str) else None,
    )


def _check_params(call: OperationCall, allowed: set[str], name: str) -> list[tuple[str, str]]:
    pairs = call.all_params()
    for key, _ in pairs:
        if key not in allowed and key not in PASSED_OVER:
            raise BadRequest(f"Unknown parameter '{key}' for ${name}", code="not-supported")
    return pairs


def status_operation(service: FhirService, call: OperationCall) -> Result:
    """The handler of ``$status`` (module doc)."""
    base = call.ctx.base_url
    interaction = "operation:status"
    with service.audited_session(call.ctx, interaction, "Subscription", call.res_id, read_only=True) as repo:
        pairs = _check_params(call, {"id", "status"}, "status")
        statuses: list[dict[str, Any]] = []
        if call.res_id is not None:
            stored = repo.read("Subscription", call.res_id)  # 404 / 410 / 403 as a read; audited
            statuses.append(_status_of(repo, base, call.res_id, loads(stored.body_text)))
            repo.audit(interaction, "Subscription", call.res_id)
        else:
            ids = {v for k, v in pairs if k == "id" for v in v.split(",") if v}
            wanted = {v for k, v in pairs if k == "status" for v in v.split(",") if v}
            for res_id in ids:
                check_id(res_id)
            if wanted - _STATUSES:
                raise BadRequest(f"status must be one of {', '.join(sorted(_STATUSES))}", code="value")
            found = repo.find(Where("Subscription"), repo.kernel.max_count)
            for stored in sorted(found, key=lambda s: s.res_id):
                body = loads(stored.body_text)
                if (ids and stored.res_id not in ids) or (wanted and body.get("status") not in wanted):
                    continue
                statuses.append(_status_of(repo, base, stored.res_id, body))
            repo.audit(interaction, "Subscription", None)
    bundle = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "searchset",
        "total": len(statuses),
        "entry": [
            {"fullUrl": f"urn:uuid:{p['id']}", "resource": p, "search": {"mode": "match"}} for p in statuses
        ],
    }
    return Result(200, body=bundle)


def _number(name: str, value: str | None) -> int | None:
    return None if value is None else non_negative(name, value, code="value")


def events_operation(service: FhirService, call: OperationCall) -> Result:
    """The handler of ``Subscription/[id]/$events`` (module doc)."""
    assert call.res_id is not None
    interaction = "operation:events"
    with service.audited_session(call.ctx, interaction, "Subscription", call.res_id, read_only=True) as repo:
        pairs = _check_params(call, {"eventsSinceNumber", "eventsUntilNumber", "content"}, "events")
        given = dict(pairs)
        if len(given) != len(pairs):
            raise BadRequest("A parameter of $events is given more than once")
        stored = repo.read("Subscription", call.res_id)
        body = loads(stored.body_text)
        row = state.get_state(repo.uow.conn, call.res_id)
        last = 0 if row is None else row.events
        since = _number("eventsSinceNumber", given.get("eventsSinceNumber")) or 1
        until = _number("eventsUntilNumber", given.get("eventsUntilNumber"))
        until = last if until is None else min(until, last)
        content = given.get("content")
        if content is not None and content not in CONTENT_LEVELS:
            raise BadRequest("content is one of empty, id-only, full-resource", code="value")
        content = content or content_level(body)
        events = state.events_between(repo.uow.conn, call.res_id, since, until, repo.kernel.max_count)
        repo.audit(interaction, "Subscription", call.res_id)
    bundle = notification_bundle(
        base=call.ctx.base_url,
        subscription_id=call.res_id,
        topic=str(body.get("criteria")),
        status=str(body.get("status")),
        notification_type="query-event",
        events_since_start=last,
        events=events,
        content=content,
        focus=focus_reader(service, call.ctx.caller),
    )
    return Result(200, body=bundle)


STATUS = Operation(
    name="status",
    definition=OP_STATUS,
    types=("Subscription",),
    handler=status_operation,
    type_level=True,
    instance_level=True,
    idempotent=True,
    documentation=(
        "Subscriptions R5 Backport: the status of one Subscription, or (type level, id and status "
        "parameters) of several, as SubscriptionStatus Parameters in a searchset Bundle."
    ),
)
EVENTS = Operation(
    name="events",
    definition=OP_EVENTS,
    types=("Subscription",),
    handler=events_operation,
    type_level=False,
    instance_level=True,
    idempotent=True,
    documentation=(
        "Subscriptions R5 Backport: the stored events eventsSinceNumber..eventsUntilNumber of a "
        "Subscription as a notification Bundle (query-event), content empty | id-only | full-resource."
    ),
)
