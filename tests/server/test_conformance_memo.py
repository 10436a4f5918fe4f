"""The shape of a derived resource (:mod:`fhir_norse.server.conformance_memo`) hides exactly the values
no conformance check depends on, so a remembered verdict never covers a resource that would fail."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fhir_norse.server.conformance_memo import FREE_TEXT, ConformanceMemo, shape

OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "2b0c7d0e-5c1e-5a37-9a3b-0d8c5a1f1e01",
    "meta": {"profile": ["http://fhir-norse.org/fhir/StructureDefinition/rom-scale-score"]},
    "status": "final",
    "code": {"coding": [{"system": "http://fhir-norse.org/fhir/CodeSystem/nf21-scales", "code": "sad"}]},
    "subject": {"reference": "Patient/p-1"},
    "effectiveDateTime": "2026-03-02T09:00:00+01:00",
    "issued": "2026-03-02T08:00:01.123Z",
    "valueQuantity": {"value": 4.67, "unit": "score", "system": "http://unitsofmeasure.org", "code": "1"},
    "derivedFrom": [{"reference": "QuestionnaireResponse/qr-1/_history/2"}],
    "component": [{"code": {"text": "items answered"}, "valueInteger": 3}],
}


def _with(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(OBSERVATION)
    for path, value in changes.items():
        target: Any = body
        *steps, last = path.split("__")
        for step in steps:
            target = target[int(step)] if step.isdigit() else target[step]
        target[last] = value
    return body


@pytest.mark.parametrize(
    "changes",
    [
        {"id": "9f3e1b5a-0000-5000-8000-000000000002"},
        {"subject__reference": "Patient/another-patient"},
        {"derivedFrom__0__reference": "QuestionnaireResponse/qr-7/_history/1"},
        {"effectiveDateTime": "2027-11-30T23:59:59-05:00", "issued": "2027-12-01T04:59:59.999Z"},
        {"valueQuantity__value": 1.0},
    ],
)
def test_values_no_check_depends_on_share_a_shape(changes: dict[str, Any]) -> None:
    assert shape("Observation", _with(**changes)) == shape("Observation", OBSERVATION)


@pytest.mark.parametrize(
    "changes",
    [
        {"status": "preliminary"},  # the profile's invariant reads it
        {"code__coding__0__code": "somAnx"},  # codes are bound
        {"subject__reference": "Group/p-1"},  # the target type is checked
        {"subject__reference": "Patient/bad id"},  # not an id
        {"id": "not an id"},
        {"effectiveDateTime": "2026-13-02"},  # no month 13: not a valid dateTime
        {"issued": "2026-03-02"},  # a date, not an instant
        {"valueQuantity__value": "4.67"},  # a string, not a decimal
        {"valueQuantity__value": 4},  # an integer keeps its value
        {"component__0__valueInteger": -1},  # integers have ranges
    ],
)
def test_values_a_check_depends_on_change_the_shape(changes: dict[str, Any]) -> None:
    assert shape("Observation", _with(**changes)) != shape("Observation", OBSERVATION)


def test_a_missing_element_changes_the_shape() -> None:
    without = copy.deepcopy(OBSERVATION)
    del without["subject"]
    assert shape("Observation", without) != shape("Observation", OBSERVATION)
    assert shape("Flag", OBSERVATION) != shape("Observation", OBSERVATION)


def test_the_memo_is_bounded() -> None:
    memo = ConformanceMemo(limit=2)
    for key in (b"a", b"b", b"c"):
        memo.remember(key)
    assert b"c" in memo and len([k for k in (b"a", b"b", b"c") if k in memo]) <= 2


REPORT: dict[str, Any] = {
    "resourceType": "DiagnosticReport",
    "meta": {"profile": ["http://fhir-norse.org/fhir/StructureDefinition/rom-report"]},
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "11502-2"}], "text": "ROM report"},
    "conclusion": "URGENT alert: suicide risk (suicidality score 4.25 > 3.5)",
}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("conclusion", "Elevated: Sad Affect (score 6.5 > 3.5)."),
        ("conclusion", "   "),  # whitespace is a valid R4 string
        ("text", "Another report title"),
    ],
)
def test_free_text_shares_a_shape(key: str, value: str) -> None:
    """The report's conclusion carries its scores: without this every report was checked in full."""
    changed = copy.deepcopy(REPORT)
    if key == "text":
        changed["code"]["text"] = value
    else:
        changed[key] = value
    assert shape("DiagnosticReport", changed) == shape("DiagnosticReport", REPORT)


@pytest.mark.parametrize("value", ["", "control \x01 character", 42, ["a list"], {"an": "object"}])
def test_free_text_that_is_not_a_valid_string_changes_the_shape(value: Any) -> None:
    changed = {**REPORT, "conclusion": value}
    assert shape("DiagnosticReport", changed) != shape("DiagnosticReport", REPORT)
    without = {k: v for k, v in REPORT.items() if k != "conclusion"}
    assert shape("DiagnosticReport", without) != shape("DiagnosticReport", REPORT)


def test_no_profile_reads_the_words_of_free_text() -> None:
    """What makes hiding :data:`FREE_TEXT` values sound: no profile of the pack fixes, patterns or binds
    such an element, slices on it, or has an invariant that reads more than its existence. A profile
    that does must make this fail (then take the key out of FREE_TEXT)."""
    import json
    import re

    from tests.intake_support import ROOT

    rules = ("fixed", "pattern", "binding", "constraint", "slicing", "maxLength", "minValue", "maxValue")
    for path in sorted((ROOT / "profiles").glob("StructureDefinition-*.json")):
        definition = json.loads(path.read_text(encoding="utf-8"))
        differential = definition.get("differential", {}).get("element", [])
        for element in differential:
            types = {t.get("code") for t in element.get("type") or []}
            # The pack's own rules on such an element (``text`` typed Narrative is an object: kept whole).
            if element["path"].rsplit(".", 1)[-1] in FREE_TEXT and not types - {"string", "markdown"}:
                assert not [k for k in element if k.startswith(rules)], (path.name, element["path"])
        for element in [*differential, *definition.get("snapshot", {}).get("element", [])]:
            for constraint in element.get("constraint") or []:
                expression = str(constraint.get("expression") or "")
                for key in FREE_TEXT:
                    # ``text.div`` is the Narrative (an object, whose shape is kept whole).
                    uses = re.findall(rf"\b{key}\b(\.`?div`?|\.\w+\(\))?", expression)
                    assert all(u in (".exists()", ".div", ".`div`") for u in uses), (path.name, expression)
