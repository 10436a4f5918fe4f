"""The fast path of index extraction (:mod:`fhir_norse.server.search.fastpath`) against fhirpathpy.

fhirpathpy stays the reference: ``IndexExtractor(registry, fast=False)`` evaluates every expression
with it. Every resource of a corpus of realistic resources of each supported type (the scored
administration of ``build_administration``, the shipped Questionnaires, terminology and profiles,
hand-built clinical and workflow resources) and of variations of them that Hypothesis generates
(primitive extensions, missing and repeated elements, contained resources, values of unexpected JSON
types) must give the same index rows either way, and the same parameters must fail; each expression
must give the same items with the same types. The variations are the same on every run
(``derandomize=True``); a failing one is shrunk to few edits and printed as the resource's name in the
corpus and its edits.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from fhirpathpy.engine.nodes import ResourceNode, TypeInfo
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_norse.auth.audit import SUCCESS, build_audit_event
from fhir_norse.auth.caller import Caller
from fhir_norse.server.search.extract import (
    MODEL,
    IndexExtractor,
    _values,
    compile_expression,
    compile_fast_expression,
    rewrite_expression,
)
from fhir_norse.server.search.fastpath import FastEvaluator, Node
from fhir_norse.store.resource_types import SUPPORTED_TYPES
from fhir_norse.store.rows import IndexRow
from fhir_norse.store.search.params import SearchParamRegistry, full_registry, split_union
from tests.property_support import picks
from tests.scoring.test_resources import build, phq9, phq9_total, sad_changes

ROOT = Path(__file__).resolve().parents[2]
JsonDict = dict[str, Any]

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ROM = "http://fhir-norse.org/fhir/CodeSystem/rom-codes"
IS_SUBJECT = "http://hl7.org/fhir/StructureDefinition/questionnaireresponse-isSubject"
GENETICS = "http://hl7.org/fhir/StructureDefinition/observation-genetics"
ORDINAL = "http://hl7.org/fhir/StructureDefinition/ordinalValue"


def concept(system: str, code: str, display: str | None = None, text: str | None = None) -> JsonDict:
    coding: JsonDict = {"system": system, "code": code}
    if display:
        coding["display"] = display
    result: JsonDict = {"coding": [coding]}
    if text:
        result["text"] = text
    return result


def use_context() -> list[JsonDict]:
    usage = "http://terminology.hl7.org/CodeSystem/usage-context-type"
    return [
        {"code": {"system": usage, "code": "focus"}, "valueCodeableConcept": concept(SNOMED, "35489007")},
        {"code": {"system": usage, "code": "age"}, "valueRange": {"low": {"value": 18, "unit": "a"}}},
        {
            "code": {"system": usage, "code": "program"},
            "valueQuantity": {"value": 2, "system": UCUM, "code": "a"},
        },
        {"code": {"system": usage, "code": "venue"}, "valueReference": {"reference": "Location/l1"}},
    ]


# --------------------------------------------------------------------------------------------
# The corpus


def scored() -> list[JsonDict]:
    """The Observations, panel and report of one scored administration, with a PHQ-9 total."""
    built = build(
        sums=[phq9_total()],
        sum_mappings={"phq9": phq9()},
        changes=sad_changes(),
        issued="2026-03-04T10:15:00Z",
    )
    return built.resources()


def questionnaire_files() -> list[JsonDict]:
    paths = sorted((ROOT / "questionnaires").glob("*/Questionnaire-*.json"))
    return [json.loads(p.read_text()) for p in paths]


def terminology() -> list[JsonDict]:
    paths = sorted((ROOT / "questionnaires" / "terminology").glob("*.json"))
    paths += sorted((ROOT / "profiles").glob("*-*.json"))
    return [r for r in (json.loads(p.read_text()) for p in paths) if r.get("resourceType") in SUPPORTED_TYPES]


def search_parameters() -> list[JsonDict]:
    bundle = json.loads((ROOT / "fhir_norse/definitions/search-parameters.json").read_text())
    found = [e["resource"] for e in bundle["entry"]]
    # Every composite (components, several bases) and a spread of the others.
    return [r for r in found if r["type"] == "composite"] + found[::17]


DEFAULT_ANSWERS: dict[str, JsonDict] = {
    "integer": {"valueInteger": 3},
    "decimal": {"valueDecimal": 2.5},
    "boolean": {"valueBoolean": True},
    "date": {"valueDate": "2026-03-01"},
    "dateTime": {"valueDateTime": "2026-03-01T10:00:00Z"},
}


def answers(items: list[JsonDict]) -> list[JsonDict]:
    """A response's items for a Questionnaire's: every question answered with its first option."""
    out: list[JsonDict] = []
    for item in items:
        answered: JsonDict = {"linkId": item["linkId"]}
        if item.get("text"):
            answered["text"] = item["text"]
        if item.get("type") == "group":
            answered["item"] = answers(item.get("item", []))
        elif item.get("type") != "display":
            option = (item.get("answerOption") or [{}])[0]
            value: JsonDict = {k: v for k, v in option.items() if k.startswith("value")}
            if not value:
                value = DEFAULT_ANSWERS.get(item.get("type", ""), {"valueString": "fritekst"})
            answered["answer"] = [value]
        out.append(answered)
    return out


def responses() -> list[JsonDict]:
    out = []
    for i, q in enumerate(questionnaire_files()):
        out.append(
            {
                "resourceType": "QuestionnaireResponse",
                "id": f"qr-{i}",
                "meta": {
                    "profile": ["http://fhir-norse.org/fhir/StructureDefinition/rom-questionnaire-response"]
                },
                "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:0000-{i}"},
                "questionnaire": f"{q['url']}|{q.get('version', '1')}",
                "status": "completed",
                "subject": {"reference": "Patient/p-1", "display": "Ola"},
                "encounter": {"reference": "Encounter/e-1"},
                "authored": "2026-03-04T10:15:00+01:00",
                "author": {"reference": "Patient/p-1"},
                "source": {"reference": "RelatedPerson/rp-1"},
                "basedOn": [{"reference": "ServiceRequest/sr-1"}],
                "partOf": [{"reference": "Procedure/pr-1"}],
                "item": answers(q.get("item", [])),
            }
        )
    out.append(
        {
            "resourceType": "QuestionnaireResponse",
            "id": "qr-subject",
            "status": "in-progress",
            "questionnaire": "Questionnaire/local",
            "subject": {"reference": "Group/g-1"},
            "item": [
                {
                    "linkId": "who",
                    "extension": [{"url": IS_SUBJECT, "valueBoolean": True}],
                    "answer": [{"valueReference": {"reference": "Patient/p-2"}}, {"valueString": "x"}],
                },
                {"linkId": "other", "answer": [{"valueReference": {"reference": "Patient/p-3"}}]},
            ],
        }
    )
    return out


def patients() -> list[JsonDict]:
    full: JsonDict = {
        "resourceType": "Patient",
        "id": "p-1",
        "meta": {
            "profile": ["http://example.org/StructureDefinition/patient"],
            "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
            "tag": [{"system": "urn:tag", "code": "t1", "display": "Tag"}],
            "source": "urn:source:ehr",
        },
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-extensions-Patient-mothersMaidenName",
                "valueString": "Østbø",
            }
        ],
        "identifier": [
            {
                "system": "urn:oid:2.16.578.1.12.4.1.4.1",
                "value": "13116900216",
                "type": {"text": "Fødselsnummer"},
            },
            {"value": "local-1"},
        ],
        "active": True,
        "name": [
            {"use": "official", "family": "Nordmann", "given": ["Ola", "Jon"], "prefix": ["Dr."]},
            {"text": "Ola N."},
        ],
        "telecom": [
            {"system": "phone", "value": "+47 22 00 00 00", "use": "home"},
            {"system": "email", "value": "ola@example.no"},
            {"system": "sms", "value": "+47 900 00 000"},
        ],
        "gender": "male",
        "birthDate": "1969-11-13",
        "deceasedBoolean": False,
        "address": [
            {
                "use": "home",
                "line": ["Storgata 1", "Leilighet 2"],
                "city": "Tromsø",
                "postalCode": "9008",
                "state": "Troms",
                "country": "NO",
            }
        ],
        "communication": [{"language": concept("urn:ietf:bcp:47", "nb", "Norsk bokmål")}],
        "generalPractitioner": [{"reference": "Practitioner/pr-1"}, {"reference": "Organization/o-1"}],
        "managingOrganization": {"reference": "Organization/o-1", "display": "Klinikk"},
        "link": [{"other": {"reference": "Patient/p-9"}, "type": "seealso"}],
    }
    deceased = {
        "resourceType": "Patient",
        "id": "p-2",
        "name": [
            {"family": "Hansen", "_given": [None, {"extension": [{"url": "urn:x", "valueString": "y"}]}]}
        ],
        "deceasedDateTime": "2024-02-03T04:05:06Z",
        "_gender": {
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                    "valueCode": "asked-declined",
                }
            ]
        },
    }
    died = {"resourceType": "Patient", "id": "p-3", "deceasedBoolean": True, "birthDate": "1950"}
    return [full, deceased, died, {"resourceType": "Patient", "id": "p-4"}]


def people_and_teams() -> list[JsonDict]:
    return [
        {
            "resourceType": "Practitioner",
            "id": "pr-1",
            "identifier": [{"system": "urn:oid:2.16.578.1.12.4.1.4.4", "value": "9144889"}],
            "active": True,
            "name": [{"family": "Lege", "given": ["Kari"]}],
            "telecom": [{"system": "email", "value": "kari@klinikk.no"}, {"system": "phone", "value": "123"}],
            "address": [{"city": "Bergen", "country": "NO", "use": "work"}],
            "gender": "female",
            "communication": [concept("urn:ietf:bcp:47", "nb")],
        },
        {
            "resourceType": "PractitionerRole",
            "id": "prr-1",
            "active": True,
            "period": {"start": "2020-01-01"},
            "practitioner": {"reference": "Practitioner/pr-1"},
            "organization": {"reference": "Organization/o-1"},
            "code": [concept("http://terminology.hl7.org/CodeSystem/practitioner-role", "doctor")],
            "specialty": [concept(SNOMED, "394587001", "Psychiatry")],
            "location": [{"reference": "Location/l-1"}],
            "healthcareService": [{"reference": "HealthcareService/hs-1"}],
            "telecom": [{"system": "phone", "value": "555"}],
            "endpoint": [{"reference": "Endpoint/ep-1"}],
        },
        {
            "resourceType": "Organization",
            "id": "o-1",
            "identifier": [{"system": "urn:oid:2.16.578.1.12.4.1.4.101", "value": "974589095"}],
            "active": True,
            "type": [concept("http://terminology.hl7.org/CodeSystem/organization-type", "prov")],
            "name": "Psykiatrisk klinikk",
            "alias": ["PK", "Klinikken"],
            "address": [{"line": ["Veien 2"], "city": "Oslo", "postalCode": "0150"}],
            "partOf": {"reference": "Organization/o-0"},
            "endpoint": [{"reference": "Endpoint/ep-1"}],
        },
        {
            "resourceType": "CareTeam",
            "id": "ct-1",
            "identifier": [{"value": "team-1"}],
            "status": "active",
            "category": [concept(LOINC, "LA27976-2", "Encounter-focused care team")],
            "subject": {"reference": "Patient/p-1"},
            "encounter": {"reference": "Encounter/e-1"},
            "period": {"start": "2026-01-01", "end": "2026-12-31"},
            "participant": [
                {"role": [concept(SNOMED, "158965000")], "member": {"reference": "Practitioner/pr-1"}},
                {"member": {"reference": "Patient/p-1"}},
                {"member": {"identifier": {"system": "urn:hpr", "value": "42"}}},
            ],
            "managingOrganization": [{"reference": "Organization/o-1"}],
        },
        {
            "resourceType": "EpisodeOfCare",
            "id": "eoc-1",
            "identifier": [{"system": "urn:eoc", "value": "1"}],
            "status": "active",
            "type": [concept("http://terminology.hl7.org/CodeSystem/episodeofcare-type", "hacc")],
            "diagnosis": [{"condition": {"reference": "Condition/c-1"}, "rank": 1}],
            "patient": {"reference": "Patient/p-1"},
            "managingOrganization": {"reference": "Organization/o-1"},
            "period": {"start": "2026-01-01T08:00:00+01:00"},
            "referralRequest": [{"reference": "ServiceRequest/sr-1"}],
            "careManager": {"reference": "Practitioner/pr-1"},
            "team": [{"reference": "CareTeam/ct-1"}],
        },
        {
            "resourceType": "EpisodeOfCare",
            "id": "eoc-2",
            "status": "finished",
            "patient": {"reference": "Patient/p-2"},
            "careManager": {"reference": "PractitionerRole/prr-1"},
        },
        {
            "resourceType": "Encounter",
            "id": "e-1",
            "identifier": [{"value": "enc-1"}],
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [concept(SNOMED, "185389009", "Follow-up visit")],
            "priority": concept("http://terminology.hl7.org/CodeSystem/v3-ActPriority", "R"),
            "subject": {"reference": "Patient/p-1"},
            "episodeOfCare": [{"reference": "EpisodeOfCare/eoc-1"}],
            "basedOn": [{"reference": "ServiceRequest/sr-1"}],
            "participant": [
                {
                    "type": [concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PPRF")],
                    "individual": {"reference": "Practitioner/pr-1"},
                },
                {"individual": {"reference": "RelatedPerson/rp-1"}},
            ],
            "appointment": [{"reference": "Appointment/a-1"}],
            "period": {"start": "2026-03-04T10:00:00+01:00", "end": "2026-03-04T10:45:00+01:00"},
            "length": {"value": 45, "unit": "min", "system": UCUM, "code": "min"},
            "reasonCode": [{"text": "Oppfølging"}],
            "reasonReference": [{"reference": "Condition/c-1"}],
            "diagnosis": [{"condition": {"reference": "Condition/c-1"}}],
            "account": [{"reference": "Account/ac-1"}],
            "hospitalization": {"specialArrangement": [concept("urn:sa", "int", "Interpreter")]},
            "location": [
                {"location": {"reference": "Location/l-1"}, "period": {"start": "2026-03-04T10:00:00Z"}}
            ],
            "serviceProvider": {"reference": "Organization/o-1"},
            "partOf": {"reference": "Encounter/e-0"},
        },
    ]


def observations() -> list[JsonDict]:
    base: JsonDict = {
        "resourceType": "Observation",
        "status": "final",
        "category": [concept(CATEGORY, "survey", "Survey")],
        "subject": {"reference": "Patient/p-1"},
    }
    return [
        {
            **base,
            "id": "bp",
            "identifier": [{"system": "urn:obs", "value": "bp-1"}],
            "basedOn": [{"reference": "ServiceRequest/sr-1"}],
            "partOf": [{"reference": "Procedure/pr-1"}],
            "code": concept(LOINC, "85354-9", "Blood pressure panel", "BP"),
            "encounter": {"reference": "Encounter/e-1"},
            "focus": [{"reference": "Condition/c-1"}],
            "effectivePeriod": {"start": "2026-03-04T10:00:00Z", "end": "2026-03-04T10:05:00Z"},
            "performer": [{"reference": "Practitioner/pr-1"}, {"reference": "Organization/o-1"}],
            "method": concept(SNOMED, "37931006"),
            "specimen": {"reference": "Specimen/s-1"},
            "device": {"reference": "Device/d-1"},
            "hasMember": [{"reference": "Observation/o-2"}],
            "derivedFrom": [{"reference": "DocumentReference/dr-1"}],
            "component": [
                {
                    "code": concept(LOINC, "8480-6", "Systolic"),
                    "valueQuantity": {"value": 120, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
                },
                {
                    "code": concept(LOINC, "8462-4", "Diastolic"),
                    "valueQuantity": {"value": 80.50, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
                },
                {
                    "code": concept(LOINC, "8867-4"),
                    "dataAbsentReason": concept(
                        "http://terminology.hl7.org/CodeSystem/data-absent-reason", "error"
                    ),
                },
                {
                    "code": concept(LOINC, "x-1"),
                    "valueCodeableConcept": concept(SNOMED, "17621005", "Normal"),
                },
                {"code": {"text": "note"}, "valueString": "sitting"},
                {
                    "code": concept(LOINC, "x-2"),
                    "valueSampledData": {"origin": {"value": 0}, "period": 10, "dimensions": 1},
                },
                {"code": concept(LOINC, "x-3"), "valueRange": {"low": {"value": 1}, "high": {"value": 2}}},
            ],
        },
        {
            **base,
            "id": "severity",
            "code": concept(LOINC, "75275-8", "Severity"),
            "effectiveDateTime": "2026-03-04",
            "valueCodeableConcept": concept(LOINC, "LA6568-5", "Not at all", "Ikke i det hele tatt"),
            "interpretation": [
                concept("http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "N")
            ],
        },
        {
            **base,
            "id": "text",
            "code": {"text": "Fritekst"},
            "effectiveInstant": "2026-03-04T10:15:00.123Z",
            "valueString": "Bedre enn sist",
        },
        {
            **base,
            "id": "date",
            "code": concept(LOINC, "x-date"),
            "effectiveTiming": {"event": ["2026-03-01", "2026-03-05T10:00:00Z"]},
            "valueDateTime": "2026-02-01T12:00:00+01:00",
        },
        {
            **base,
            "id": "period",
            "code": concept(LOINC, "x-period"),
            "valuePeriod": {"start": "2026-01-01", "end": "2026-02-01"},
            "dataAbsentReason": {"text": "partial"},
        },
        {
            **base,
            "id": "misc-values",
            "code": concept(LOINC, "x-misc"),
            "subject": {"reference": "Group/g-1"},
            "valueBoolean": True,
            "component": [
                {"code": concept(LOINC, "c-int"), "valueInteger": 3},
                {"code": concept(LOINC, "c-bool"), "valueBoolean": False},
                {"code": concept(LOINC, "c-ratio"), "valueRatio": {"numerator": {"value": 1}}},
                {"code": concept(LOINC, "c-time"), "valueTime": "10:00:00"},
                {"code": concept(LOINC, "c-dt"), "valueDateTime": "2026-01-01"},
                {"code": concept(LOINC, "c-period"), "valuePeriod": {"end": "2026-01-01"}},
            ],
        },
        {
            **base,
            "id": "genetics",
            "code": concept(LOINC, "69548-6"),
            "extension": [
                {
                    "url": GENETICS + "Gene",
                    "valueCodeableConcept": concept("http://www.genenames.org", "3236", "EGFR"),
                },
                {"url": GENETICS + "DnaVariant", "valueString": "c.2573T>G"},
                {"url": GENETICS + "AminoAcidChangeName", "valueString": "p.Leu858Arg"},
                {"url": GENETICS + "DnaVariant", "valueString": "second variant is not indexed"},
            ],
            "valueRange": {"low": {"value": 5, "unit": "mg", "system": UCUM, "code": "mg"}},
        },
        {
            **base,
            "id": "contained",
            "contained": [{"resourceType": "Patient", "id": "inline", "name": [{"family": "Inne"}]}],
            "code": concept(LOINC, "x-contained"),
            "subject": {"reference": "#inline"},
            "performer": [
                {"reference": "urn:uuid:8f3e1c52-1d3a-4c11-9d56-9b8c0a2f2b10", "type": "Practitioner"}
            ],
            "derivedFrom": [{"identifier": {"system": "urn:qr", "value": "qr-9"}}],
            "valueQuantity": {"value": 1e-3, "comparator": "<", "unit": "g", "system": UCUM, "code": "g"},
        },
    ]


def workflow() -> list[JsonDict]:
    return [
        {
            "resourceType": "DiagnosticReport",
            "id": "dr-x",
            "identifier": [{"value": "dr-x"}],
            "basedOn": [{"reference": "ServiceRequest/sr-1"}],
            "status": "final",
            "category": [concept(ROM, "rom")],
            "code": concept(ROM, "rom-feedback-report"),
            "subject": {"reference": "Patient/p-1"},
            "encounter": {"reference": "Encounter/e-1"},
            "effectivePeriod": {"start": "2026-03-04T10:00:00Z"},
            "issued": "2026-03-04T10:20:00.5+01:00",
            "performer": [{"reference": "Organization/o-1"}],
            "resultsInterpreter": [{"reference": "Practitioner/pr-1"}],
            "specimen": [{"reference": "Specimen/s-1"}],
            "result": [{"reference": "Observation/bp"}, {"reference": "Observation/severity"}],
            "media": [{"link": {"reference": "Media/m-1"}}],
            "conclusionCode": [concept(SNOMED, "281900007")],
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/DiagnosticReport-geneticsAssessedCondition",
                    "valueReference": {"reference": "Condition/c-1"},
                }
            ],
        },
        {
            "resourceType": "Flag",
            "id": "flag-1",
            "meta": {"profile": ["http://fhir-norse.org/fhir/StructureDefinition/rom-alert-flag"]},
            "identifier": [{"system": "http://fhir-norse.org/fhir/alert", "value": "suicide-risk|sad"}],
            "status": "active",
            "category": [concept("http://terminology.hl7.org/CodeSystem/flag-category", "clinical")],
            "code": concept(
                "http://fhir-norse.org/fhir/CodeSystem/rom-alerts", "suicide-risk", text="Risiko"
            ),
            "subject": {"reference": "Patient/p-1"},
            "period": {"start": "2026-03-04T10:15:00+01:00"},
            "encounter": {"reference": "Encounter/e-1"},
            "author": {"reference": "Device/scorer"},
        },
        {
            "resourceType": "Task",
            "id": "task-1",
            "identifier": [{"system": "urn:task", "value": "t-1"}],
            "groupIdentifier": {"value": "g-1"},
            "basedOn": [{"reference": "Flag/flag-1"}],
            "partOf": [{"reference": "Task/task-0"}],
            "status": "requested",
            "businessStatus": {"text": "waiting"},
            "intent": "order",
            "priority": "urgent",
            "code": concept("http://hl7.org/fhir/CodeSystem/task-code", "fulfill"),
            "focus": {"reference": "Flag/flag-1"},
            "for": {"reference": "Patient/p-1"},
            "encounter": {"reference": "Encounter/e-1"},
            "executionPeriod": {"start": "2026-03-04T10:15:00+01:00"},
            "authoredOn": "2026-03-04T10:15:00+01:00",
            "lastModified": "2026-03-04T11:00:00+01:00",
            "requester": {"reference": "Device/scorer"},
            "performerType": [
                concept("http://terminology.hl7.org/CodeSystem/task-performer-type", "reviewer")
            ],
            "owner": {"reference": "CareTeam/ct-1"},
            "input": [{"type": {"text": "alert"}, "valueReference": {"reference": "Flag/flag-1"}}],
        },
        {
            "resourceType": "ServiceRequest",
            "id": "sr-1",
            "meta": {"profile": ["http://fhir-norse.org/fhir/StructureDefinition/rom-scale-override"]},
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/workflow-episodeOfCare",
                    "valueReference": {"reference": "EpisodeOfCare/eoc-1"},
                }
            ],
            "identifier": [{"system": "urn:sr", "value": "sr-1"}],
            "requisition": {"value": "req-1"},
            "basedOn": [{"reference": "ServiceRequest/sr-0"}],
            "replaces": [{"reference": "ServiceRequest/sr-0"}],
            "instantiatesCanonical": ["http://example.org/PlanDefinition/rom|1.0"],
            "instantiatesUri": ["http://example.org/protocol"],
            "status": "active",
            "intent": "order",
            "priority": "routine",
            "doNotPerform": True,
            "category": [concept("http://fhir-norse.org/fhir/CodeSystem/rom-codes", "scale-override")],
            "code": concept("http://fhir-norse.org/fhir/CodeSystem/nf21-scales", "worry"),
            "subject": {"reference": "Patient/p-1"},
            "encounter": {"reference": "Encounter/e-1"},
            "occurrenceDateTime": "2026-03-11T09:00:00+01:00",
            "authoredOn": "2026-03-04T10:15:00+01:00",
            "requester": {"reference": "Practitioner/pr-1"},
            "performerType": concept("http://snomed.info/sct", "18803008"),
            "performer": [{"reference": "Practitioner/pr-1"}],
            "reasonCode": [{"text": "Worry is being treated elsewhere"}],
            "reasonReference": [{"reference": "Observation/obs-1"}],
            "specimen": [{"reference": "Specimen/s-1"}],
            "bodySite": [concept("http://snomed.info/sct", "38266002")],
        },
        {
            # A monitoring plan (fhir_norse/rom/scheduler.py) with every element an R4 parameter reads.
            "resourceType": "CarePlan",
            "id": "cp-1",
            "identifier": [{"system": "urn:cp", "value": "cp-1"}],
            "instantiatesCanonical": ["http://example.org/PlanDefinition/rom|1.0"],
            "instantiatesUri": ["http://example.org/protocol"],
            "basedOn": [{"reference": "CarePlan/cp-0"}],
            "replaces": [{"reference": "CarePlan/cp-0"}],
            "partOf": [{"reference": "CarePlan/cp-0"}],
            "status": "active",
            "intent": "plan",
            "category": [concept("http://snomed.info/sct", "736378000")],
            "subject": {"reference": "Patient/p-1"},
            "encounter": {"reference": "Encounter/e-1"},
            "period": {"start": "2026-03-02T08:00:00+01:00", "end": "2026-06-01"},
            "created": "2026-03-01",
            "author": {"reference": "Practitioner/pr-1"},
            "careTeam": [{"reference": "CareTeam/ct-1"}],
            "addresses": [{"reference": "Condition/c-1"}],
            "goal": [{"reference": "Goal/g-1"}],
            "activity": [
                {
                    "outcomeCodeableConcept": [concept(SNOMED, "385669000")],
                    "outcomeReference": [{"reference": "QuestionnaireResponse/qr-1"}],
                    "reference": {"reference": "ServiceRequest/sr-1"},
                },
                {
                    "detail": {
                        "kind": "Task",
                        "instantiatesCanonical": ["http://fhir-norse.org/fhir/Questionnaire/phq9|1.0.0"],
                        "code": concept(
                            "http://fhir-norse.org/fhir/CodeSystem/administration-context", "weekly"
                        ),
                        "status": "scheduled",
                        "scheduledTiming": {
                            "event": ["2026-03-02T08:00:00+01:00"],
                            "repeat": {"dayOfWeek": ["mon"], "timeOfDay": ["08:00:00"], "periodUnit": "wk"},
                        },
                        "performer": [{"reference": "Patient/p-1"}],
                    }
                },
                {"detail": {"status": "scheduled", "scheduledPeriod": {"start": "2026-03-09"}}},
                {"detail": {"status": "scheduled", "scheduledString": "before each session"}},
            ],
        },
        {
            "resourceType": "Appointment",
            "id": "ap-1",
            "identifier": [{"system": "urn:ap", "value": "ap-1"}],
            "status": "booked",
            "serviceCategory": [concept("http://terminology.hl7.org/CodeSystem/service-category", "8")],
            "serviceType": [concept(SNOMED, "310029005")],
            "specialty": [concept(SNOMED, "394587001")],
            "appointmentType": concept("http://terminology.hl7.org/CodeSystem/v2-0276", "FOLLOWUP"),
            "reasonCode": [concept(SNOMED, "35489007")],
            "reasonReference": [{"reference": "Condition/c-1"}],
            "supportingInformation": [{"reference": "QuestionnaireResponse/qr-1"}],
            "start": "2026-03-05T09:00:00+01:00",
            "end": "2026-03-05T09:45:00+01:00",
            "slot": [{"reference": "Slot/s-1"}],
            "basedOn": [{"reference": "ServiceRequest/sr-1"}],
            "participant": [
                {"actor": {"reference": "Patient/p-1"}, "status": "accepted"},
                {"actor": {"reference": "Practitioner/pr-1"}, "required": "required", "status": "accepted"},
                {"actor": {"reference": "Location/l-1"}, "status": "tentative"},
            ],
        },
        {
            "resourceType": "CommunicationRequest",
            "id": "cr-1",
            "identifier": [{"value": "cr-1"}],
            "basedOn": [{"reference": "Task/task-1"}],
            "replaces": [{"reference": "CommunicationRequest/cr-0"}],
            "groupIdentifier": {"value": "g-1"},
            "status": "active",
            "category": [concept("http://terminology.hl7.org/CodeSystem/communication-category", "reminder")],
            "priority": "routine",
            "medium": [concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationMode", "SMSWRIT")],
            "subject": {"reference": "Patient/p-1"},
            "encounter": {"reference": "Encounter/e-1"},
            "occurrenceDateTime": "2026-03-11T09:00:00+01:00",
            "authoredOn": "2026-03-04",
            "requester": {"reference": "Practitioner/pr-1"},
            "recipient": [{"reference": "Patient/p-1"}],
            "sender": {"reference": "Organization/o-1"},
        },
        {
            "resourceType": "CommunicationRequest",
            "id": "cr-2",
            "status": "draft",
            "occurrencePeriod": {"start": "2026-03-11"},
        },
        {
            "resourceType": "Communication",
            "id": "c-1",
            "identifier": [{"value": "c-1"}],
            "instantiatesCanonical": ["http://example.org/PlanDefinition/reminder|1.0"],
            "instantiatesUri": ["http://example.org/protocol"],
            "basedOn": [{"reference": "CommunicationRequest/cr-1"}],
            "partOf": [{"reference": "Task/task-1"}],
            "status": "completed",
            "category": [concept("http://terminology.hl7.org/CodeSystem/communication-category", "reminder")],
            "medium": [concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationMode", "SMSWRIT")],
            "subject": {"reference": "Patient/p-1"},
            "encounter": {"reference": "Encounter/e-1"},
            "sent": "2026-03-11T09:00:00+01:00",
            "received": "2026-03-11T09:00:05+01:00",
            "recipient": [{"reference": "Patient/p-1"}],
            "sender": {"reference": "Organization/o-1"},
        },
        {
            "resourceType": "Provenance",
            "id": "prov-1",
            "target": [
                {"reference": "Observation/o-1/_history/1"},
                {"reference": "Patient/p-1"},
                {"reference": "Flag/flag-1"},
            ],
            "occurredDateTime": "2026-03-04T10:15:00+01:00",
            "recorded": "2026-03-04T10:15:01.250+01:00",
            "location": {"reference": "Location/l-1"},
            "activity": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE"}
                ]
            },
            "agent": [
                {
                    "type": concept(
                        "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "assembler"
                    ),
                    "role": [concept("http://terminology.hl7.org/CodeSystem/v3-RoleClass", "ASSIGNED")],
                    "who": {
                        "identifier": {"system": "urn:software", "value": "fhir-norse-scorer/0.1.0"},
                        "display": "scorer",
                    },
                },
                {"who": {"reference": "Practitioner/pr-1"}, "onBehalfOf": {"reference": "Organization/o-1"}},
            ],
            "entity": [
                {"role": "source", "what": {"reference": "QuestionnaireResponse/qr-1/_history/1"}},
                {"role": "source", "what": {"identifier": {"system": "urn:mapping", "value": "nf21|2.1.0"}}},
            ],
            "signature": [
                {
                    "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}],
                    "when": "2026-03-04T10:15:01Z",
                    "who": {"reference": "Practitioner/pr-1"},
                }
            ],
        },
        {
            "resourceType": "Provenance",
            "id": "prov-2",
            "target": [{"reference": "Observation/o-2"}],
            "occurredPeriod": {"start": "2026-03-04"},
            "recorded": "2026-03-04T10:15:01Z",
            "agent": [{"who": {"reference": "Device/scorer"}}],
        },
        {
            "resourceType": "Consent",
            "id": "consent-1",
            "identifier": [{"value": "consent-1"}],
            "status": "active",
            "scope": concept("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy"),
            "category": [concept(LOINC, "59284-0")],
            "patient": {"reference": "Patient/p-1"},
            "dateTime": "2026-01-01T12:00:00Z",
            "performer": [{"reference": "Patient/p-1"}],
            "organization": [{"reference": "Organization/o-1"}],
            "sourceReference": {"reference": "DocumentReference/dr-1"},
            "policyRule": concept("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN"),
            "provision": {
                "type": "permit",
                "period": {"start": "2026-01-01", "end": "2027-01-01"},
                "actor": [
                    {
                        "role": concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PRCP"),
                        "reference": {"reference": "CareTeam/ct-1"},
                    }
                ],
                "action": [concept("http://terminology.hl7.org/CodeSystem/consentaction", "access")],
                "securityLabel": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}
                ],
                "purpose": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}
                ],
                "data": [{"meaning": "related", "reference": {"reference": "EpisodeOfCare/eoc-1"}}],
            },
        },
        {
            "resourceType": "Subscription",
            "id": "sub-1",
            "status": "active",
            "contact": [{"system": "email", "value": "ops@example.org"}],
            "reason": "Alerts",
            "criteria": "Flag?status=active&code=suicide-risk",
            "channel": {
                "type": "rest-hook",
                "endpoint": "https://hooks.example.org/fhir",
                "payload": "application/fhir+json",
            },
        },
        {
            "resourceType": "DocumentReference",
            "id": "doc-1",
            "masterIdentifier": {
                "system": "urn:ietf:rfc:3986",
                "value": "urn:uuid:0f0e0d0c-0b0a-4090-8070-605040302010",
            },
            "identifier": [{"system": "http://fhir-norse.org/fhir/report-document", "value": "dr-1|1"}],
            "status": "current",
            "docStatus": "final",
            "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]},
            "category": [
                {"coding": [{"system": "http://fhir-norse.org/fhir/CodeSystem/rom-codes", "code": "rom"}]}
            ],
            "subject": {"reference": "Patient/p-1"},
            "date": "2026-01-05T10:00:00+01:00",
            "author": [{"reference": "Practitioner/pr-1"}],
            "custodian": {"reference": "Organization/o-1"},
            "relatesTo": [{"code": "replaces", "target": {"reference": "DocumentReference/doc-0"}}],
            "description": "Feedback report",
            "securityLabel": [
                {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}
                    ]
                }
            ],
            "content": [
                {
                    "attachment": {
                        "contentType": "application/pdf",
                        "language": "nb",
                        "url": "Binary/bin-1",
                        "title": "Report",
                        "creation": "2026-01-05T10:00:00+01:00",
                    },
                    "format": {
                        "system": "urn:oid:1.3.6.1.4.1.19376.1.2.3",
                        "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient",
                    },
                }
            ],
            "context": {
                "encounter": [{"reference": "Encounter/e-1"}],
                "period": {"start": "2026-01-05T10:00:00+01:00", "end": "2026-01-05T10:00:00+01:00"},
                "facilityType": {"coding": [{"system": "http://snomed.info/sct", "code": "225728007"}]},
                "practiceSetting": {"coding": [{"system": "http://snomed.info/sct", "code": "394587001"}]},
                "sourcePatientInfo": {"reference": "Patient/p-1"},
                "related": [{"reference": "DiagnosticReport/dr-1"}],
            },
        },
        {
            "resourceType": "Group",
            "id": "g-1",
            "identifier": [{"system": "http://fhir-norse.org/fhir/cohort", "value": "in-treatment"}],
            "active": True,
            "type": "person",
            "actual": True,
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "116154003"}]},
            "name": "Patients in treatment",
            "managingEntity": {"reference": "Organization/o-1"},
            "characteristic": [
                {
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "225728007"}]},
                    "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]},
                    "exclude": False,
                },
                {
                    "code": {"text": "age"},
                    "valueBoolean": True,
                    "exclude": True,
                },
            ],
            "member": [
                {"entity": {"reference": "Patient/p-1"}, "period": {"start": "2026-01-05"}},
                {"entity": {"reference": "Patient/p-2"}, "inactive": True},
            ],
        },
        {
            "resourceType": "Basic",
            "id": "topic-1",
            "identifier": [
                {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:0f0e0d0c-0b0a-4090-8070-605040302011"}
            ],
            "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
            "subject": {"reference": "Patient/p-1"},
            "created": "2026-01-05",
            "author": {"reference": "Practitioner/pr-1"},
        },
        {
            "resourceType": "Binary",
            "id": "bin-1",
            "meta": {
                "security": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}
                ]
            },
            "contentType": "text/plain",
            "data": "aGVsbG8=",
        },
        {
            "resourceType": "ConceptMap",
            "id": "cm-1",
            "url": "http://example.org/ConceptMap/answers",
            "version": "1.0",
            "name": "Answers",
            "title": "Answers to LOINC",
            "status": "draft",
            "date": "2026-01-01",
            "publisher": "fhir-norse",
            "description": "Maps answers.",
            "useContext": use_context(),
            "jurisdiction": [concept("urn:iso:std:iso:3166", "NO")],
            "identifier": {"value": "cm-1"},
            "sourceUri": "http://example.org/ValueSet/a",
            "targetCanonical": "http://loinc.org/vs/LL358-3|1.0",
            "group": [
                {
                    "source": "http://fhir-norse.org/fhir/CodeSystem/nf21-answers",
                    "target": LOINC,
                    "element": [
                        {
                            "code": "1",
                            "target": [
                                {
                                    "code": "LA6568-5",
                                    "equivalence": "equivalent",
                                    "dependsOn": [{"property": "http://example.org/p", "value": "x"}],
                                    "product": [{"property": "http://example.org/q", "value": "y"}],
                                }
                            ],
                        }
                    ],
                    "unmapped": {"mode": "other-map", "url": "http://example.org/ConceptMap/other"},
                }
            ],
        },
        {
            "resourceType": "OperationDefinition",
            "id": "od-1",
            "url": "http://example.org/OperationDefinition/score",
            "version": "1",
            "name": "Score",
            "title": "Score a response",
            "status": "active",
            "kind": "operation",
            "date": "2026-01-01",
            "publisher": "fhir-norse",
            "description": "Scores.",
            "useContext": use_context(),
            "jurisdiction": [concept("urn:iso:std:iso:3166", "NO")],
            "code": "score",
            "base": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
            "resource": ["QuestionnaireResponse"],
            "system": False,
            "type": True,
            "instance": True,
            "inputProfile": "http://example.org/StructureDefinition/in",
            "outputProfile": "http://example.org/StructureDefinition/out",
        },
        {
            "resourceType": "Library",
            "id": "lib-1",
            "url": "http://example.org/Library/scoring",
            "identifier": [{"value": "lib-1"}],
            "version": "2.1.0",
            "name": "Scoring",
            "title": "Scoring logic",
            "status": "active",
            "type": concept("http://terminology.hl7.org/CodeSystem/library-type", "logic-library"),
            "date": "2026-01-01",
            "publisher": "fhir-norse",
            "description": "NF21 scoring.",
            "useContext": use_context(),
            "jurisdiction": [concept("urn:iso:std:iso:3166", "NO")],
            "effectivePeriod": {"start": "2026-01-01"},
            "topic": [{"text": "Outcome monitoring"}],
            "relatedArtifact": [
                {"type": "depends-on", "resource": "http://example.org/Library/base|1.0"},
                {"type": "composed-of", "resource": "http://example.org/Library/part"},
                {"type": "derived-from", "resource": "Library/lib-0"},
                {"type": "predecessor", "resource": "http://example.org/Library/scoring|2.0.0"},
                {"type": "successor", "resource": "http://example.org/Library/scoring|3.0.0"},
                {"type": "citation", "citation": "Norse 2.1"},
            ],
            "content": [{"contentType": "text/cql", "data": "bGlicmFyeQ=="}],
        },
    ]


def audit_events() -> list[JsonDict]:
    system = Caller(client_id="ehr-backend", scopes=frozenset({"system/*.rs"}), token_id="jti-sys-1")
    practitioner = Caller(
        client_id="clinic-app",
        scopes=frozenset({"user/*.cruds"}),
        practitioner="dr7",
        user="Practitioner/dr7",
    )
    when = datetime(2026, 3, 4, 9, 15, 0, 250000, tzinfo=UTC)
    common: JsonDict = {"outcome": SUCCESS, "recorded": when, "source_address": "10.1.2.3"}
    # Plain dicts, as a stored AuditEvent is read back (the builders return a dict that also carries
    # its inputs).
    return [
        dict(event)
        for event in [
            build_audit_event(
                interaction="read",
                caller=system,
                resource_type="Observation",
                resource_id="o-1",
                patients=["p-1"],
                request_id="req-1",
                server_address="https://fhir.example.org/fhir",
                **common,
            ),
            build_audit_event(
                interaction="search-type",
                caller=practitioner,
                resource_type="Observation",
                query="Observation?patient=p-1&code=http://loinc.org|44261-6",
                patients=["p-1", "p-2"],
                **common,
            ),
            build_audit_event(
                interaction="create", caller=practitioner, resource_type="Flag", resource_id="f-1", **common
            ),
        ]
    ]


@cache
def corpus() -> tuple[tuple[str, JsonDict], ...]:
    """``(test id, resource)``: at least one resource of every supported type."""
    found = [
        *scored(),
        *questionnaire_files(),
        *responses(),
        *terminology(),
        *search_parameters(),
        *patients(),
        *people_and_teams(),
        *observations(),
        *workflow(),
        *audit_events(),
    ]
    named = []
    for i, resource in enumerate(found):
        named.append((f"{i:03d}-{resource['resourceType']}-{resource.get('id', '')}"[:60], resource))
    return tuple(named)


def test_the_corpus_covers_every_supported_type() -> None:
    assert {r["resourceType"] for _, r in corpus()} == set(SUPPORTED_TYPES)


# --------------------------------------------------------------------------------------------
# Rows: fast path against fhirpathpy


@pytest.fixture(scope="module")
def extractors() -> tuple[IndexExtractor, IndexExtractor]:
    fast = IndexExtractor(full_registry())
    slow = IndexExtractor(full_registry(), fast=False)
    fast.prepare()
    slow.prepare()
    return fast, slow


@pytest.mark.parametrize(("name", "resource"), corpus(), ids=[n for n, _ in corpus()])
def test_fast_rows_equal_fhirpathpy_rows(
    name: str, resource: JsonDict, extractors: tuple[IndexExtractor, IndexExtractor]
) -> None:
    fast, slow = extractors
    before = copy.deepcopy(resource)
    rows = fast.extract(resource)
    expected = slow.extract(resource)
    assert len(rows) == len(set(rows))
    assert set(rows) == set(expected), _difference(rows, expected)
    # Deterministic, and the resource is left as it was.
    assert fast.extract(resource) == rows
    assert resource == before
    assert rows, "every resource of the corpus has something to index"


def test_no_parameter_fails_on_the_corpus(extractors: tuple[IndexExtractor, IndexExtractor]) -> None:
    fast, slow = extractors
    for _, resource in corpus():
        fast.extract(resource)
        slow.extract(resource)
    assert fast.failed == slow.failed == []


def test_the_fast_path_decides_alone_on_the_corpus(extractors: tuple[IndexExtractor, IndexExtractor]) -> None:
    """No fast evaluator hands a resource of the corpus over to fhirpathpy."""
    fast, _ = extractors
    evaluators = _fast_evaluators()
    before = {id(e): e.fallbacks for e in evaluators}
    for _, resource in corpus():
        fast.extract(resource)
    assert [e for e in evaluators if e.fallbacks != before[id(e)]] == []


def _difference(rows: list[IndexRow], expected: list[IndexRow]) -> str:
    extra = sorted(map(repr, set(rows) - set(expected)))
    missing = sorted(map(repr, set(expected) - set(rows)))
    return f"fast only: {extra}\nfhirpathpy only: {missing}"


def _fast_evaluators() -> list[FastEvaluator]:
    found: dict[int, FastEvaluator] = {}
    for resource_type in SUPPORTED_TYPES:
        for expression in _expressions(resource_type):
            evaluator = compile_fast_expression(expression)
            if evaluator is not None:
                found[id(evaluator)] = evaluator
    return list(found.values())


# --------------------------------------------------------------------------------------------
# Unusual data: variations of the corpus (Hypothesis)


EXTENSION = {"extension": [{"url": "http://example.org/x", "valueString": "x"}]}
ODD_VALUES: tuple[Any, ...] = (7, 1.5, True, "text", [], {}, [1, "a"], {"value": "x"}, None)
_EDITS: tuple[tuple[str, int], ...] = (
    *(("drop", 0),) * 13,
    *(("extend", 0),) * 18,
    *(("extension only", 0),) * 10,
    *(("repeat", k) for k in range(26)),
    *(("odd value", i) for i in range(len(ODD_VALUES))),
)
#: What becomes of one element of a variation, one byte each (``picks`` from 256 fates): mostly kept;
#: dropped (5 %), given a primitive extension (7 %) or only that (4 %), an array's item repeated (10 %),
#: and in odd variations, replaced by a value of another JSON type (3.5 %). A fate that does not fit the
#: element (an extension on an object, say) keeps it.
FATES: tuple[tuple[str, int], ...] = (("keep", 0),) * (256 - len(_EDITS)) + _EDITS
#: The elements one variation may edit: a larger resource (the NF 2.1 Questionnaires have some 16,000)
#: has a window of them edited, as one byte each must fit Hypothesis's budget for one case.
WINDOW = 4000


class Variation:
    """A resource of the corpus with edits. Printed as the resource's name in the corpus and the edits,
    so that a shrunk counterexample can be read."""

    def __init__(self, name: str, resource: JsonDict, edits: list[str]) -> None:
        self.name = name
        self.resource = resource
        self.edits = edits

    def __repr__(self) -> str:
        return f"Variation({self.name!r}, edits=[" + "".join(f"\n    {e!r}," for e in self.edits) + "\n])"


def _elements(node: Any, path: str, out: list[tuple[str, JsonDict, str]]) -> list[tuple[str, JsonDict, str]]:
    """Every element under ``node`` in document order, as its path, the object that holds it and its key."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _elements(item, f"{path}[{i}]", out)
    elif isinstance(node, dict):
        for key, value in node.items():
            out.append((f"{path}.{key}", node, key))
            _elements(value, f"{path}.{key}", out)
    return out


def _edit(node: JsonDict, key: str, kind: str, k: int) -> str | None:
    """Give ``node[key]`` the fate ``(kind, k)`` of ``FATES``; what was done, or None if it does not fit."""
    value = node[key]
    primitive = isinstance(value, str | bool | int | float) and not key.startswith("_")
    strings = isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    if kind == "drop":
        del node[key]
    elif kind == "extend" and primitive:
        node["_" + key] = copy.deepcopy(EXTENSION)
    elif kind == "extend" and strings:
        node["_" + key] = [None] * (len(value) - 1) + [copy.deepcopy(EXTENSION)]
    elif kind == "extension only" and primitive:
        del node[key]
        node["_" + key] = {"id": "only-extension", **copy.deepcopy(EXTENSION)}
    elif kind == "repeat" and isinstance(value, list) and value:
        kind = f"repeat [{k % len(value)}] of"
        value.append(copy.deepcopy(value[k % len(value)]))
    elif kind == "odd value":
        node[key] = copy.deepcopy(ODD_VALUES[k])
        kind = f"odd value {node[key]!r} for"
    else:
        return None
    return kind


@st.composite
def variations(draw: st.DrawFn, resources: Sequence[tuple[str, JsonDict]], odd: bool) -> Variation:
    """A copy of one of ``resources`` with elements dropped, repeated, given primitive extensions (or
    only those), a contained resource, and with ``odd``, values of other JSON types (see ``FATES``).
    Shrinks towards fewer edits."""
    name, resource = draw(st.sampled_from(resources))
    result = copy.deepcopy(resource)
    elements = [e for e in _elements(result, "", []) if e[0] != ".resourceType"]
    start = draw(st.integers(0, max(0, len(elements) - WINDOW)))
    window = elements[start : start + WINDOW]
    fates = picks(draw, FATES, len(window))
    edits: list[str] = []
    # Innermost first (backwards through the document), so that a repeated item keeps its own edits.
    for (path, node, key), (kind, k) in reversed(list(zip(window, fates, strict=True))):
        if kind != "keep" and key in node and (odd or kind != "odd value"):
            done = _edit(node, key, kind, k)
            if done is not None:
                edits.insert(0, f"{done} {path}")
    if draw(st.booleans()):
        result["contained"] = [{"resourceType": "Patient", "id": "c1", "name": [{"family": "Inne"}]}]
        edits.append("contained Patient/c1")
    return Variation(name, result, edits)


def _extractor_pair() -> list[IndexExtractor]:
    """The fast path and fhirpathpy, each in an extractor that has seen no failure yet."""
    return [IndexExtractor(full_registry()), IndexExtractor(full_registry(), fast=False)]


@pytest.mark.parametrize("odd", [False, True], ids=["fhir-like", "odd-types"])
def test_fast_rows_equal_fhirpathpy_rows_on_variations(odd: bool) -> None:
    resources = [(n, r) for n, r in corpus() if len(json.dumps(r)) < 60_000]
    pair = _extractor_pair()  # compiles its plans once; replaced after a failure (see below)

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(variation=variations(resources, odd))
    def holds(variation: Variation) -> None:
        fast, slow = pair
        mutant = variation.resource
        rows, expected = fast.extract(mutant), slow.extract(mutant)
        # ``failed`` keeps what failed on any resource so far: a pair that has seen a failure is replaced,
        # so that what failed is what failed on this mutant, whatever ran before.
        failed_fast, failed_slow = fast.failed, slow.failed
        if failed_fast or failed_slow:
            pair[:] = _extractor_pair()
        assert set(rows) == set(expected), (json.dumps(mutant)[:2000], _difference(rows, expected))
        assert len(rows) == len(set(rows))
        # A parameter failing on odd data fails either way (and only then).
        assert failed_fast == failed_slow

    holds()


# --------------------------------------------------------------------------------------------
# Expressions: item for item, with their types


def _expressions(resource_type: str) -> list[str]:
    registry = full_registry()
    found: list[str] = []
    for definition in registry.indexed(resource_type):
        if definition.expression:
            found += split_union(rewrite_expression(definition.expression))
        found += [rewrite_expression(c.expression) for c in definition.components]
    return list(dict.fromkeys(found))


def _items(results: list[Any]) -> list[tuple[Any, ...]]:
    """Results as comparable tuples: a node's type path and data, or a System value."""
    out: list[tuple[Any, ...]] = []
    for item in results:
        if isinstance(item, ResourceNode | Node):
            out.append(("node", item.path, json.dumps(item.data, sort_keys=True, default=str)))
        else:
            out.append(("value", type(item).__name__, str(item)))
    return out


def _typed_items(pairs: Any) -> list[tuple[str, str]]:
    return [(name, json.dumps(data, sort_keys=True, default=str)) for name, data in pairs]


def _check_typed(fast: FastEvaluator, slow: Any, target: Any, reference: Any) -> int:
    """A typed reading, where there is one, gives the typed values of fhirpathpy's items."""
    typed = fast.typed(target)
    if typed is None:
        return 0
    assert _typed_items(typed) == _typed_items(_values(slow(reference))), (target, typed)
    return 1


def _outcome(evaluate: Any, target: Any) -> tuple[str, Any]:
    try:
        return "ok", _items(evaluate(target))
    except Exception as exc:
        return "error", type(exc).__name__


def _relative(expression: str) -> bool:
    return not expression.lstrip("(")[:1].isupper()


@cache
def _absolute_and_relative(resource_type: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    expressions = _expressions(resource_type)
    return tuple(e for e in expressions if not _relative(e)), tuple(e for e in expressions if _relative(e))


def _compare_expressions(resource_type: str, resource: JsonDict) -> tuple[int, int]:
    """Every expression of the type on ``resource``: the fast path gives fhirpathpy's items (or fails as
    it does), and a typed reading gives its typed values. Returns how many items lists and typed
    readings were compared."""
    TypeInfo.model = MODEL  # type: ignore[assignment]  # as the extractor sets it
    absolute, relative = _absolute_and_relative(resource_type)
    compared = typed = 0
    # Relative (component) expressions run on the nodes of every absolute expression.
    nodes: list[Any] = []
    for expression in absolute:
        fast = compile_fast_expression(expression)
        if fast is None:
            continue
        slow = compile_expression(expression)
        expected = _outcome(slow, resource)
        assert _outcome(fast, resource) == expected, (expression, json.dumps(resource)[:1500])
        compared += 1
        if expected[0] == "ok":
            typed += _check_typed(fast, slow, resource, resource)
            nodes += [n for n in slow(resource) if isinstance(n, ResourceNode) and isinstance(n.data, dict)]
    for expression in relative:
        fast = compile_fast_expression(expression)
        if fast is None:
            continue
        slow = compile_expression(expression)
        for node in nodes[:40]:
            expected = _outcome(slow, node)
            assert _outcome(fast, Node(node.path, node.data)) == expected, (
                expression,
                node.path,
                node.data,
            )
            assert _outcome(fast, node) == expected
            compared += 1
            if expected[0] == "ok":
                typed += _check_typed(fast, slow, Node(node.path, node.data), node)
    return compared, typed


@pytest.mark.parametrize("resource_type", SUPPORTED_TYPES)
def test_expressions_give_fhirpathpys_items(resource_type: str) -> None:
    compared = typed = 0
    for _, resource in corpus():
        if resource["resourceType"] == resource_type:
            counts = _compare_expressions(resource_type, resource)
            compared, typed = compared + counts[0], typed + counts[1]
    assert compared
    assert typed  # plain paths are read straight off the JSON


@pytest.mark.parametrize("resource_type", SUPPORTED_TYPES)
def test_expressions_give_fhirpathpys_items_on_variations(resource_type: str) -> None:
    resources = [(n, r) for n, r in corpus() if r["resourceType"] == resource_type]

    @settings(max_examples=20, deadline=None, derandomize=True)
    @given(variation=st.booleans().flatmap(lambda odd: variations(resources, odd)))
    def holds(variation: Variation) -> None:
        _compare_expressions(resource_type, variation.resource)

    holds()


# --------------------------------------------------------------------------------------------
# What runs on the fast path

# Parameters left to fhirpathpy: none, every R4 expression of the supported types has a shape the
# fast path compiles (fhirpathpy still decides, at run time, on data the fast path is unsure of).
SLOW_PARAMETERS: set[tuple[str, str]] = set()

# The parameters of the resources scoring writes and reads back: every one on the fast path.
SCORING_TYPES = ("Observation", "DiagnosticReport", "Flag", "Provenance", "Task", "QuestionnaireResponse")


def test_share_of_parameters_on_the_fast_path() -> None:
    extractor = IndexExtractor(full_registry())
    extractor.prepare()
    paths = extractor.fast_path
    # Every indexed parameter/type pair of the supported types compiles, but DocumentReference's
    # ``relationship`` (a composite with a reference component; see test_extract.py).
    assert len(paths) == 688
    slow = {pair for pair, fast in paths.items() if not fast}
    assert slow == SLOW_PARAMETERS
    assert len(paths) - len(slow) >= 0.8 * len(paths)
    for resource_type in SCORING_TYPES:
        on_type = [code for (t, code) in paths if t == resource_type]
        assert on_type
        assert [code for code in on_type if not paths[(resource_type, code)]] == []


@pytest.mark.parametrize("resource_type", SUPPORTED_TYPES)
def test_parameters_on_the_fast_path_by_type(resource_type: str) -> None:
    """The listing, type by type: every parameter of the type is compiled to the fast path."""
    extractor = IndexExtractor(full_registry())
    extractor.prepare([resource_type])
    codes = {code: fast for (t, code), fast in extractor.fast_path.items() if t == resource_type}
    slow = {(resource_type, code) for code, fast in codes.items() if not fast}
    assert slow == {pair for pair in SLOW_PARAMETERS if pair[0] == resource_type}
    unsupported = {code for t, code, _why in extractor.unsupported if t == resource_type}
    assert len(codes) == len(full_registry().indexed(resource_type)) - len(unsupported)


def test_fhirpathpy_only_when_asked() -> None:
    extractor = IndexExtractor(full_registry(), fast=False)
    extractor.prepare(["Observation"])
    assert not any(extractor.fast_path.values())


# --------------------------------------------------------------------------------------------
# The shapes, one by one (where fhirpathpy's own behaviour is easy to miss)


def task_extractor(*definitions: JsonDict) -> tuple[IndexExtractor, IndexExtractor]:
    full = [
        {
            "resourceType": "SearchParameter",
            "url": f"http://example.org/SearchParameter/{d['code']}",
            "base": ["Task"],
            **d,
        }
        for d in definitions
    ]
    registry = SearchParamRegistry(full, ["Task"])
    return IndexExtractor(registry), IndexExtractor(registry, fast=False)


def both(extractors: tuple[IndexExtractor, IndexExtractor], resource: JsonDict) -> set[IndexRow]:
    fast, slow = extractors
    rows = fast.extract(resource)
    assert set(rows) == set(slow.extract(resource))
    assert fast.failed == slow.failed
    return set(rows)


TASK: JsonDict = {
    "resourceType": "Task",
    "status": "requested",
    "intent": "order",
    "input": [
        {"type": {"text": "a"}, "valueQuantity": {"value": 1.50, "system": UCUM, "code": "mg"}},
        {"type": {"text": "b"}, "valueString": "two"},
        {"type": {"text": "c"}, "valueQuantity": {"value": 1.50, "system": UCUM, "code": "mg"}},
    ],
}


def test_expressions_of_every_shape_run_fast_and_agree() -> None:
    shapes = {
        "member": "Task.input.type.text",
        "choice": "Task.input.value.ofType(Quantity)",
        "system-type": "Task.input.value.as(String)",
        "union-in-a-branch": "(Task.input.value.ofType(Quantity) | Task.input.value.ofType(string))",
        "first": "Task.input.first().type",
        "where-equals": "Task.input.where(type.text = 'b').value",
        "where-not-equals": "Task.input.where(type.text != 'b').type",
        "extension": "Task.extension('http://example.org/e')",
        "where-url": "Task.extension.where(url = 'http://example.org/e').value",
        "has-extension": "Task.input.where(hasExtension('http://example.org/e')).type",
        "resolve-is": "Task.input.value.where(resolve() is Patient).reference",
        "exists-and": "Task.owner.exists() and Task.status != 'draft'",
    }
    definitions = [{"code": code, "type": "token", "expression": e} for code, e in shapes.items()]
    extractors = task_extractor(*definitions)
    task = copy.deepcopy(TASK)
    task["extension"] = [{"url": "http://example.org/e", "valueCode": "first"}]
    task["input"][1]["extension"] = [{"url": "http://example.org/e", "valueBoolean": True}]
    task["input"].append({"type": {"text": "d"}, "valueReference": {"reference": "Patient/p-1"}})
    task["owner"] = {"reference": "Practitioner/pr-1"}
    rows = both(extractors, task)
    assert {row.param for row in rows} >= set(shapes) - {"choice"}
    extractors[0].prepare(["Task"])
    assert all(extractors[0].fast_path.values())


def test_a_union_inside_a_branch_keeps_distinct_data_untyped() -> None:
    """fhirpathpy's ``|`` drops duplicate data and the types of what it keeps (the extractor then
    converts such values by their JSON shape)."""
    TypeInfo.model = MODEL  # type: ignore[assignment]
    expression = "(Task.input.value.ofType(Quantity) | Task.input.value.ofType(string))"
    fast = compile_fast_expression(expression)
    assert fast is not None
    items = _items(fast(TASK))
    assert items == _items(compile_expression(expression)(TASK))
    assert [(kind, path) for kind, path, _ in items] == [("node", None), ("node", None)]
    extractors = task_extractor({"code": "q", "type": "quantity", "expression": expression})
    assert {r.param for r in both(extractors, TASK)} == {"q"}


def test_primitive_extensions_and_where_on_a_repeated_element() -> None:
    extractors = task_extractor(
        {"code": "status", "type": "token", "expression": "Task.status"},
        {"code": "b", "type": "string", "expression": "Task.input.where(type.text = 'b').value"},
    )
    task = copy.deepcopy(TASK)
    task["_status"] = {"extension": [{"url": "urn:x", "valueString": "y"}]}
    # ``type.text`` gives two items (value and extension) on the second input: not equal to 'b'.
    task["input"][1]["type"]["_text"] = {"extension": [{"url": "urn:x", "valueString": "y"}]}
    rows = both(extractors, task)
    assert {r.param for r in rows} == {"status"}


def test_odd_data_fails_the_same_parameters() -> None:
    extractors = task_extractor(
        {"code": "ext", "type": "token", "expression": "Task.extension('http://example.org/e')"},
        {"code": "status", "type": "token", "expression": "Task.status"},
    )
    task = copy.deepcopy(TASK)
    task["extension"] = [{"valueString": "no url"}]  # fhirpathpy's extension() needs every url
    rows = both(extractors, task)
    assert {r.param for r in rows} == {"status"}
    assert extractors[0].failed == [("Task", "ext")]
