"""Intake validation of QuestionnaireResponses against the real NF21 static and PHQ-9 Questionnaires.

Rules: https://hl7.org/fhir/R4/questionnaireresponse.html and SDC form filling conventions.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fhir_norse.instruments.intake import validate_response
from fhir_norse.instruments.schema import InstrumentMapping, load_mapping
from fhir_norse.outcomes import Issue

ROOT = Path(__file__).resolve().parents[2]
ORDINAL_VALUE = "http://hl7.org/fhir/StructureDefinition/ordinalValue"
NF21_ANSWERS = "http://fhir-norse.org/fhir/CodeSystem/nf21-answers"
LOINC = "http://loinc.org"

Json = dict[str, Any]


def _load(rel: str) -> Json:
    data: Json = json.loads((ROOT / rel).read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def nf21() -> Json:
    return _load("questionnaires/nf21/Questionnaire-nf21-static.json")


@pytest.fixture(scope="module")
def phq9() -> Json:
    return _load("questionnaires/phq9/Questionnaire-phq9.json")


@pytest.fixture(scope="module")
def mapping() -> InstrumentMapping:
    return load_mapping(ROOT / "mappings" / "nf21-2.1.0.yaml")


def _answer(option: Json) -> Json:
    """An answer as a standard form filler sends it: the option's Coding plus ordinalValue extensions."""
    coding = {k: v for k, v in option["valueCoding"].items() if not k.startswith("_")}
    ext = option.get("extension", [])
    if ext:
        coding["extension"] = copy.deepcopy(ext)
        return {"valueCoding": coding, "extension": copy.deepcopy(ext)}
    return {"valueCoding": coding}


def _option(item: Json, code: str | None = None) -> Json:
    options: list[Json] = item["answerOption"]
    if code is None:
        return options[0]
    return next(o for o in options if o["valueCoding"]["code"] == code)


def _response(questionnaire: Json, items: list[Json], status: str = "completed") -> Json:
    return {
        "resourceType": "QuestionnaireResponse",
        "meta": {
            "profile": ["http://example.org/fhir/StructureDefinition/some-form-filler-profile"],
            "tag": [{"system": "http://example.org/tags", "code": "lforms"}],
        },
        "questionnaire": f"{questionnaire['url']}|{questionnaire['version']}",
        "status": status,
        "subject": {"reference": "Patient/p1"},
        "authored": "2026-03-01T10:00:00+01:00",
        "item": items,
    }


def _opening_codes(questionnaire: Json) -> dict[str, str]:
    """For each trigger, an answer code that opens (enables) every group conditioned on it."""
    codes: dict[str, set[str]] = {}
    for group in questionnaire["item"]:
        conds = group.get("enableWhen", [])
        assert all(c["operator"] == "=" and "answerCoding" in c for c in conds)
        opening = {c["answerCoding"]["code"] for c in conds}
        trigger = {c["question"] for c in conds}
        for t in trigger:
            codes[t] = codes[t] & opening if t in codes else opening
    return {t: sorted(c)[0] for t, c in codes.items()}


def _full_nf21(questionnaire: Json, trigger_codes: dict[str, str] | None = None) -> Json:
    """A response answering every enabled item, given the trigger answers (default: all groups open)."""
    opening = _opening_codes(questionnaire)
    chosen = {**opening, **(trigger_codes or {})}
    groups = []
    for group in questionnaire["item"]:
        conds = group.get("enableWhen", [])
        if conds and not any(chosen.get(c["question"]) == c["answerCoding"]["code"] for c in conds):
            continue
        children = [
            {"linkId": it["linkId"], "answer": [_answer(_option(it, chosen.get(it["linkId"])))]}
            for it in group["item"]
        ]
        groups.append({"linkId": group["linkId"], "item": children})
    return _response(questionnaire, groups)


def _find(response: Json, link_id: str) -> Json:
    for group in response["item"]:
        for it in group.get("item", []):
            if it["linkId"] == link_id:
                found: Json = it
                return found
    raise KeyError(link_id)


def _one_issue_naming(issues: list[Issue], link_id: str) -> Issue:
    assert len(issues) == 1, issues
    assert f"'{link_id}'" in issues[0].diagnostics
    assert issues[0].expression and issues[0].expression[0].startswith("QuestionnaireResponse.item[")
    return issues[0]


# --- NF21 static -------------------------------------------------------------------------------------


def test_complete_nf21_response_with_every_group_open_passes(nf21: Json) -> None:
    response = _full_nf21(nf21)
    assert len(response["item"]) == len(nf21["item"])  # every group was enabled and answered
    assert validate_response(response, nf21) == []


def test_complete_nf21_response_with_closed_groups_passes(nf21: Json) -> None:
    response = _full_nf21(nf21, {"sad-1": "1", "somAnx-1": "2"})
    assert "group-sad" not in {g["linkId"] for g in response["item"]}
    assert validate_response(response, nf21) == []


def test_ordinal_value_extensions_on_answers_are_accepted(nf21: Json) -> None:
    response = _full_nf21(nf21)
    answer = _find(response, "sad-1")["answer"][0]
    assert answer["valueCoding"]["extension"][0]["url"] == ORDINAL_VALUE
    assert answer["extension"][0]["url"] == ORDINAL_VALUE
    assert validate_response(response, nf21) == []


def test_unknown_link_id(nf21: Json) -> None:
    response = _full_nf21(nf21)
    response["item"].append(
        {"linkId": "sad-9", "answer": [{"valueCoding": {"system": NF21_ANSWERS, "code": "3"}}]}
    )
    issue = _one_issue_naming(validate_response(response, nf21), "sad-9")
    assert issue.diagnostics == "linkId 'sad-9' is not in nf21-static 2.1.0"
    assert issue.expression == (f"QuestionnaireResponse.item[{len(response['item']) - 1}]",)


def test_wrong_answer_type(nf21: Json) -> None:
    response = _full_nf21(nf21)
    _find(response, "alliance-goal")["answer"] = [{"valueInteger": 6}]
    issue = _one_issue_naming(validate_response(response, nf21), "alliance-goal")
    assert issue.code == "value"
    assert issue.expression[0].endswith(".answer[0]")


def test_unknown_answer_code(nf21: Json) -> None:
    response = _full_nf21(nf21)
    _find(response, "alliance-task")["answer"] = [{"valueCoding": {"system": NF21_ANSWERS, "code": "9"}}]
    issue = _one_issue_naming(validate_response(response, nf21), "alliance-task")
    assert issue.code == "code-invalid"


def test_answer_code_from_wrong_system(nf21: Json) -> None:
    response = _full_nf21(nf21)
    _find(response, "alliance-task")["answer"] = [{"valueCoding": {"system": LOINC, "code": "3"}}]
    _one_issue_naming(validate_response(response, nf21), "alliance-task")


def test_two_answers_to_a_non_repeating_item(nf21: Json) -> None:
    response = _full_nf21(nf21)
    item = _find(response, "single-sleep")
    item["answer"] = item["answer"] * 2
    issue = _one_issue_naming(validate_response(response, nf21), "single-sleep")
    assert issue.expression[0].endswith(".answer[1]")


def test_answer_to_item_of_scale_whose_trigger_is_below_threshold(nf21: Json) -> None:
    response = _full_nf21(nf21)  # group-sad is open ...
    trigger = _find(response, "sad-1")
    trigger["answer"] = [_answer(_option(nf21["item"][0]["item"][0], "1"))]  # ... until sad-1 is low
    issues = validate_response(response, nf21)
    # Only sad-2 and sad-3 are answered in the now-disabled group: one issue each, both name their linkId.
    assert [i.diagnostics.split("'")[1] for i in issues] == ["sad-2", "sad-3"]
    assert all(i.code == "business-rule" for i in issues)
    group = next(g for g in response["item"] if g["linkId"] == "group-sad")
    group["item"] = [it for it in group["item"] if it["linkId"] == "sad-2"]
    _one_issue_naming(validate_response(response, nf21), "sad-2")


def test_answers_on_group_and_display_items_are_refused(nf21: Json, phq9: Json) -> None:
    response = _full_nf21(nf21)
    response["item"][0]["answer"] = [{"valueString": "x"}]
    _one_issue_naming(validate_response(response, nf21), "group-triggers")
    phq = _phq9_response(phq9)
    phq["item"].insert(0, {"linkId": "instructions", "answer": [{"valueString": "ok"}]})
    _one_issue_naming(validate_response(phq, phq9), "instructions")


def test_stopped_and_entered_in_error_are_accepted(nf21: Json) -> None:
    for status in ("stopped", "entered-in-error", "in-progress", "amended"):
        response = _full_nf21(nf21)
        response["status"] = status
        assert validate_response(response, nf21) == []


# --- PHQ-9 -------------------------------------------------------------------------------------------


def _phq9_response(phq9: Json, *, skip: str | None = None, status: str = "completed") -> Json:
    items = []
    for it in phq9["item"]:
        if it["type"] != "choice" or it["linkId"] == skip:
            continue
        items.append({"linkId": it["linkId"], "answer": [_answer(_option(it))]})
    # The calculated total (readOnly + calculatedExpression) as an SDC form filler fills it in.
    items.append({"linkId": "44261-6", "answer": [{"valueInteger": 0}]})
    return _response(phq9, items, status)


def test_complete_phq9_with_calculated_total_passes(phq9: Json) -> None:
    assert validate_response(_phq9_response(phq9), phq9) == []


def test_completed_phq9_missing_a_required_item_fails(phq9: Json) -> None:
    issues = validate_response(_phq9_response(phq9, skip="44260-8"), phq9)
    assert len(issues) == 1
    assert "'44260-8'" in issues[0].diagnostics
    assert issues[0].code == "required"


def test_in_progress_phq9_may_be_partial(phq9: Json) -> None:
    assert validate_response(_phq9_response(phq9, skip="44260-8", status="in-progress"), phq9) == []


def test_unknown_status_is_refused(phq9: Json) -> None:
    issues = validate_response(_phq9_response(phq9, status="finished"), phq9)
    assert [i.expression for i in issues] == [("QuestionnaireResponse.status",)]


# --- closed scales and enableWhen operators on small Questionnaires ----------------------------------


def _choice(link_id: str, *, required: bool = True, **extra: Any) -> Json:
    return {
        "linkId": link_id,
        "type": "choice",
        "required": required,
        "answerOption": [{"valueCoding": {"system": NF21_ANSWERS, "code": str(c)}} for c in range(1, 8)],
        **extra,
    }


def _coded(link_id: str, code: str) -> Json:
    return {"linkId": link_id, "answer": [{"valueCoding": {"system": NF21_ANSWERS, "code": code}}]}


TINY: Json = {
    "resourceType": "Questionnaire",
    "id": "tiny",
    "url": "http://example.org/Questionnaire/tiny",
    "version": "0.1.0",
    "status": "active",
    "item": [_choice("sad-1"), _choice("sad-2"), _choice("somAnx-2")],
}


def test_closed_scales_excuse_required_items(mapping: InstrumentMapping) -> None:
    response = _response(TINY, [_coded("sad-1", "3")])
    missing = validate_response(response, TINY, mapping=mapping)
    assert sorted(i.diagnostics.split("'")[1] for i in missing) == ["sad-2", "somAnx-2"]
    only_som = validate_response(response, TINY, closed_scales=frozenset({"sad"}), mapping=mapping)
    assert [i.diagnostics.split("'")[1] for i in only_som] == ["somAnx-2"]
    both = frozenset({"sad", "somAnx"})
    assert validate_response(response, TINY, closed_scales=both, mapping=mapping) == []
    # The trigger of a closed scale is still required: it is asked every time.
    no_trigger = _response(TINY, [])
    _one_required = validate_response(no_trigger, TINY, closed_scales=both, mapping=mapping)
    assert [i.diagnostics.split("'")[1] for i in _one_required] == ["sad-1"]


def test_closed_scales_without_mapping_are_ignored() -> None:
    response = _response(TINY, [_coded("sad-1", "3")])
    assert len(validate_response(response, TINY, closed_scales=frozenset({"sad", "somAnx"}))) == 2


def _gated(operator: str, answer: Json, behavior: str | None = None) -> Json:
    when: Json = {"question": "q", "operator": operator, **answer}
    gated: Json = {"linkId": "g", "type": "string", "enableWhen": [when]}
    if behavior:
        gated["enableBehavior"] = behavior
    return {
        "resourceType": "Questionnaire",
        "id": "ops",
        "version": "1",
        "status": "active",
        "item": [{"linkId": "q", "type": "integer"}, gated],
    }


@pytest.mark.parametrize(
    ("operator", "answer", "q_value", "enabled"),
    [
        ("exists", {"answerBoolean": True}, 3, True),
        ("exists", {"answerBoolean": True}, None, False),
        ("exists", {"answerBoolean": False}, None, True),
        ("=", {"answerInteger": 3}, 3, True),
        ("=", {"answerInteger": 4}, 3, False),
        ("!=", {"answerInteger": 4}, 3, True),
        ("!=", {"answerInteger": 3}, 3, False),
        (">", {"answerInteger": 2}, 3, True),
        (">", {"answerInteger": 3}, 3, False),
        (">=", {"answerInteger": 3}, 3, True),
        ("<", {"answerDecimal": 3.5}, 3, True),
        ("<=", {"answerInteger": 2}, 3, False),
    ],
)
def test_enable_when_operators(operator: str, answer: Json, q_value: int | None, enabled: bool) -> None:
    questionnaire = _gated(operator, answer)
    items: list[Json] = []
    if q_value is not None:
        items.append({"linkId": "q", "answer": [{"valueInteger": q_value}]})
    items.append({"linkId": "g", "answer": [{"valueString": "text"}]})
    issues = validate_response(_response({**questionnaire, "url": "u"}, items), questionnaire)
    assert (issues == []) is enabled, issues


def test_enable_behavior_all_and_any() -> None:
    base = _gated("=", {"answerInteger": 3})
    gated = base["item"][1]
    gated["enableWhen"].append({"question": "q", "operator": ">", "answerInteger": 5})
    items = [
        {"linkId": "q", "answer": [{"valueInteger": 3}]},
        {"linkId": "g", "answer": [{"valueString": "t"}]},
    ]
    response = _response({**base, "url": "u"}, items)
    gated["enableBehavior"] = "all"
    _one_issue_naming(validate_response(response, base), "g")
    gated["enableBehavior"] = "any"
    assert validate_response(response, base) == []


def test_open_choice_accepts_free_text_but_choice_does_not() -> None:
    questionnaire: Json = {
        "resourceType": "Questionnaire",
        "id": "oc",
        "status": "active",
        "item": [_choice("a", required=False, type="open-choice"), _choice("b", required=False)],
    }
    items = [{"linkId": "a", "answer": [{"valueString": "other"}]}]
    assert (
        validate_response(_response({**questionnaire, "url": "u", "version": "1"}, items), questionnaire)
        == []
    )
    items = [{"linkId": "b", "answer": [{"valueString": "other"}]}]
    _one_issue_naming(
        validate_response(_response({**questionnaire, "url": "u", "version": "1"}, items), questionnaire), "b"
    )
