"""The generated Norse Feedback content: reproducible, parseable by an independent R4 parser, and a
static form whose ``enableWhen`` reproduces the opening rule of every scale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fhir_norse.instruments.schema import load_mapping
from tests.fhir_r4_client import parse_r4
from tools.content_build import build

ROOT = Path(__file__).resolve().parents[2]
MAPPING = load_mapping(ROOT / "mappings" / "nf21-2.1.0.yaml")
STATIC = json.loads((ROOT / "questionnaires/nf21/Questionnaire-nf21-static.json").read_text(encoding="utf-8"))
ADAPTIVE = json.loads(
    (ROOT / "questionnaires/nf21/Questionnaire-nf21-adaptive.json").read_text(encoding="utf-8")
)
ANSWERS = "http://fhir-norse.org/fhir/CodeSystem/nf21-answers"


def _generated(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.json")}


def test_nf21_build_is_byte_identical_and_matches_the_committed_files(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    build(ROOT, out_root=first)
    build(ROOT, out_root=second)
    a, b = _generated(first), _generated(second)
    assert a == b
    assert len(a) == 28  # the terminology, the bokmål forms and their English forms, 2.1.0 and 2.2.0
    committed = {name: (ROOT / name).read_bytes() for name in a}
    assert committed == a, "run `python tools/build_content.py` and commit the result"


def test_nf21_every_generated_resource_parses_as_r4() -> None:
    paths = sorted((ROOT / "questionnaires/nf21").glob("*.json"))
    paths += sorted((ROOT / "questionnaires/terminology").glob("*.json"))
    assert len(paths) == 28
    for path in paths:
        parse_r4(json.loads(path.read_text(encoding="utf-8")))


def test_nf21_adaptive_form_is_an_sdc_adaptive_questionnaire() -> None:
    assert ADAPTIVE["meta"]["profile"] == [
        "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-adapt"
    ]
    assert {
        "url": "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-questionnaireAdaptive",
        "valueBoolean": True,
    } in ADAPTIVE["extension"]
    link_ids = [i["linkId"] for i in ADAPTIVE["item"]]
    assert sorted(link_ids) == sorted(MAPPING.all_link_ids())
    assert ADAPTIVE["version"] == STATIC["version"] == MAPPING.version


def test_nf21_static_form_asks_all_19_triggers_first() -> None:
    first = STATIC["item"][0]
    assert first["type"] == "group" and "enableWhen" not in first
    assert [i["linkId"] for i in first["item"]] == [s.trigger for s in MAPPING.scales if s.trigger]


# --- a small enableWhen evaluator (https://hl7.org/fhir/R4/questionnaire-definitions.html#Questionnaire.item.enableWhen)


def _condition(ew: dict[str, Any], answers: dict[str, dict[str, Any]]) -> bool:
    answer = answers.get(ew["question"])
    op = ew["operator"]
    if op == "exists":
        return (answer is not None) == bool(ew["answerBoolean"])
    if answer is None:
        return False
    expected = ew["answerCoding"]
    same = bool(answer["system"] == expected["system"] and answer["code"] == expected["code"])
    if op == "=":
        return same
    if op == "!=":
        return not same
    raise AssertionError(f"operator {op} on a Coding answer")


def _enabled_items(items: list[dict[str, Any]], answers: dict[str, dict[str, Any]]) -> set[str]:
    out: set[str] = set()
    for item in items:
        conditions = item.get("enableWhen", [])
        if conditions:
            results = [_condition(c, answers) for c in conditions]
            enabled = any(results) if item.get("enableBehavior") == "any" else all(results)
            if not enabled:
                continue
        out.add(item["linkId"])
        out |= _enabled_items(item.get("item", []), answers)
    return out


@pytest.mark.parametrize("scale", MAPPING.scales, ids=lambda s: s.code)
def test_nf21_static_enable_when_reproduces_the_opening_rule(scale: Any) -> None:
    trigger = MAPPING.trigger_of(scale)
    trigger_reversed = trigger in MAPPING.scale_of_item(trigger).reverse_keyed
    others = [i for i in scale.items if i != scale.trigger]
    assert others
    for raw in range(1, 8):
        problem_score = 8 - raw if trigger_reversed else raw
        answers = {trigger: {"system": ANSWERS, "code": str(raw)}}
        enabled = _enabled_items(STATIC["item"], answers)
        should_open = problem_score > scale.open_if_trigger_gt
        for link_id in others:
            assert (link_id in enabled) == should_open, (scale.code, raw, link_id)
    for code in ("not-relevant", "prefer-not"):
        enabled = _enabled_items(STATIC["item"], {trigger: {"system": ANSWERS, "code": code}})
        assert not set(others) & enabled, (scale.code, code)
    unanswered = _enabled_items(STATIC["item"], {})
    assert not set(others) & unanswered
    assert trigger in unanswered


def test_nf21_alliance_preferences_and_single_items_are_always_shown() -> None:
    always = _enabled_items(STATIC["item"], {})
    assert set(MAPPING.alliance.items) <= always
    assert {p.link_id for p in MAPPING.preferences} <= always
    assert {s.link_id for s in MAPPING.single + MAPPING.medication} <= always


def _json(rel: str) -> Any:
    return json.loads((ROOT / rel).read_text(encoding="utf-8"))


def _questions(form: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    stack = list(form["item"])
    while stack:
        item = stack.pop(0)
        if item["type"] == "group":
            stack += item["item"]
        else:
            out[item["linkId"]] = item
    return out


FORMS_22 = {
    "static": "questionnaires/nf21/Questionnaire-nf21-static-2.2.0.json",
    "adaptive": "questionnaires/nf21/Questionnaire-nf21-adaptive-2.2.0.json",
    "static-en": "questionnaires/nf21/Questionnaire-nf21-static-en-2.2.0.json",
    "adaptive-en": "questionnaires/nf21/Questionnaire-nf21-adaptive-en-2.2.0.json",
}


def test_nf22_forms_are_published_beside_the_unchanged_2_1_0_forms() -> None:
    """2.2.0 (issue 13) asks "focus on thoughts" as its own preference and the published alliance
    constructs; the 2.1.0 forms keep their files, version and items."""
    assert STATIC["version"] == ADAPTIVE["version"] == "2.1.0"
    old = _questions(STATIC)
    assert "pref-feelings-thoughts" in old and "pref-thoughts" not in old
    assert {"alliance-goal", "alliance-bond-2", "alliance-task"} <= set(old)
    new22 = load_mapping(ROOT / "mappings" / "nf21-2.2.0.yaml")
    for kind, rel in FORMS_22.items():
        form = _json(rel)
        base = kind.removesuffix("-en")
        assert form["url"] == f"http://fhir-norse.org/fhir/Questionnaire/nf21-{kind}", kind
        assert form["version"] == "2.2.0"
        assert form["language"] == ("en" if kind.endswith("-en") else "nb")
        if kind.endswith("-en"):
            assert form["derivedFrom"] == [f"http://fhir-norse.org/fhir/Questionnaire/nf21-{base}|2.2.0"]
        questions = _questions(form)
        assert sorted(questions) == sorted(new22.all_link_ids())
        assert "pref-feelings-thoughts" not in questions
        assert not {"alliance-goal", "alliance-bond-2", "alliance-task"} & set(questions)
    en = _questions(_json(FORMS_22["static-en"]))
    nb = _questions(_json(FORMS_22["static"]))
    assert en["pref-thoughts"]["text"] == "Focus on my thoughts"
    assert nb["pref-thoughts"]["text"] == "Fokus på tankene mine"
    assert [o["valueCoding"]["code"] for o in nb["pref-thoughts"]["answerOption"]] == [
        "less",
        "as-now",
        "more",
        "not-relevant",
        "prefer-not",
    ]
    assert en["alliance-goal-understand"]["text"] == "I understand how this treatment is going to help me."
    assert en["alliance-bond-1"]["text"] == "I feel that my therapist understands me."
    assert en["alliance-bond-accepted"]["text"] == "I feel accepted as a person by my therapist."
    assert en["alliance-task-know"]["text"] == "I know what I am to work on in my treatment."
    dims = {
        link_id: ext["extension"][0]["valueCoding"]["code"]
        for link_id, item in nb.items()
        if link_id.startswith("alliance-")
        for ext in item["extension"]
    }
    assert dims == {
        "alliance-goal-understand": "goal",
        "alliance-bond-1": "bond",
        "alliance-bond-accepted": "bond",
        "alliance-task-know": "task",
    }


def test_nf22_terminology_adds_codes_in_a_new_version_and_retires_none_silently() -> None:
    items = _json("questionnaires/terminology/CodeSystem-nf21-items.json")
    assert items["version"] == "2.2.0"
    concepts = {c["code"]: c for c in items["concept"]}
    assert items["count"] == len(concepts) == 106
    retired = {
        code
        for code, c in concepts.items()
        if {"code": "status", "valueCode": "retired"} in c.get("property", [])
    }
    # The 2.1.0 codes stay (responses to 2.1.0 keep valid codes), marked retired.
    assert retired == {"alliance-goal", "alliance-bond-2", "alliance-task", "pref-feelings-thoughts"}
    assert concepts["pref-thoughts"]["designation"] == [{"language": "en", "value": "Focus on my thoughts"}]
    value_set = _json("questionnaires/terminology/ValueSet-nf21-items.json")
    assert value_set["compose"]["include"][0]["version"] == "2.2.0"
    # Code systems whose codes did not change keep the version they were published under.
    for cs_id in ("nf21-scales", "nf21-domains", "nf21-answers", "nf21-alliance"):
        assert _json(f"questionnaires/terminology/CodeSystem-{cs_id}.json")["version"] == "2.1.0", cs_id
