"""Published content (Questionnaires, terminology, profiles) is read-only through the API."""

from __future__ import annotations

import orjson

from fhir_norse.canonicals import CS_CONTENT_TAGS
from fhir_norse.outcomes import MethodNotAllowed

CONTENT_TYPES = frozenset(
    {
        "Questionnaire",
        "CodeSystem",
        "ValueSet",
        "ConceptMap",
        "StructureDefinition",
        "Library",
        "OperationDefinition",
    }
)
PUBLISHED_TAG = {"system": CS_CONTENT_TAGS, "code": "published"}


def refuse_change_to_published(res_type: str, body_text: str | None) -> None:
    """A published canonical version never changes: a new version is a new file."""
    if res_type not in CONTENT_TYPES or not body_text or '"published"' not in body_text:
        return
    tags = (orjson.loads(body_text).get("meta") or {}).get("tag") or []
    if any(t.get("system") == PUBLISHED_TAG["system"] and t.get("code") == "published" for t in tags):
        raise MethodNotAllowed(f"Published {res_type} content is read-only; publish a new version instead")
