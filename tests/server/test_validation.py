"""Structural validation of resource bodies (``fhir_norse.server.validation``).

Each failure test names the FHIRPath-style location the OperationOutcome must point at; see
https://hl7.org/fhir/R4/validation.html and https://hl7.org/fhir/R4/json.html.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from fhir_norse.outcomes import BadRequest, Issue
from fhir_norse.server import validation
from fhir_norse.server.models import model_class
from fhir_norse.server.validation import validate_resource

JsonDict = dict[str, Any]

PATIENT: JsonDict = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"profile": ["http://example.org/fhir/StructureDefinition/patient"]},
    "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Ada</div>'},
    "identifier": [{"system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": "12345678901"}],
    "active": True,
    "name": [{"use": "official", "family": "Lovelace", "given": ["Ada", "Augusta"]}],
    "telecom": [{"system": "phone", "value": "+47 123 45 678", "use": "mobile", "rank": 1}],
    "gender": "female",
    "birthDate": "1815-12-10",
    "deceasedBoolean": False,
    "address": [{"line": ["1 Main St"], "city": "Oslo", "postalCode": "0150", "country": "NO"}],
    "communication": [
        {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "nb"}]}, "preferred": True}
    ],
}

OBSERVATION: JsonDict = {
    "resourceType": "Observation",
    "id": "o1",
    "meta": {"versionId": "3", "lastUpdated": "2024-03-01T10:00:00.123Z"},
    "status": "final",
    "category": [
        {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}
            ]
        }
    ],
    "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6", "display": "PHQ-9 total"}]},
    "subject": {"reference": "Patient/p1"},
    "effectiveDateTime": "2024-03-01T10:00:00+01:00",
    "issued": "2024-03-01T10:00:00.123Z",
    "valueQuantity": {
        "value": 12,
        "unit": "{score}",
        "system": "http://unitsofmeasure.org",
        "code": "{score}",
    },
    "referenceRange": [{"low": {"value": 0}, "high": {"value": 27}, "text": "0-27"}],
    "derivedFrom": [{"reference": "QuestionnaireResponse/qr1"}],
    "component": [
        {"code": {"text": "item 1"}, "valueInteger": 2},
        {"code": {"text": "item 2"}, "valueCodeableConcept": {"text": "several days"}},
    ],
}

QUESTIONNAIRE: JsonDict = {
    "resourceType": "Questionnaire",
    "id": "phq-9",
    "url": "http://example.org/Questionnaire/phq-9",
    "version": "1.0.0",
    "status": "active",
    "subjectType": ["Patient"],
    "item": [
        {
            "linkId": "g1",
            "type": "group",
            "text": "Over the last 2 weeks",
            "item": [
                {
                    "linkId": "q1",
                    "type": "choice",
                    "required": True,
                    "answerOption": [
                        {
                            "valueCoding": {
                                "system": "http://loinc.org",
                                "code": "LA6568-5",
                                "display": "Not at all",
                            }
                        },
                        {"valueCoding": {"code": "LA6569-3"}, "initialSelected": True},
                    ],
                },
                {
                    "linkId": "q2",
                    "type": "integer",
                    "enableWhen": [{"question": "q1", "operator": "exists", "answerBoolean": True}],
                    "extension": [
                        {"url": "http://hl7.org/fhir/StructureDefinition/minValue", "valueInteger": 0}
                    ],
                },
            ],
        }
    ],
}

QUESTIONNAIRE_RESPONSE: JsonDict = {
    "resourceType": "QuestionnaireResponse",
    "questionnaire": "http://example.org/Questionnaire/phq-9|1.0.0",
    "status": "completed",
    "subject": {"reference": "Patient/p1"},
    "authored": "2024-03-01T10:00:00Z",
    "item": [
        {
            "linkId": "g1",
            "item": [
                {
                    "linkId": "q1",
                    "answer": [{"valueCoding": {"system": "http://loinc.org", "code": "LA6568-5"}}],
                },
                {
                    "linkId": "q2",
                    "answer": [
                        {"valueInteger": 3, "item": [{"linkId": "q2.1", "answer": [{"valueString": "x"}]}]}
                    ],
                },
            ],
        }
    ],
}


def failure(body: JsonDict, expected_type: str | None = None) -> list[Issue]:
    with pytest.raises(BadRequest) as caught:
        validate_resource(body, expected_type=expected_type)
    assert caught.value.status == 400
    return caught.value.issues


def expressions(body: JsonDict) -> list[str]:
    return [e for issue in failure(body) for e in issue.expression]


def the_issue(body: JsonDict) -> Issue:
    issues = failure(body)
    assert len(issues) == 1, issues
    return issues[0]


def changed(base: JsonDict, **changes: Any) -> JsonDict:
    body = copy.deepcopy(base)
    body.update(changes)
    return body


# --- valid resources --------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [PATIENT, OBSERVATION, QUESTIONNAIRE, QUESTIONNAIRE_RESPONSE])
def test_valid_resources_pass(body: JsonDict) -> None:
    validate_resource(copy.deepcopy(body), expected_type=body["resourceType"])


def test_validation_does_not_modify_the_body() -> None:
    body = copy.deepcopy(OBSERVATION)
    validate_resource(body)
    assert body == OBSERVATION


def test_minimal_resources_pass() -> None:
    validate_resource({"resourceType": "Patient"})
    validate_resource({"resourceType": "Binary", "contentType": "text/plain", "data": "aGVsbG8gd29ybGQ="})
    validate_resource(
        {
            "resourceType": "Flag",
            "status": "active",
            "code": {"text": "risk"},
            "subject": {"reference": "Patient/p1"},
        }
    )


def test_primitive_extensions_pass() -> None:
    absent = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}
    body = changed(
        PATIENT,
        _birthDate={"id": "bd", "extension": [absent]},
        name=[{"given": ["Ada", None], "_given": [None, {"extension": [absent]}]}],
    )
    validate_resource(body)
    # Only the extension, no value: still satisfies a required element (Observation.status).
    obs = changed(OBSERVATION, _status={"extension": [absent]})
    del obs["status"]
    validate_resource(obs)


def test_contained_resources_pass() -> None:
    contained = {"resourceType": "Patient", "id": "inline", "gender": "other"}
    validate_resource(changed(OBSERVATION, contained=[contained], subject={"reference": "#inline"}))


def test_server_owned_meta_is_not_checked() -> None:
    # versionId and lastUpdated are overwritten on every write.
    validate_resource(changed(PATIENT, meta={"versionId": "not an id!", "lastUpdated": "yesterday"}))


def test_r4_elements_missing_from_r4b_models_pass() -> None:
    # R4 allows Meta in Extension.value[x]; R4B dropped it, and its model rejects the field.
    body = changed(PATIENT, extension=[{"url": "http://example.org/x", "valueMeta": {"versionId": "1"}}])
    validate_resource(body)


def test_value_set_with_compose_passes() -> None:
    value_set = {
        "resourceType": "ValueSet",
        "url": "http://example.org/ValueSet/x",
        "status": "draft",
        "compose": {
            "include": [
                {"system": "http://loinc.org", "concept": [{"code": "1-8"}]},
                {
                    "system": "http://snomed.info/sct",
                    "filter": [{"property": "concept", "op": "is-a", "value": "1"}],
                },
            ]
        },
    }
    validate_resource(value_set)


# --- the resource itself ------------------------------------------------------------------------------


def test_body_must_be_an_object_with_a_supported_resource_type() -> None:
    bodies: list[Any] = [[], {"id": "x"}, {"resourceType": 7}]
    for body in bodies:
        with pytest.raises(BadRequest):
            validate_resource(body)
    unknown = failure({"resourceType": "Pasient"})
    assert "not a FHIR R4 resource type" in unknown[0].diagnostics
    unsupported = failure({"resourceType": "Medication"})
    assert "not supported" in unsupported[0].diagnostics


def test_expected_type_must_match() -> None:
    issues = failure(copy.deepcopy(PATIENT), expected_type="Observation")
    assert issues[0].expression == ("Patient.resourceType",)


def test_resource_type_only_at_the_root() -> None:
    body = changed(PATIENT, name=[{"family": "x", "resourceType": "HumanName"}])
    assert expressions(body) == ["Patient.name[0].resourceType"]


# --- unknown elements ---------------------------------------------------------------------------------


def test_unknown_element() -> None:
    issue = the_issue(changed(PATIENT, foo="bar"))
    assert issue.expression == ("Patient.foo",)
    assert issue.code == "structure"


def test_unknown_nested_element() -> None:
    assert expressions(changed(PATIENT, name=[{"family": "x", "surname": "y"}])) == [
        "Patient.name[0].surname"
    ]


def test_r5_only_element_is_unknown() -> None:
    # Observation.instantiates[x] was added in R5; the R4 definition has no such element.
    r4 = json.loads((validation.DEFINITIONS / "structure-definitions.json").read_text())
    assert not any(e["path"].startswith("instantiates") for e in r4["types"]["Observation"]["elements"])
    body = changed(OBSERVATION, instantiatesCanonical="http://example.org/ActivityDefinition/x")
    assert expressions(body) == ["Observation.instantiatesCanonical"]


def test_r4b_only_element_is_unknown_although_the_r4b_model_accepts_it() -> None:
    # CodeableReference exists from R4B on; R4's Extension.value[x] does not list it.
    extension = {"url": "http://example.org/x", "valueCodeableReference": {"concept": {"text": "x"}}}
    body = changed(PATIENT, extension=[extension])
    model_class("Patient").model_validate(body)
    assert expressions(body) == ["Patient.extension[0].valueCodeableReference"]


def test_choice_type_with_a_disallowed_suffix() -> None:
    # Attachment is a FHIR type, but not one of Observation.value[x]'s.
    body = changed(OBSERVATION, valueAttachment={"contentType": "text/plain"})
    del body["valueQuantity"]
    assert expressions(body) == ["Observation.valueAttachment"]
    assert expressions(changed(OBSERVATION, effectiveDatetime="2024-01-01")) == [
        "Observation.effectiveDatetime"
    ]


def test_only_one_choice_type() -> None:
    issue = the_issue(changed(OBSERVATION, valueString="twelve"))
    assert "value[x]" in issue.diagnostics


def test_prohibited_element_of_simple_quantity() -> None:
    # Range.low is a SimpleQuantity, whose comparator has max 0.
    body = changed(OBSERVATION, referenceRange=[{"low": {"value": 1, "comparator": "<"}}])
    assert expressions(body) == ["Observation.referenceRange[0].low.comparator"]


# --- JSON types and primitive formats --------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"active": "true"}, "Patient.active"),
        ({"active": 1}, "Patient.active"),
        ({"gender": 1}, "Patient.gender"),
        ({"name": {"family": "x"}}, "Patient.name"),
        ({"gender": ["female"]}, "Patient.gender"),
        ({"maritalStatus": "M"}, "Patient.maritalStatus"),
        ({"name": ["Ada"]}, "Patient.name[0]"),
        ({"multipleBirthInteger": 1.5}, "Patient.multipleBirthInteger"),
        ({"multipleBirthInteger": 2**31}, "Patient.multipleBirthInteger"),
        ({"telecom": [{"value": "1", "rank": 0}]}, "Patient.telecom[0].rank"),
        ({"id": "a_b"}, "Patient.id"),
        ({"id": "x" * 65}, "Patient.id"),
        ({"implicitRules": "not a uri"}, "Patient.implicitRules"),
        ({"photo": [{"data": "not base64!"}]}, "Patient.photo[0].data"),
        (
            {"extension": [{"url": "http://example.org/x", "valueOid": "1.2.3"}]},
            "Patient.extension[0].valueOid",
        ),
        ({"name": [{"family": "a\u0000b"}]}, "Patient.name[0].family"),
    ],
)
def test_wrong_json_type_or_format(changes: JsonDict, where: str) -> None:
    assert expressions(changed(PATIENT, **changes)) == [where]


@pytest.mark.parametrize("value", ["10/12/1815", "1815-13-01", "1815-12-10T10:00:00Z", "18151210", ""])
def test_bad_date_format(value: str) -> None:
    issue = the_issue(changed(PATIENT, birthDate=value))
    assert issue.expression == ("Patient.birthDate",)


def test_impossible_calendar_date_is_caught_by_the_model_tier() -> None:
    # The R4 regex accepts 30 February; the R4B model's date parsing does not.
    assert expressions(changed(PATIENT, birthDate="2001-02-30")) == ["Patient.birthDate"]


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"effectiveDateTime": "2024-03-01T10:00:00"}, "Observation.effectiveDateTime"),  # no zone
        ({"issued": "2024-03-01"}, "Observation.issued"),  # instant needs a time
        ({"valueQuantity": {"value": "12"}}, "Observation.valueQuantity.value"),
        ({"valueQuantity": {"value": True}}, "Observation.valueQuantity.value"),
    ],
)
def test_observation_value_formats(changes: JsonDict, where: str) -> None:
    assert expressions(changed(OBSERVATION, **changes)) == [where]


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"gender": None}, "Patient.gender"),
        ({"gender": ""}, "Patient.gender"),
        ({"name": []}, "Patient.name"),
        ({"name": [{}]}, "Patient.name[0]"),
        ({"name": [{"given": ["Ada", None]}]}, "Patient.name[0].given[1]"),
        ({"maritalStatus": {}}, "Patient.maritalStatus"),
    ],
)
def test_null_and_empty_values_are_rejected(changes: JsonDict, where: str) -> None:
    assert expressions(changed(PATIENT, **changes)) == [where]


# --- cardinality and bindings -------------------------------------------------------------------------


def test_missing_required_element() -> None:
    body = copy.deepcopy(OBSERVATION)
    del body["code"]
    issue = the_issue(body)
    assert issue.expression == ("Observation.code",)
    assert issue.code == "required"


def test_required_element_only_when_its_parent_is_present() -> None:
    # Patient.link.other is required, but only inside a link.
    validate_resource(copy.deepcopy(PATIENT))
    body = changed(PATIENT, link=[{"type": "seealso"}])
    assert expressions(body) == ["Patient.link[0].other"]


def test_required_choice_element() -> None:
    # Questionnaire.item.enableWhen.answer[x] is 1..1.
    body = copy.deepcopy(QUESTIONNAIRE)
    del body["item"][0]["item"][1]["enableWhen"][0]["answerBoolean"]
    assert expressions(body) == ["Questionnaire.item[0].item[1].enableWhen[0].answer[x]"]


def test_bad_status_code() -> None:
    issue = the_issue(changed(OBSERVATION, status="done"))
    assert issue.expression == ("Observation.status",)
    assert issue.code == "code-invalid"
    assert "http://hl7.org/fhir/ValueSet/observation-status" in issue.diagnostics


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (changed(PATIENT, gender="F"), "Patient.gender"),
        (changed(QUESTIONNAIRE_RESPONSE, status="finished"), "QuestionnaireResponse.status"),
        (changed(PATIENT, telecom=[{"system": "fax-ish", "value": "1"}]), "Patient.telecom[0].system"),
        (
            changed(OBSERVATION, valueQuantity={"value": 1, "comparator": "=<"}),
            "Observation.valueQuantity.comparator",
        ),
    ],
)
def test_required_bindings(body: JsonDict, where: str) -> None:
    issue = the_issue(body)
    assert issue.expression == (where,)
    assert issue.code == "code-invalid"


def test_required_binding_on_coding_checks_codes_of_known_systems() -> None:
    # No supported R4 type binds a Coding or CodeableConcept with strength required, so this
    # exercises the check on a small hand-made definition.
    defs = validation._Definitions(
        {
            "types": {
                "Thing": {
                    "kind": "resource",
                    "elements": [
                        {
                            "path": "kind",
                            "min": 0,
                            "max": 1,
                            "types": ["CodeableConcept"],
                            "valueSet": "urn:vs",
                        },
                    ],
                },
                "CodeableConcept": {
                    "kind": "complex-type",
                    "elements": [
                        {"path": "coding", "min": 0, "max": "*", "types": ["Coding"]},
                        {"path": "text", "min": 0, "max": 1, "types": ["string"]},
                    ],
                },
                "Coding": {
                    "kind": "complex-type",
                    "elements": [
                        {"path": "system", "min": 0, "max": 1, "types": ["uri"]},
                        {"path": "code", "min": 0, "max": 1, "types": ["code"]},
                    ],
                },
                "string": {"kind": "primitive-type", "regex": "[ \\r\\n\\t\\S]+", "elements": []},
                "uri": {"kind": "primitive-type", "regex": "\\S*", "elements": []},
                "code": {"kind": "primitive-type", "regex": "[^\\s]+(\\s[^\\s]+)*", "elements": []},
            }
        },
        {"valueSets": {"urn:vs": {"urn:sys": ["a", "b"]}}},
    )
    walker = validation._Walker(defs)
    coding = [
        {"system": "urn:sys", "code": "a"},
        {"system": "urn:sys", "code": "z"},
        {"system": "urn:other", "code": "z"},
    ]
    walker.object({"kind": {"coding": coding}}, defs.node("Thing", ""), "Thing")
    assert [i.expression for i in walker.issues] == [("Thing.kind.coding[1].code",)]


# --- nesting -----------------------------------------------------------------------------------------


def test_nested_questionnaire_items_via_content_reference() -> None:
    body = copy.deepcopy(QUESTIONNAIRE)
    nested = body["item"][0]["item"]
    nested[0]["type"] = "bogus"
    nested[1]["colour"] = "blue"
    nested.append({"type": "display", "text": "no linkId"})
    nested[0]["item"] = [{"linkId": "deep", "type": "string", "maxLength": "10"}]
    assert sorted(expressions(body)) == [
        "Questionnaire.item[0].item[0].item[0].maxLength",
        "Questionnaire.item[0].item[0].type",
        "Questionnaire.item[0].item[1].colour",
        "Questionnaire.item[0].item[2].linkId",
    ]


def test_nested_questionnaire_response_answer_items() -> None:
    body = copy.deepcopy(QUESTIONNAIRE_RESPONSE)
    answer = body["item"][0]["item"][1]["answer"][0]
    answer["item"][0]["answer"] = [{"valueString": ""}]
    assert expressions(body) == [
        "QuestionnaireResponse.item[0].item[1].answer[0].item[0].answer[0].valueString"
    ]


def test_contained_resources_are_validated_as_resources() -> None:
    contained = [
        {"resourceType": "Patient", "id": "a", "gender": "f"},
        {"id": "b"},
        {"resourceType": "Medication", "id": "c"},
        {"resourceType": "Observation", "id": "d", "status": "final"},
    ]
    assert sorted(expressions(changed(OBSERVATION, contained=contained))) == [
        "Observation.contained[0].gender",
        "Observation.contained[1]",
        "Observation.contained[2]",
        "Observation.contained[3].code",
    ]


def test_primitive_extension_content_is_validated() -> None:
    assert expressions(changed(PATIENT, _birthDate={"extension": [{"valueCode": "unknown"}]})) == [
        "Patient.birthDate.extension[0].url"
    ]
    assert expressions(changed(PATIENT, _birthDate={"foo": 1})) == ["Patient.birthDate.foo"]
    assert expressions(changed(PATIENT, _birthDate="1815")) == ["Patient.birthDate"]
    # No ``_`` twin for complex elements, nor for the narrative div.
    assert expressions(changed(PATIENT, _name=[{"id": "x"}])) == ["Patient._name"]


def test_primitive_array_twins_must_align() -> None:
    ext = {"extension": [{"url": "http://example.org/x", "valueString": "y"}]}
    assert expressions(changed(PATIENT, name=[{"given": ["a", "b"], "_given": [ext]}])) == [
        "Patient.name[0].given"
    ]
    assert expressions(changed(PATIENT, name=[{"given": ["a"], "_given": [None, ext]}])) == [
        "Patient.name[0].given"
    ]
    assert expressions(changed(PATIENT, name=[{"given": [None], "_given": [None]}])) == [
        "Patient.name[0].given[0]"
    ]


def test_all_problems_are_reported_together() -> None:
    body = changed(OBSERVATION, status="done", foo=1, issued="today")
    del body["code"]
    outcome_expressions = sorted(expressions(body))
    assert outcome_expressions == [
        "Observation.code",
        "Observation.foo",
        "Observation.issued",
        "Observation.status",
    ]


def test_preload_compiles_every_supported_type() -> None:
    validation.preload()
    validate_resource(
        {
            "resourceType": "Subscription",
            "status": "off",
            "reason": "x",
            "criteria": "Task?",
            "channel": {"type": "rest-hook", "endpoint": "https://example.org/hook"},
        }
    )


def test_pydantic_locations_map_to_fhirpath() -> None:
    assert validation._loc_expression("Patient", ("name", 0, "given", 1)) == "Patient.name[0].given[1]"
    assert (
        validation._loc_expression("Patient", ("_birthDate", "extension", 0))
        == "Patient.birthDate.extension[0]"
    )
    assert validation._loc_expression("Observation", ()) == "Observation"
