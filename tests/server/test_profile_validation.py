"""Validation against the content pack's own profiles (``fhir_norse.server.profiles``).

For each of the nine StructureDefinitions in ``profiles/`` one conforming instance passes (and is
valid R4 too), and targeted broken instances fail with the expected expression, severity and code.
A few synthetic profiles check what the pack does not use (ordered and closed slicing, fixed complex
values, warning invariants, ValueSets that cannot be expanded). See
https://hl7.org/fhir/R4/profiling.html and https://hl7.org/fhir/R4/elementdefinition.html.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from fhir_norse.outcomes import Issue
from fhir_norse.server.profiles import ProfileError, ProfileValidator
from fhir_norse.server.validation import validate_resource

JsonDict = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
SD = "http://fhir-norse.org/fhir/StructureDefinition/"
CS = "http://fhir-norse.org/fhir/CodeSystem/"
UCUM = "http://unitsofmeasure.org"
SCALE_SCORE = SD + "rom-scale-score"
ALLIANCE = SD + "rom-alliance"
PREFERENCE = SD + "rom-preference"
PANEL = SD + "rom-panel"
REPORT = SD + "rom-report"
QUESTIONNAIRE_RESPONSE = SD + "rom-questionnaire-response"
ALERT_FLAG = SD + "rom-alert-flag"
ADMINISTRATION_CONTEXT = SD + "administration-context"
NF21_ITEM = SD + "nf21-item"
ANSWER_WINDOW = SD + "monitoring-answer-window"
BEFORE_APPOINTMENT = SD + "monitoring-before-appointment"
OPT_OUT = SD + "messaging-opt-out"


@cache
def validator() -> ProfileValidator:
    return ProfileValidator.from_content_dir(ROOT)


def errors(issues: list[Issue]) -> list[tuple[str, ...]]:
    return [i.expression for i in issues if i.severity == "error"]


def only_error(issues: list[Issue]) -> Issue:
    found = [i for i in issues if i.severity == "error"]
    assert len(found) == 1, [i.diagnostics for i in issues]
    return found[0]


# --- conforming instances -------------------------------------------------------------------------


def _observation(code: JsonDict) -> JsonDict:
    return {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "survey",
                        "display": "Survey",
                    }
                ]
            }
        ],
        "code": code,
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2026-03-04T10:15:00+01:00",
        "issued": "2026-03-04T10:16:00+01:00",
        "performer": [{"reference": "Patient/p1"}],
        "derivedFrom": [{"reference": "QuestionnaireResponse/qr1/_history/1"}],
    }


def _quantity(value: float, code: str) -> JsonDict:
    return {"value": value, "unit": code, "system": UCUM, "code": code}


def _component(code: str, value: JsonDict) -> JsonDict:
    return {"code": {"coding": [{"system": CS + "rom-components", "code": code}]}, **value}


def scale_score() -> JsonDict:
    obs = _observation({"coding": [{"system": CS + "nf21-scales", "code": "sad"}], "text": "Sad Affect"})
    obs["valueQuantity"] = _quantity(5.5, "{score}")
    obs["interpretation"] = [{"coding": [{"system": CS + "rom-interpretation", "code": "elevated"}]}]
    obs["component"] = [
        _component("z-score", {"valueQuantity": _quantity(1.2, "1")}),
        _component("items-answered", {"valueInteger": 3}),
        _component("trigger-score", {"valueQuantity": _quantity(6, "{score}")}),
        _component("rti", {"valueQuantity": _quantity(-0.4, "1")}),
    ]
    return obs


def alliance() -> JsonDict:
    obs = _observation({"coding": [{"system": CS + "nf21-alliance", "code": "bond"}]})
    obs["valueQuantity"] = _quantity(6.0, "{score}")
    obs["component"] = [
        _component("percent-of-max", {"valueQuantity": _quantity(83.3, "%")}),
        _component("items-answered", {"valueInteger": 2}),
    ]
    return obs


def preference() -> JsonDict:
    obs = _observation({"coding": [{"system": CS + "nf21-items", "code": "pref-style"}]})
    obs["valueCodeableConcept"] = {"coding": [{"system": CS + "preference-values", "code": "more"}]}
    return obs


def panel() -> JsonDict:
    obs = _observation({"coding": [{"system": CS + "rom-codes", "code": "nf21-administration"}]})
    obs["hasMember"] = [{"reference": "Observation/s1"}, {"reference": "Observation/s2"}]
    return obs


def report() -> JsonDict:
    return {
        "resourceType": "DiagnosticReport",
        "id": "r1",
        "status": "final",
        "category": [
            {"coding": [{"system": CS + "rom-codes", "code": "rom"}]},
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "OTH"}]},
        ],
        "code": {
            "coding": [{"system": CS + "rom-codes", "code": "rom-feedback-report", "display": "Report"}]
        },
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2026-03-04T10:15:00+01:00",
        "issued": "2026-03-04T10:16:00+01:00",
        "result": [{"reference": "Observation/panel"}, {"reference": "Observation/s1"}],
        "conclusion": "Elevated: Sad Affect.",
        "conclusionCode": [{"coding": [{"system": CS + "rom-interpretation", "code": "elevated"}]}],
    }


def administration_context(code: str = "weekly") -> JsonDict:
    return {
        "url": ADMINISTRATION_CONTEXT,
        "valueCoding": {"system": CS + "administration-context", "code": code},
    }


def hours(url: str, value: float = 48) -> JsonDict:
    return {"url": url, "valueDuration": {"value": value, "unit": "h", "system": UCUM, "code": "h"}}


def answer_window() -> JsonDict:
    return hours(ANSWER_WINDOW, 72)


def before_appointment() -> JsonDict:
    return hours(BEFORE_APPOINTMENT, 48)


def opt_out() -> JsonDict:
    return {"url": OPT_OUT, "valueCode": "sms"}


def questionnaire_response() -> JsonDict:
    return {
        "resourceType": "QuestionnaireResponse",
        "id": "qr1",
        "extension": [administration_context()],
        "questionnaire": "http://fhir-norse.org/fhir/Questionnaire/nf21-static|2.1.0",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "authored": "2026-03-04T10:15:00+01:00",
        "item": [{"linkId": "sad-1", "answer": [{"valueCoding": {"code": "5"}}]}],
    }


def nf21_item() -> JsonDict:
    return {
        "url": NF21_ITEM,
        "extension": [
            {"url": "scale", "valueCoding": {"system": CS + "nf21-scales", "code": "sad"}},
            {"url": "domain", "valueCoding": {"system": CS + "nf21-domains", "code": "symptom-expression"}},
            {"url": "trigger", "valueBoolean": True},
        ],
    }


def alert_flag() -> JsonDict:
    return {
        "resourceType": "Flag",
        "id": "f1",
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/flag-detail",
                "valueReference": {"reference": "Observation/s1"},
            },
            {
                "url": "http://hl7.org/fhir/StructureDefinition/flag-priority",
                "valueCodeableConcept": {
                    "coding": [{"system": "http://hl7.org/fhir/flag-priority-code", "code": "PH"}]
                },
            },
        ],
        "status": "active",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/flag-category", "code": "clinical"}
                ]
            }
        ],
        "code": {"coding": [{"system": CS + "rom-alerts", "code": "suicide-risk"}]},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2026-03-04T10:16:00+01:00"},
    }


def scale_override() -> JsonDict:
    return {
        "resourceType": "ServiceRequest",
        "meta": {"profile": [SD + "rom-scale-override"]},
        "status": "active",
        "intent": "order",
        "doNotPerform": True,
        "category": [{"coding": [{"system": CS + "rom-codes", "code": "scale-override"}]}],
        "code": {"coding": [{"system": CS + "nf21-scales", "code": "eating"}]},
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2026-03-09T10:00:00+01:00",
        "requester": {"reference": "Practitioner/pr1"},
        "reasonCode": [{"text": "Treated at the eating disorder unit"}],
    }


CONFORMING: dict[str, tuple[str, Callable[[], JsonDict]]] = {
    "rom-scale-score": (SCALE_SCORE, scale_score),
    "rom-alliance": (ALLIANCE, alliance),
    "rom-preference": (PREFERENCE, preference),
    "rom-panel": (PANEL, panel),
    "rom-report": (REPORT, report),
    "rom-questionnaire-response": (QUESTIONNAIRE_RESPONSE, questionnaire_response),
    "rom-alert-flag": (ALERT_FLAG, alert_flag),
    "rom-scale-override": (SD + "rom-scale-override", scale_override),
    "administration-context": (ADMINISTRATION_CONTEXT, administration_context),
    "nf21-item": (NF21_ITEM, nf21_item),
    "monitoring-answer-window": (ANSWER_WINDOW, answer_window),
    "monitoring-before-appointment": (BEFORE_APPOINTMENT, before_appointment),
    "messaging-opt-out": (OPT_OUT, opt_out),
}


def test_every_profile_of_the_pack_is_loaded() -> None:
    assert validator().urls == sorted(SD + name for name in CONFORMING)
    assert validator().profile_type(ALERT_FLAG) == "Flag"
    assert validator().profile_type(NF21_ITEM) == "Extension"


@pytest.mark.parametrize("name", sorted(CONFORMING))
def test_a_conforming_instance_passes(name: str) -> None:
    url, make = CONFORMING[name]
    instance = make()
    assert validator().validate(instance, url) == []
    if "resourceType" in instance:
        validate_resource(instance)  # and it is valid R4 in the first place


def test_knows_urls_with_and_without_version() -> None:
    v = validator()
    assert v.knows(SCALE_SCORE)
    assert v.knows(f"{SCALE_SCORE}|0.4.0")
    assert not v.knows(f"{SCALE_SCORE}|9.9.9")
    assert not v.knows(SD + "no-such-profile")
    assert not v.knows("http://hl7.org/fhir/StructureDefinition/Observation")


def test_an_unknown_profile_is_an_error() -> None:
    issue = only_error(validator().validate(scale_score(), SD + "no-such-profile"))
    assert issue.code == "not-supported"
    assert "is not known to this server" in issue.diagnostics
    assert issue.expression == ("Observation",)
    assert only_error(validator().validate(scale_score(), f"{SCALE_SCORE}|9.9.9")).code == "not-supported"


def test_a_profile_on_another_type_is_an_error() -> None:
    issue = only_error(validator().validate(alert_flag(), SCALE_SCORE))
    assert issue.expression == ("Flag",)
    assert "constrains Observation, not Flag" in issue.diagnostics
    extension = only_error(validator().validate(scale_score(), ADMINISTRATION_CONTEXT))
    assert extension.expression == ("Extension",)


# --- Observation profiles -------------------------------------------------------------------------


def test_an_observation_without_the_survey_category() -> None:
    obs = scale_score()
    obs["category"][0]["coding"][0]["code"] = "laboratory"
    issue = only_error(validator().validate(obs, SCALE_SCORE))
    assert issue.expression == ("Observation.category",)
    assert issue.code == "required"
    assert "slice 'survey'" in issue.diagnostics
    # A second, different category is fine (open slicing); the survey slice is max 1.
    extra = scale_score()
    extra["category"].append({"coding": [{"system": "http://example.org/cat", "code": "x"}]})
    assert validator().validate(extra, SCALE_SCORE) == []
    twice = scale_score()
    twice["category"].append(copy.deepcopy(twice["category"][0]))
    assert errors(validator().validate(twice, SCALE_SCORE)) == [("Observation.category",)]
    none = scale_score()
    del none["category"]
    # The element's own min 1 and the slice's min 1.
    assert errors(validator().validate(none, SCALE_SCORE)) == [("Observation.category",)] * 2


def test_a_scale_score_with_value_string() -> None:
    obs = scale_score()
    del obs["valueQuantity"]
    obs["valueString"] = "5.5"
    issue = only_error(validator().validate(obs, SCALE_SCORE))
    assert issue.expression == ("Observation.valueString",)
    assert issue.code == "structure"
    assert "type string is not allowed here (expected Quantity)" in issue.diagnostics


def test_a_scale_score_without_value() -> None:
    obs = scale_score()
    del obs["valueQuantity"]
    issue = only_error(validator().validate(obs, SCALE_SCORE))
    assert issue.expression == ("Observation.value[x]",)
    assert issue.code == "required"


def test_a_scale_score_with_has_member() -> None:
    obs = scale_score()
    obs["hasMember"] = [{"reference": "Observation/x"}]
    issue = only_error(validator().validate(obs, SCALE_SCORE))
    assert issue.expression == ("Observation.hasMember",)
    assert "not allowed (max 0)" in issue.diagnostics


def test_a_scale_score_whose_unit_is_not_score() -> None:
    obs = scale_score()
    obs["valueQuantity"]["code"] = "{points}"
    issue = only_error(validator().validate(obs, SCALE_SCORE))
    assert issue.expression == ("Observation.valueQuantity.code",)
    assert issue.code == "value"
    assert '"{points}" is not the fixed value "{score}"' in issue.diagnostics
    obs = scale_score()
    obs["valueQuantity"]["system"] = "http://example.org/units"
    assert errors(validator().validate(obs, SCALE_SCORE)) == [("Observation.valueQuantity.system",)]
    obs = scale_score()
    del obs["valueQuantity"]["value"]
    assert errors(validator().validate(obs, SCALE_SCORE)) == [("Observation.valueQuantity.value",)]


def test_component_slices_check_their_own_value() -> None:
    obs = scale_score()
    obs["component"][0]["valueQuantity"]["code"] = "{score}"  # z is dimensionless: "1"
    assert errors(validator().validate(obs, SCALE_SCORE)) == [
        ("Observation.component[0].valueQuantity.code",)
    ]
    obs = scale_score()
    obs["component"][1] = _component("items-answered", {"valueQuantity": _quantity(3, "1")})
    issue = only_error(validator().validate(obs, SCALE_SCORE))
    assert issue.expression == ("Observation.component[1].valueQuantity",)
    assert "Observation.component:itemsAnswered.value[x] in " in issue.diagnostics
    obs = scale_score()
    obs["component"].append(_component("z-score", {"valueQuantity": _quantity(0.1, "1")}))
    assert errors(validator().validate(obs, SCALE_SCORE)) == [("Observation.component",)]
    obs = scale_score()
    obs["component"][0]["dataAbsentReason"] = {"text": "unknown"}
    assert errors(validator().validate(obs, SCALE_SCORE)) == [("Observation.component[0].dataAbsentReason",)]
    # A component no slice describes is allowed: the slicing is open.
    obs = scale_score()
    obs["component"].append({"code": {"text": "other"}, "valueString": "x"})
    assert validator().validate(obs, SCALE_SCORE) == []


def test_a_subject_that_is_not_a_patient() -> None:
    obs = scale_score()
    obs["subject"] = {"reference": "Group/g1"}
    issue = only_error(validator().validate(obs, SCALE_SCORE))
    assert issue.expression == ("Observation.subject",)
    assert "refers to a Group, but only Patient is allowed" in issue.diagnostics
    obs = scale_score()
    obs["performer"] = [{"reference": "Practitioner/d1/_history/2"}]
    assert errors(validator().validate(obs, SCALE_SCORE)) == [("Observation.performer[0]",)]
    obs = scale_score()
    obs["subject"] = {"reference": "Patient/p1", "type": "Group"}
    assert errors(validator().validate(obs, SCALE_SCORE)) == [("Observation.subject.type",)]
    # References that are not relative literals are not resolved.
    for reference in ("urn:uuid:8c5b0e3a-2d5f-4a39-9d7e-1b0c0f7a3e11", "http://other.org/fhir/Group/1", "#p"):
        obs = scale_score()
        obs["subject"] = {"reference": reference}
        assert validator().validate(obs, SCALE_SCORE) == []


def test_the_status_invariant() -> None:
    obs = scale_score()
    obs["status"] = "preliminary"
    issue = only_error(validator().validate(obs, SCALE_SCORE))
    assert issue.expression == ("Observation",)
    assert issue.code == "invariant"
    assert "rom-status-1" in issue.diagnostics
    obs["status"] = "amended"
    assert validator().validate(obs, SCALE_SCORE) == []


def test_extensible_bindings_warn() -> None:
    obs = scale_score()
    obs["code"] = {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]}
    obs["interpretation"] = [
        {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "H"}
            ]
        },
        {"text": "Moderately severe depression"},
    ]
    issues = validator().validate(obs, SCALE_SCORE)
    assert [(i.severity, i.code, i.expression) for i in issues] == [
        ("warning", "code-invalid", ("Observation.code",)),
        ("warning", "code-invalid", ("Observation.interpretation[0]",)),
    ]


def test_alliance_code_binding_is_required() -> None:
    obs = alliance()
    obs["code"]["coding"][0]["code"] = "rupture"
    issue = only_error(validator().validate(obs, ALLIANCE))
    assert issue.expression == ("Observation.code",)
    assert issue.code == "code-invalid"
    obs = alliance()
    obs["code"] = {"text": "bond"}
    assert errors(validator().validate(obs, ALLIANCE)) == [("Observation.code",)]
    obs = alliance()
    obs["component"][0]["valueQuantity"]["code"] = "{score}"
    assert errors(validator().validate(obs, ALLIANCE)) == [("Observation.component[0].valueQuantity.code",)]


def test_preference_value_binding_and_limits() -> None:
    obs = preference()
    obs["valueCodeableConcept"]["coding"][0]["code"] = "much-more"
    assert errors(validator().validate(obs, PREFERENCE)) == [("Observation.valueCodeableConcept",)]
    obs = preference()
    obs["component"] = [_component("items-answered", {"valueInteger": 1})]
    obs["referenceRange"] = [{"text": "none"}]
    assert errors(validator().validate(obs, PREFERENCE)) == [
        ("Observation.referenceRange",),
        ("Observation.component",),
    ]


def test_a_panel_has_members_and_no_value() -> None:
    obs = panel()
    obs["valueQuantity"] = _quantity(1, "{score}")
    assert errors(validator().validate(obs, PANEL)) == [("Observation.valueQuantity",)]
    obs = panel()
    del obs["hasMember"]
    assert errors(validator().validate(obs, PANEL)) == [("Observation.hasMember",)]
    obs = panel()
    obs["hasMember"].append({"reference": "QuestionnaireResponse/qr1"})
    assert errors(validator().validate(obs, PANEL)) == [("Observation.hasMember[2]",)]
    obs = panel()
    del obs["performer"]
    obs["derivedFrom"] = [{"reference": "Observation/x"}]
    assert errors(validator().validate(obs, PANEL)) == [
        ("Observation.performer",),
        ("Observation.derivedFrom[0]",),
    ]


# --- DiagnosticReport -----------------------------------------------------------------------------


def test_a_report_without_result() -> None:
    rep = report()
    del rep["result"]
    issue = only_error(validator().validate(rep, REPORT))
    assert issue.expression == ("DiagnosticReport.result",)
    assert issue.code == "required"
    assert "at least 1 required, found 0" in issue.diagnostics


def test_report_code_category_and_targets() -> None:
    rep = report()
    rep["code"]["coding"][0]["code"] = "other-report"
    issue = only_error(validator().validate(rep, REPORT))
    assert issue.expression == ("DiagnosticReport.code",)
    assert "does not match the pattern" in issue.diagnostics
    rep = report()
    del rep["category"][0]
    assert errors(validator().validate(rep, REPORT)) == [("DiagnosticReport.category",)]
    rep = report()
    rep["result"].append({"reference": "Patient/p1"})
    assert errors(validator().validate(rep, REPORT)) == [("DiagnosticReport.result[2]",)]
    rep = report()
    rep["effectivePeriod"] = {"start": rep.pop("effectiveDateTime")}
    del rep["issued"]
    assert errors(validator().validate(rep, REPORT)) == [
        ("DiagnosticReport.effectivePeriod",),
        ("DiagnosticReport.issued",),
    ]


# --- QuestionnaireResponse and its extension ------------------------------------------------------


def test_questionnaire_response_required_elements() -> None:
    qr = questionnaire_response()
    del qr["subject"], qr["authored"]  # authored is optional, as in R4
    assert errors(validator().validate(qr, QUESTIONNAIRE_RESPONSE)) == [("QuestionnaireResponse.subject",)]
    qr = questionnaire_response()
    del qr["extension"]  # the administration context is optional
    assert validator().validate(qr, QUESTIONNAIRE_RESPONSE) == []


def test_the_administration_context_extension_is_checked_against_its_profile() -> None:
    qr = questionnaire_response()
    qr["extension"][0]["valueCoding"]["code"] = "monthly"
    issue = only_error(validator().validate(qr, QUESTIONNAIRE_RESPONSE))
    assert issue.expression == ("QuestionnaireResponse.extension[0].valueCoding",)
    assert issue.code == "code-invalid"
    qr = questionnaire_response()
    qr["extension"][0] = {"url": ADMINISTRATION_CONTEXT, "valueString": "weekly"}
    assert errors(validator().validate(qr, QUESTIONNAIRE_RESPONSE)) == [
        ("QuestionnaireResponse.extension[0].valueString",)
    ]
    qr = questionnaire_response()
    qr["extension"].append(administration_context("intake"))
    assert errors(validator().validate(qr, QUESTIONNAIRE_RESPONSE)) == [("QuestionnaireResponse.extension",)]
    qr = questionnaire_response()
    qr["extension"][0]["extension"] = [{"url": "note", "valueString": "x"}]
    assert errors(validator().validate(qr, QUESTIONNAIRE_RESPONSE)) == [
        ("QuestionnaireResponse.extension[0].extension",)
    ]
    # Other extensions are allowed (open slicing) and not checked against this profile.
    qr = questionnaire_response()
    qr["extension"].append({"url": "http://example.org/other", "valueString": "x"})
    assert validator().validate(qr, QUESTIONNAIRE_RESPONSE) == []


def test_the_administration_context_extension_alone() -> None:
    ext = administration_context()
    ext["url"] = "http://example.org/other"
    assert errors(validator().validate(ext, ADMINISTRATION_CONTEXT)) == [("Extension.url",)]
    ext = administration_context()
    del ext["valueCoding"]
    assert errors(validator().validate(ext, ADMINISTRATION_CONTEXT)) == [("Extension.value[x]",)]


@pytest.mark.parametrize("url", [ANSWER_WINDOW, BEFORE_APPOINTMENT])
def test_the_monitoring_durations_are_positive_times_in_ucum(url: str) -> None:
    """The scheduler reads these durations (fhir_norse/rom/scheduler.py): a UCUM unit of time, above 0."""
    assert validator().validate(hours(url, 0.5), url) == []
    ext = hours(url)
    ext["valueDuration"]["code"] = "cm"
    assert errors(validator().validate(ext, url)) == [("Extension.valueDuration.code",)]
    ext = hours(url)
    del ext["valueDuration"]["system"]
    assert errors(validator().validate(ext, url)) == [("Extension.valueDuration.system",)]
    issue = only_error(validator().validate(hours(url, 0), url))
    assert issue.code == "invariant" and "monitoring-" in issue.diagnostics
    assert errors(validator().validate({"url": url, "valueString": "48 h"}, url)) == [
        ("Extension.valueString",)
    ]


def test_the_messaging_opt_out_extension() -> None:
    for code in ("sms", "email", "all"):
        assert validator().validate({"url": OPT_OUT, "valueCode": code}, OPT_OUT) == []
    assert errors(validator().validate({"url": OPT_OUT, "valueCode": "fax"}, OPT_OUT)) == [
        ("Extension.valueCode",)
    ]
    assert errors(validator().validate({"url": OPT_OUT}, OPT_OUT)) == [("Extension.value[x]",)]


def test_the_nf21_item_extension() -> None:
    ext = nf21_item()
    ext["extension"].append({"url": "colour", "valueString": "blue"})
    issue = only_error(validator().validate(ext, NF21_ITEM))
    assert issue.expression == ("Extension.extension[3]",)
    assert "closed slicing" in issue.diagnostics
    ext = nf21_item()
    ext["extension"][0]["valueCoding"]["code"] = "no-such-scale"
    assert errors(validator().validate(ext, NF21_ITEM)) == [("Extension.extension[0].valueCoding",)]
    ext = nf21_item()
    ext["extension"][2] = {"url": "trigger", "valueString": "yes"}
    assert errors(validator().validate(ext, NF21_ITEM)) == [("Extension.extension[2].valueString",)]
    ext = nf21_item()
    ext["extension"].append({"url": "trigger", "valueBoolean": False})
    assert errors(validator().validate(ext, NF21_ITEM)) == [("Extension.extension",)]
    ext = nf21_item()
    ext["valueString"] = "x"
    assert errors(validator().validate(ext, NF21_ITEM)) == [("Extension.valueString",)]
    ext = nf21_item()
    del ext["extension"]
    assert errors(validator().validate(ext, NF21_ITEM)) == [("Extension.extension",)]
    alliance_item = {
        "url": NF21_ITEM,
        "extension": [
            {"url": "allianceDimension", "valueCoding": {"system": CS + "nf21-alliance", "code": "task"}}
        ],
    }
    assert validator().validate(alliance_item, NF21_ITEM) == []


# --- Flag -----------------------------------------------------------------------------------------


def test_an_inactive_flag_without_period_end() -> None:
    flag = alert_flag()
    flag["status"] = "inactive"
    issue = only_error(validator().validate(flag, ALERT_FLAG))
    assert issue.expression == ("Flag",)
    assert issue.code == "invariant"
    assert "rom-flag-1" in issue.diagnostics
    flag["period"]["end"] = "2026-04-01T09:00:00+02:00"
    assert validator().validate(flag, ALERT_FLAG) == []


def test_a_flag_code_outside_the_alert_value_set() -> None:
    flag = alert_flag()
    flag["code"] = {"coding": [{"system": CS + "rom-alerts", "code": "bad-weather"}]}
    issue = only_error(validator().validate(flag, ALERT_FLAG))
    assert issue.expression == ("Flag.code",)
    assert issue.code == "code-invalid"
    assert "ValueSet http://fhir-norse.org/fhir/ValueSet/rom-alerts (required)" in issue.diagnostics
    flag["code"] = {"coding": [{"system": CS + "rom-interpretation", "code": "suicide-risk"}]}
    assert errors(validator().validate(flag, ALERT_FLAG)) == [("Flag.code",)]


def test_flag_period_evidence_and_priority() -> None:
    flag = alert_flag()
    del flag["period"]["start"]
    issue = only_error(validator().validate(flag, ALERT_FLAG))
    assert issue.expression == ("Flag.period.start",)
    flag = alert_flag()
    del flag["extension"][0]
    issue = only_error(validator().validate(flag, ALERT_FLAG))
    assert issue.expression == ("Flag.extension",)
    assert "slice 'evidence'" in issue.diagnostics
    flag = alert_flag()
    flag["extension"].append(copy.deepcopy(flag["extension"][1]))
    assert errors(validator().validate(flag, ALERT_FLAG)) == [("Flag.extension",)]
    flag = alert_flag()
    flag["extension"].append(copy.deepcopy(flag["extension"][0]))  # more evidence is fine
    assert validator().validate(flag, ALERT_FLAG) == []
    flag = alert_flag()
    flag["category"][0]["coding"][0]["code"] = "drug"
    assert errors(validator().validate(flag, ALERT_FLAG)) == [("Flag.category",)]


# --- general behaviour, on synthetic profiles -----------------------------------------------------


def _profile(type_name: str, elements: list[JsonDict], url: str = "http://example.org/sd/test") -> JsonDict:
    return {
        "resourceType": "StructureDefinition",
        "url": url,
        "version": "1",
        "kind": "resource",
        "type": type_name,
        "baseDefinition": f"http://hl7.org/fhir/StructureDefinition/{type_name}",
        "derivation": "constraint",
        "differential": {"element": [{"id": type_name, "path": type_name}, *elements]},
    }


def test_ordered_closed_slicing_with_a_fixed_complex_value() -> None:
    sd = _profile(
        "Patient",
        [
            {
                "id": "Patient.identifier",
                "path": "Patient.identifier",
                "slicing": {
                    "discriminator": [{"type": "value", "path": "system"}],
                    "rules": "closed",
                    "ordered": True,
                },
            },
            {"id": "Patient.identifier:a", "path": "Patient.identifier", "sliceName": "a", "max": "1"},
            {"id": "Patient.identifier:a.system", "path": "Patient.identifier.system", "fixedUri": "urn:a"},
            {"id": "Patient.identifier:b", "path": "Patient.identifier", "sliceName": "b"},
            {"id": "Patient.identifier:b.system", "path": "Patient.identifier.system", "fixedUri": "urn:b"},
            {
                "id": "Patient.identifier:b.period",
                "path": "Patient.identifier.period",
                "min": 1,
                "fixedPeriod": {"start": "2020-01-01"},
            },
            {
                "id": "Patient.contact.name",
                "path": "Patient.contact.name",
                "min": 1,
                "constraint": [
                    {
                        "key": "t-1",
                        "severity": "warning",
                        "human": "has a family name",
                        "expression": "family.exists()",
                    }
                ],
            },
        ],
    )
    v = ProfileValidator([sd])
    url = "http://example.org/sd/test|1"
    good: JsonDict = {
        "resourceType": "Patient",
        "identifier": [
            {"system": "urn:a", "value": "1"},
            {"system": "urn:b", "period": {"start": "2020-01-01"}},
        ],
        "contact": [{"name": {"family": "Nordmann"}}],
    }
    assert v.validate(good, url) == []
    bad = copy.deepcopy(good)
    bad["identifier"].reverse()
    bad["identifier"][0]["period"]["end"] = "2021-01-01"
    bad["identifier"].append({"system": "urn:c"})
    bad["contact"] = [{"name": {"given": ["Kari"]}}, {"gender": "female"}]
    issues = v.validate(bad, url)
    assert [(i.severity, i.expression) for i in issues] == [
        ("error", ("Patient.identifier[0].period",)),  # not exactly the fixed Period
        ("error", ("Patient.identifier[1]",)),  # slice a after slice b (ordered)
        ("error", ("Patient.identifier[2]",)),  # no slice for urn:c (closed)
        ("warning", ("Patient.contact[0].name",)),  # t-1
        ("error", ("Patient.contact[1].name",)),  # contact.name min 1
    ]


def test_value_sets_that_cannot_be_expanded_are_skipped() -> None:
    terminology = [
        {
            "resourceType": "ValueSet",
            "url": "http://example.org/vs/filtered",
            "compose": {
                "include": [
                    {"system": "http://loinc.org", "filter": [{"property": "x", "op": "=", "value": "y"}]}
                ]
            },
        },
        {
            "resourceType": "ValueSet",
            "url": "http://example.org/vs/whole",
            "compose": {"include": [{"system": "http://loinc.org"}]},
        },
        {
            "resourceType": "ValueSet",
            "url": "http://example.org/vs/listed",
            "compose": {
                "include": [{"system": "urn:s", "concept": [{"code": "a"}, {"code": "b"}]}],
                "exclude": [{"system": "urn:s", "concept": [{"code": "b"}]}],
            },
        },
    ]
    flag = {
        "resourceType": "Flag",
        "status": "active",
        "code": {"coding": [{"system": "urn:s", "code": "b"}]},
        "subject": {"reference": "Patient/p"},
    }
    for value_set, expected in [
        ("http://example.org/vs/filtered", []),
        ("http://example.org/vs/whole", []),
        ("http://example.org/vs/unknown", []),
        ("http://example.org/vs/listed", [("Flag.code",)]),
        # The R4 core extract expands the core ValueSets.
        ("http://hl7.org/fhir/ValueSet/flag-status", [("Flag.code",)]),
    ]:
        binding = {"strength": "required", "valueSet": value_set}
        elements: list[JsonDict] = [{"id": "Flag.code", "path": "Flag.code", "binding": binding}]
        v = ProfileValidator([_profile("Flag", elements)], terminology)
        assert errors(v.validate(flag, "http://example.org/sd/test")) == expected, value_set


def test_a_profile_naming_an_element_r4_lacks_is_refused() -> None:
    sd = _profile("Observation", [{"id": "Observation.score", "path": "Observation.score", "min": 1}])
    with pytest.raises(ProfileError, match=r"Observation\.score: no such element"):
        ProfileValidator([sd])
    widened = _profile(
        "Observation",
        [{"id": "Observation.subject", "path": "Observation.subject", "type": [{"code": "string"}]}],
    )
    with pytest.raises(ProfileError, match="type string is not allowed by R4"):
        ProfileValidator([widened])


def test_an_invariant_fhirpathpy_cannot_parse_is_reported_not_failed() -> None:
    sd = _profile(
        "Flag",
        [
            {
                "id": "Flag",
                "path": "Flag",
                "constraint": [{"key": "t-2", "severity": "error", "human": "h", "expression": "status = ("}],
            }
        ],
    )
    sd["differential"]["element"] = sd["differential"]["element"][1:]
    flag = {
        "resourceType": "Flag",
        "status": "active",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/p"},
    }
    issues = ProfileValidator([sd]).validate(flag, "http://example.org/sd/test")
    assert [(i.severity, i.code, i.expression) for i in issues] == [
        ("information", "not-supported", ("Flag",))
    ]
