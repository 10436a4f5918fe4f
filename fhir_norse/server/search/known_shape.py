"""Index rows of server-written Observations read straight off their known shape, without FHIRPath.

Scoring writes about 25 Observations per response (fhir_norse/scoring/resources.py), always of the same
shape: ``status``, ``category``, ``code``, ``subject``, ``effectiveDateTime``, ``performer``,
``derivedFrom``, ``hasMember``, ``valueQuantity`` or ``valueCodeableConcept``, ``component`` (code and
``valueQuantity``), ``interpretation``, ``referenceRange``, ``extension``, ``issued`` and ``meta``. For
an Observation with no other element, and plain literal references, :func:`observation_rows` produces the
rows of the advertised Observation parameters (:data:`CODES`) by direct dictionary access, through the
same value conversions as the generic extractor (:mod:`.extract`); anything else returns ``None`` and the
generic extractor runs. The generic extractor uses it only while the Observation parameters it indexes
are exactly :data:`CODES` (a site that enables more gets the generic path).
tests/server/search/test_known_shape.py checks that both give the same rows for every Observation scoring
writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir_norse.server.search.extract import (
    IndexExtractor,
    _composite_second,
    _date_templates,
    _quantity_templates,
    _reference_templates,
    _row,
    _RowKey,
    _Template,
    _token_templates,
    _uri_templates,
)
from fhir_norse.store.rows import CompositeRow, IndexRow, ReferenceRow, TokenRow
from fhir_norse.store.search.advertised import ADVERTISED, COMMON
from fhir_norse.store.search.params import RESOURCE_COLUMN_PARAMS, SearchParamRegistry

# The parameters whose rows this module produces (for the others of the advertised set the shape has
# no element: basedOn, device, encounter, focus, identifier, partOf, specimen, value[x] other than
# Quantity and CodeableConcept).
CODES: frozenset[str] = (ADVERTISED["Observation"] | COMMON) - RESOURCE_COLUMN_PARAMS

_LISTS = frozenset({"category", "performer", "derivedFrom", "hasMember", "component", "interpretation"})
_DICTS = frozenset({"code", "subject", "valueQuantity", "valueCodeableConcept", "meta"})
_STRINGS = frozenset({"resourceType", "id", "status", "effectiveDateTime"})
# Elements no advertised Observation parameter reads.
_IGNORED_STRINGS = frozenset({"issued"})
_IGNORED_LISTS = frozenset({"referenceRange", "extension", "note"})
_META = frozenset({"versionId", "lastUpdated", "profile", "tag", "security", "source"})
_REFERENCE_KEYS = frozenset({"reference", "display"})


def _plain_reference(data: Any) -> bool:
    return type(data) is dict and isinstance(data.get("reference"), str) and data.keys() <= _REFERENCE_KEYS


def _known(resource: Mapping[str, Any]) -> bool:
    """Whether ``resource`` has the scoring shape (every element one this module reads or ignores)."""
    for key, value in resource.items():
        if key in _STRINGS or key in _IGNORED_STRINGS:
            if type(value) is not str:
                return False
        elif key in _DICTS:
            if type(value) is not dict:
                return False
        elif key in _LISTS or key in _IGNORED_LISTS:
            if type(value) is not list or not all(type(v) is dict for v in value):
                return False
        else:
            return False
    meta = resource.get("meta", {})
    if not meta.keys() <= _META:
        return False
    for key in ("profile", "tag", "security"):
        if not isinstance(meta.get(key, []), list):
            return False
    references = [resource.get("subject", {"reference": ""})]
    references += (
        resource.get("performer", []) + resource.get("derivedFrom", []) + resource.get("hasMember", [])
    )
    return all(_plain_reference(r) for r in references)


def _templates(convert: Any, type_name: str, data: Any) -> list[_Template]:
    out: list[_Template] = []
    convert(type_name, data, out)
    return out


def _firsts(concept: Any) -> list[tuple[Any, Any]]:
    """The (system, code) pairs a CodeableConcept gives a composite's first component."""
    return [
        (fields[0], fields[1])
        for make, _, fields in _templates(_token_templates, "CodeableConcept", concept)
        if make is TokenRow and fields[1] is not None
    ]


def _seconds(convert: Any, type_name: str, data: Any) -> list[tuple[Any, ...]]:
    return [
        second
        for make, _, fields in _templates(convert, type_name, data)
        if (second := _composite_second(make, fields)) is not None
    ]


def observation_rows(resource: Mapping[str, Any]) -> list[IndexRow] | None:
    """The index rows of an Observation of the scoring shape for :data:`CODES`; ``None`` for any other."""
    if resource.get("resourceType") != "Observation" or not _known(resource):
        return None
    rows: dict[_RowKey, IndexRow] = {}

    def add(param: str, templates: list[_Template]) -> None:
        for make, suffix, fields in templates:
            key = (make, param + suffix, fields)
            rows[key] = _row(key)

    def composite(param: str, pairs: list[tuple[Any, ...]]) -> None:
        for fields in pairs:
            key = (CompositeRow, param, fields)
            rows[key] = _row(key)

    meta = resource.get("meta", {})
    for profile in meta.get("profile", ()):
        add("_profile", _templates(_uri_templates, "canonical", profile))
    for tag in meta.get("tag", ()):
        add("_tag", _templates(_token_templates, "Coding", tag))
    for label in meta.get("security", ()):
        add("_security", _templates(_token_templates, "Coding", label))
    if "source" in meta:
        add("_source", _templates(_uri_templates, "uri", meta["source"]))
    if "status" in resource:
        add("status", _templates(_token_templates, "code", resource["status"]))
    for category in resource.get("category", ()):
        add("category", _templates(_token_templates, "CodeableConcept", category))
    code = resource.get("code")
    if code is not None:
        add("code", _templates(_token_templates, "CodeableConcept", code))
    if "effectiveDateTime" in resource:
        add("date", _templates(_date_templates, "dateTime", resource["effectiveDateTime"]))
    for reference in resource.get("derivedFrom", ()):
        add("derived-from", _templates(_reference_templates, "Reference", reference))
    for reference in resource.get("performer", ()):
        add("performer", _templates(_reference_templates, "Reference", reference))
    subject = resource.get("subject")
    if subject is not None:
        subject_rows = _templates(_reference_templates, "Reference", subject)
        add("subject", subject_rows)
        # ``Observation.subject.where(resolve() is Patient)``
        add("patient", [t for t in subject_rows if t[0] is ReferenceRow and t[2][0] == "Patient"])
    quantity = resource.get("valueQuantity")
    concept = resource.get("valueCodeableConcept")
    if quantity is not None:
        add("value-quantity", _templates(_quantity_templates, "Quantity", quantity))
        if code is not None:
            seconds = _seconds(_quantity_templates, "Quantity", quantity)
            composite("code-value-quantity", [(*first, *s) for first in _firsts(code) for s in seconds])
    if concept is not None:
        add("value-concept", _templates(_token_templates, "CodeableConcept", concept))
        if code is not None:
            seconds = _seconds(_token_templates, "CodeableConcept", concept)
            composite("code-value-concept", [(*first, *s) for first in _firsts(code) for s in seconds])
    for component in resource.get("component", ()):
        c_code, c_quantity = component.get("code"), component.get("valueQuantity")
        if c_code is None or c_quantity is None:
            continue
        seconds = _seconds(_quantity_templates, "Quantity", c_quantity)
        composite(
            "component-code-value-quantity", [(*first, *s) for first in _firsts(c_code) for s in seconds]
        )
    return list(rows.values())


def extractor_for(registry: SearchParamRegistry) -> IndexExtractor:
    """The server's extractor of ``registry``: the generic one, with the Observations scoring writes read
    off their known shape while the indexed Observation parameters are exactly :data:`CODES`."""
    return IndexExtractor(registry, known_shapes={"Observation": (CODES, observation_rows)})
