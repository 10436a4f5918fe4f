"""SubscriptionTopics as R4 ``Basic`` resources (Subscriptions R5 Backport IG, "R4 topics").

https://hl7.org/fhir/uv/subscriptions-backport/components.html#subscription-topics. R4 has no
SubscriptionTopic; the IG represents one as a ``Basic`` (``code`` ``fhir-types#SubscriptionTopic``)
carrying the R5 elements as cross-version extensions, as its example ``Basic/r4-encounter-complete``
does: ``url``, ``version``, ``title``, ``status`` (a modifier extension) and, per triggering resource, a
``resourceTrigger`` (``resource``, ``supportedInteraction`` create | update | delete,
``fhirPathCriteria`` over ``%previous`` and ``%current``), ``canFilterBy`` (``resource``,
``filterParameter``) and ``notificationShape``.

The server's topics are files of the content pack (``profiles/Basic-topic-*.json``), published at
start-up like the other content and loaded here once. Only what the server evaluates is accepted: a
trigger without ``fhirPathCriteria`` fires on every supported interaction; ``queryCriteria`` is
refused at load (the server does not evaluate it), as is a filter parameter it does not know
(:data:`FILTER_PARAMETERS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from fhirpathpy import compile as compile_fhirpath

R5 = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic."
R4B = "http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic."
EXT_URL = R5 + "url"
EXT_VERSION = R5 + "version"
EXT_TITLE = R5 + "title"
EXT_STATUS = R5 + "status"
EXT_TRIGGER = R4B + "resourceTrigger"
EXT_FILTER = R4B + "canFilterBy"
TOPIC_CODE = ("http://hl7.org/fhir/fhir-types", "SubscriptionTopic")
CORE_SD = "http://hl7.org/fhir/StructureDefinition/"
INTERACTIONS = frozenset({"create", "update", "delete"})

# The filter parameters the server evaluates (fhir_norse/server/subscriptions/matching.py): the focus's
# patient, its code, and the patient's care team or organization.
FILTER_PARAMETERS = frozenset({"patient", "code", "care-team", "organization"})


class TopicError(ValueError):
    """A topic file the server cannot evaluate."""


def _ext(element: Mapping[str, Any], url: str) -> list[Mapping[str, Any]]:
    return [e for e in element.get("extension") or [] if isinstance(e, Mapping) and e.get("url") == url]


def _value(ext: Mapping[str, Any]) -> Any:
    return next((v for k, v in ext.items() if k.startswith("value")), None)


def _one(element: Mapping[str, Any], url: str) -> Any:
    found = _ext(element, url)
    return _value(found[0]) if found else None


def is_topic(resource: Mapping[str, Any]) -> bool:
    """Whether ``resource`` is a backported SubscriptionTopic (a Basic with the IG's code)."""
    if resource.get("resourceType") != "Basic":
        return False
    codings = (resource.get("code") or {}).get("coding") or []
    return any((c.get("system"), c.get("code")) == TOPIC_CODE for c in codings if isinstance(c, Mapping))


def topic_canonical(resource: Mapping[str, Any]) -> tuple[str, str] | None:
    """(url, version) of a backported topic, or None when it has no url."""
    url, version = _one(resource, EXT_URL), _one(resource, EXT_VERSION)
    if not isinstance(url, str):
        return None
    return url, version if isinstance(version, str) else ""


@dataclass(frozen=True, slots=True)
class Trigger:
    """One ``resourceTrigger``: a type, the interactions, and the compiled FHIRPath criteria."""

    res_type: str
    interactions: frozenset[str]
    expression: str | None
    criteria: Callable[..., Any] | None

    def fires(self, interaction: str, previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> bool:
        """Whether a change (``previous`` None for a create) fires this trigger."""
        if interaction not in self.interactions:
            return False
        if self.criteria is None:
            return True
        result = self.criteria(
            {}, {"previous": [] if previous is None else dict(previous), "current": dict(current)}
        )
        return bool(result == [True])


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """One ``canFilterBy``: a type and a filter parameter."""

    res_type: str
    parameter: str
    description: str


@dataclass(frozen=True, slots=True)
class Topic:
    url: str
    version: str
    title: str
    triggers: tuple[Trigger, ...]
    filters: tuple[TopicFilter, ...]

    @property
    def types(self) -> frozenset[str]:
        return frozenset(t.res_type for t in self.triggers)

    def fires(
        self, res_type: str, interaction: str, previous: Mapping[str, Any] | None, current: Mapping[str, Any]
    ) -> bool:
        return any(t.res_type == res_type and t.fires(interaction, previous, current) for t in self.triggers)

    def can_filter(self, res_type: str, parameter: str) -> bool:
        return any(f.res_type == res_type and f.parameter == parameter for f in self.filters)


def _type_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TopicError("resource must name a resource type")
    return value.removeprefix(CORE_SD)


def read_topic(resource: Mapping[str, Any]) -> Topic:
    """The topic in a backported SubscriptionTopic Basic (:class:`TopicError` if not evaluable)."""
    canonical = topic_canonical(resource)
    if not is_topic(resource) or canonical is None:
        raise TopicError("not a backported SubscriptionTopic (Basic with url)")
    triggers: list[Trigger] = []
    for ext in _ext(resource, EXT_TRIGGER):
        parts = ext.get("extension") or []
        names = {p.get("url") for p in parts}
        if "queryCriteria" in names:
            raise TopicError(
                f"{canonical[0]}: queryCriteria is not evaluated by this server; use fhirPathCriteria"
            )
        interactions = frozenset(_value(p) for p in parts if p.get("url") == "supportedInteraction")
        if not interactions or not interactions <= INTERACTIONS:
            raise TopicError(f"{canonical[0]}: supportedInteraction must be create, update or delete")
        expression = _one(ext, "fhirPathCriteria")
        triggers.append(
            Trigger(
                res_type=_type_name(_one(ext, "resource")),
                interactions=frozenset(str(i) for i in interactions),
                expression=expression if isinstance(expression, str) else None,
                criteria=compile_fhirpath(expression, None) if isinstance(expression, str) else None,
            )
        )
    if not triggers:
        raise TopicError(f"{canonical[0]}: a topic needs at least one resourceTrigger")
    filters: list[TopicFilter] = []
    for ext in _ext(resource, EXT_FILTER):
        parameter = _one(ext, "filterParameter")
        if parameter not in FILTER_PARAMETERS:
            raise TopicError(
                f"{canonical[0]}: filter parameter {parameter!r} is not evaluated by this server"
            )
        description = _one(ext, "description")
        filters.append(TopicFilter(_type_name(_one(ext, "resource")), str(parameter), str(description or "")))
    return Topic(
        url=canonical[0],
        version=canonical[1],
        title=str(_one(resource, EXT_TITLE) or canonical[0]),
        triggers=tuple(triggers),
        filters=tuple(filters),
    )


def topic_files(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The backported topics of the content pack under ``root`` (``profiles/``)."""
    base = root / "profiles"
    if not base.is_dir():
        return
    for path in sorted(base.glob("*.json")):
        resource = orjson.loads(path.read_bytes())
        if isinstance(resource, dict) and is_topic(resource):
            yield path, resource


class TopicRegistry:
    """The topics the server runs, by canonical url (with or without ``|version``)."""

    def __init__(self, topics: list[Topic]) -> None:
        self._by_url = {t.url: t for t in topics}
        self._by_canonical = {f"{t.url}|{t.version}": t for t in topics}

    def __iter__(self) -> Iterator[Topic]:
        return iter(self._by_url.values())

    def __len__(self) -> int:
        return len(self._by_url)

    def get(self, canonical: str) -> Topic | None:
        return self._by_canonical.get(canonical) or self._by_url.get(canonical)

    def for_type(self, res_type: str) -> list[Topic]:
        return [t for t in self._by_url.values() if res_type in t.types]

    def trigger_types(self) -> frozenset[str]:
        return frozenset(rt for t in self._by_url.values() for rt in t.types)


@cache
def load_topics(root: Path) -> TopicRegistry:
    """The topics of the content pack under ``root``, loaded once (:class:`TopicError` on a bad one)."""
    topics: list[Topic] = []
    for path, resource in topic_files(root):
        try:
            topics.append(read_topic(resource))
        except TopicError as error:
            raise TopicError(f"{path.name}: {error}") from error
    return TopicRegistry(topics)
