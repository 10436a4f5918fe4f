"""A topic-based Subscription in its R4 form (Subscriptions R5 Backport IG STU 1.1), read and checked.

https://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition-backport-subscription.html:

* ``criteria``: the canonical of a SubscriptionTopic this server runs (:mod:`.topics`), with or without
  ``|version``; its filters in ``_criteria`` as ``backport-filter-criteria`` extensions, each a search
  query ``[type]?[param]=[value](&[param]=[value])*`` over the topic's ``canFilterBy`` (every filter
  must match; comma-separated values are alternatives);
* ``channel.type`` ``rest-hook`` (the only channel this server delivers on), ``channel.endpoint`` an
  ``https`` URL (``http`` only to a loopback address, or anywhere when the site allows it),
  ``channel.payload`` ``application/fhir+json`` with ``backport-payload-content`` on ``_payload``:
  ``empty`` | ``id-only`` (the default) | ``full-resource``;
* ``channel`` extensions ``backport-heartbeat-period`` (seconds), ``backport-timeout`` (seconds,
  capped by the site's setting) and ``backport-max-count`` (the most events one notification carries:
  the pending events of a subscription go out in order, up to that many per notification; without it,
  one per notification);
* ``channel.header``: ``Name: value`` strings sent with every notification (the subscriber's secret):
  kept sealed apart from the resource and never returned (:mod:`.hooks`).

Anything else is refused with 400 and an OperationOutcome naming the element.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fhir_norse.outcomes import BadRequest
from fhir_norse.server.subscriptions.topics import Topic, TopicRegistry

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport"
SD = f"{BACKPORT}/StructureDefinition/"
EXT_FILTER_CRITERIA = SD + "backport-filter-criteria"
EXT_PAYLOAD_CONTENT = SD + "backport-payload-content"
EXT_HEARTBEAT = SD + "backport-heartbeat-period"
EXT_TIMEOUT = SD + "backport-timeout"
EXT_MAX_COUNT = SD + "backport-max-count"
PROFILE_SUBSCRIPTION = SD + "backport-subscription"
PROFILE_STATUS = SD + "backport-subscription-status-r4"
PROFILE_NOTIFICATION = SD + "backport-subscription-notification-r4"
EXT_TOPIC_CANONICAL = SD + "capabilitystatement-subscriptiontopic-canonical"
OP_STATUS = f"{BACKPORT}/OperationDefinition/backport-subscription-status"
OP_EVENTS = f"{BACKPORT}/OperationDefinition/backport-subscription-events"

CONTENT_LEVELS = ("empty", "id-only", "full-resource")
DEFAULT_CONTENT = "id-only"
PAYLOAD_TYPE = "application/fhir+json"
# Statuses under which events are recorded for the Subscription (off: none).
LIVE_STATUSES = ("requested", "active", "error")
_HEADER = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*)$")
# Headers the server sets itself on every notification.
_RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding", "connection"})


@dataclass(frozen=True, slots=True)
class Filter:
    """One filter: the focus type, the topic's filter parameter, and its alternatives."""

    res_type: str
    parameter: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    """What delivery needs of a Subscription resource (module doc)."""

    res_id: str
    status: str
    topic: str  # the topic's url, without version
    filters: tuple[Filter, ...]
    endpoint: str
    content: str
    heartbeat_s: int | None
    timeout_s: int | None
    max_count: int | None


def _ext_values(element: Mapping[str, Any] | None, url: str) -> list[Any]:
    out = []
    for ext in (element or {}).get("extension") or []:
        if isinstance(ext, Mapping) and ext.get("url") == url:
            out.append(next((v for k, v in ext.items() if k.startswith("value")), None))
    return out


def _one_int(element: Mapping[str, Any] | None, url: str, where: str, minimum: int) -> int | None:
    values = _ext_values(element, url)
    if not values:
        return None
    if (
        len(values) > 1
        or not isinstance(values[0], int)
        or isinstance(values[0], bool)
        or values[0] < minimum
    ):
        raise BadRequest(
            f"{url.rsplit('/', 1)[-1]} takes one integer of at least {minimum}", expression=where
        )
    return int(values[0])


def _filters(body: Mapping[str, Any], topic: Topic) -> tuple[Filter, ...]:
    out: list[Filter] = []
    for query in _ext_values(body.get("_criteria"), EXT_FILTER_CRITERIA):
        if not isinstance(query, str) or "?" not in query:
            raise BadRequest(
                "backport-filter-criteria is a query '[type]?[parameter]=[value]'",
                expression="Subscription.criteria",
            )
        res_type, _, params = query.partition("?")
        pairs = parse_qsl(params, keep_blank_values=True)
        if not pairs:
            raise BadRequest(f"Filter '{query}' names no parameter", expression="Subscription.criteria")
        for name, value in pairs:
            if not topic.can_filter(res_type, name):
                allowed = ", ".join(sorted(f"{f.res_type}?{f.parameter}" for f in topic.filters)) or "none"
                raise BadRequest(
                    f"Topic {topic.url} cannot filter by '{res_type}?{name}' (it can filter by: {allowed})",
                    code="not-supported",
                    expression="Subscription.criteria",
                )
            values = tuple(v.strip() for v in value.split(",") if v.strip())
            if not values:
                raise BadRequest(
                    f"Filter '{query}' gives '{name}' no value", expression="Subscription.criteria"
                )
            out.append(Filter(res_type, name, values))
    return tuple(out)


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _endpoint(channel: Mapping[str, Any], allow_http: bool) -> str:
    endpoint = channel.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise BadRequest(
            "A rest-hook Subscription needs channel.endpoint",
            code="required",
            expression="Subscription.channel.endpoint",
        )
    parts = urlsplit(endpoint)
    if parts.scheme == "https" and parts.hostname:
        return endpoint
    if parts.scheme == "http" and parts.hostname and (allow_http or _loopback(parts.hostname)):
        return endpoint
    raise BadRequest(
        "channel.endpoint must be an https URL (http only to a loopback address)",
        code="value",
        expression="Subscription.channel.endpoint",
    )


def parse_headers(channel: Mapping[str, Any]) -> list[str] | None:
    """The ``channel.header`` strings, checked (None when absent)."""
    headers = channel.get("header")
    if headers is None:
        return None
    if not isinstance(headers, list):
        raise BadRequest("channel.header is a list of strings", expression="Subscription.channel.header")
    for n, header in enumerate(headers):
        match = _HEADER.match(header) if isinstance(header, str) else None
        if match is None or match.group(1).lower() in _RESERVED_HEADERS:
            raise BadRequest(
                "Each channel.header is 'Name: value' (a valid HTTP header other than Content-Type, "
                "Content-Length, Host, Transfer-Encoding, Connection)",
                expression=f"Subscription.channel.header[{n}]",
            )
    return list(headers)


def parse_subscription(
    res_id: str, body: Mapping[str, Any], topics: TopicRegistry, *, allow_http: bool = False
) -> SubscriptionSpec:
    """The Subscription in ``body``, checked against the topics (400 naming the element otherwise)."""
    criteria = body.get("criteria")
    topic = topics.get(criteria) if isinstance(criteria, str) else None
    if topic is None:
        known = ", ".join(sorted(t.url for t in topics)) or "none"
        raise BadRequest(
            f"Subscription.criteria must be the canonical of a SubscriptionTopic of this server ({known})",
            code="not-supported",
            expression="Subscription.criteria",
        )
    channel = body.get("channel") or {}
    if channel.get("type") != "rest-hook":
        raise BadRequest(
            "This server delivers notifications on channel type rest-hook only",
            code="not-supported",
            expression="Subscription.channel.type",
        )
    endpoint = _endpoint(channel, allow_http)
    if channel.get("payload") != PAYLOAD_TYPE:
        raise BadRequest(
            f"channel.payload must be {PAYLOAD_TYPE}",
            code="not-supported",
            expression="Subscription.channel.payload",
        )
    contents = _ext_values(channel.get("_payload"), EXT_PAYLOAD_CONTENT)
    if len(contents) > 1 or (contents and contents[0] not in CONTENT_LEVELS):
        raise BadRequest(
            "backport-payload-content is one of empty, id-only, full-resource",
            code="value",
            expression="Subscription.channel.payload",
        )
    parse_headers(channel)
    return SubscriptionSpec(
        res_id=res_id,
        status=str(body.get("status")),
        topic=topic.url,
        filters=_filters(body, topic),
        endpoint=endpoint,
        content=str(contents[0]) if contents else DEFAULT_CONTENT,
        heartbeat_s=_one_int(channel, EXT_HEARTBEAT, "Subscription.channel", 1),
        timeout_s=_one_int(channel, EXT_TIMEOUT, "Subscription.channel", 1),
        max_count=_one_int(channel, EXT_MAX_COUNT, "Subscription.channel", 1),
    )


def content_level(body: Mapping[str, Any]) -> str:
    """The content level a stored Subscription asks for (``backport-payload-content``; default id-only)."""
    contents = _ext_values((body.get("channel") or {}).get("_payload"), EXT_PAYLOAD_CONTENT)
    return str(contents[0]) if contents and contents[0] in CONTENT_LEVELS else DEFAULT_CONTENT
