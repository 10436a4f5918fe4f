"""Published content and canonical urls: the content pack's resources belong to the server.

A response is validated and scored against the Questionnaire its ``questionnaire`` canonical names, so
whoever could store another resource under a published canonical could change what intake checks and
what it scores. Three rules hold on every write path (REST, Bundle entries, conditional interactions),
checked by the repository under a lock keyed by type and url (so two concurrent writes of one canonical
cannot both pass):

* ``url|version`` names one live resource per canonical resource type (R4: every type with a ``url``
  and a ``version``; a resource without ``version`` shares its key with the other versionless ones): a
  second one is a 409 ``duplicate``.
* The urls of the content pack belong to the server, in every version: a client may not create or
  update another resource of that type under such a url (a copy would shadow the published version; a
  newer version would become what a bare canonical resolves to): 409. A new version is a new file in
  the pack, published at start-up (:mod:`fhir_norse.server.content`).
* A published resource never changes (405 on update, patch and delete), and only the server publishes:
  a client's resource carrying the ``published`` tag is refused (403).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import orjson

from fhir_norse import definitions
from fhir_norse.canonicals import CS_CONTENT_TAGS
from fhir_norse.outcomes import Conflict, Forbidden, MethodNotAllowed

# The types the content pack publishes (fhir_norse.server.content).
CONTENT_TYPES = frozenset(
    {
        "Questionnaire",
        "CodeSystem",
        "ValueSet",
        "ConceptMap",
        "StructureDefinition",
        "Library",
        "OperationDefinition",
        "SearchParameter",
    }
)
PUBLISHED_TAG = {"system": CS_CONTENT_TAGS, "code": "published"}
# Published content without url and version elements: the backported SubscriptionTopics (Basic).
PUBLISHED_OTHER_TYPES = frozenset({"Basic"})


@cache
def canonical_types() -> frozenset[str]:
    """The resource types of the R4 definitions this server ships that have a ``url`` and a ``version``."""
    types = orjson.loads((definitions.DIR / "structure-definitions.json").read_bytes())["types"]
    return frozenset(
        name
        for name, definition in types.items()
        if definition.get("kind") == "resource"
        and {"url", "version"} <= {element["path"] for element in definition.get("elements", [])}
    )


def is_published(resource: Mapping[str, Any]) -> bool:
    """Whether ``resource`` carries the ``published`` tag of the content pack."""
    tags = (resource.get("meta") or {}).get("tag") or []
    return any(
        isinstance(t, dict) and t.get("system") == PUBLISHED_TAG["system"] and t.get("code") == "published"
        for t in tags
    )


def refuse_change_to_published(res_type: str, body_text: str | None) -> None:
    """A published canonical version never changes: a new version is a new file in the content pack."""
    if res_type not in canonical_types() and res_type not in PUBLISHED_OTHER_TYPES:
        return
    if not body_text or '"published"' not in body_text:
        return
    if is_published(orjson.loads(body_text)):
        raise MethodNotAllowed(
            f"Published {res_type} content is read-only: the server publishes it from its content pack, "
            "where a new version is a new file"
        )


def check_canonical_write(
    res_type: str, body: Mapping[str, Any], same_url: Sequence[Mapping[str, Any]], *, publisher: bool
) -> None:
    """Refuse a write of canonical resource ``body`` that breaks a rule of the module doc.

    ``same_url``: the other live resources of ``res_type`` with the url of ``body`` (with their ``id``);
    ``publisher``: the server itself is writing (publishing the content pack).
    """
    if not publisher and is_published(body):
        raise Forbidden(
            "The 'published' tag is the server's: it marks the content pack it publishes at start-up; "
            "remove it from meta.tag",
            expression=f"{res_type}.meta.tag",
        )
    url, version = body.get("url"), body.get("version")
    if not publisher:
        owner = next((other for other in same_url if is_published(other)), None)
        if owner is not None:
            raise Conflict(
                f"{res_type} {url} is published content of this server (its content pack): read-only over "
                f"the API in every version, so that nothing can shadow {res_type}/{owner.get('id')}; give "
                "your resource a url of its own",
                code="business-rule",
                expression=f"{res_type}.url",
            )
    duplicate = next((other for other in same_url if other.get("version") == version), None)
    if duplicate is not None:
        canonical = f"{url}|{version}" if version is not None else f"{url} (without a version)"
        raise Conflict(
            f"{res_type} {canonical} already exists as {res_type}/{duplicate.get('id')}: a canonical url "
            "and version name one resource; update that one, or give this one another version",
            code="duplicate",
            expression=f"{res_type}.version",
        )
