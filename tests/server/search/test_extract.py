"""Index extraction: what each R4 SearchParameter yields from realistic resources.

Rules under test: https://hl7.org/fhir/R4/search.html (token, string, date, number, quantity,
reference, uri, composite).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any

import pytest

from fhir_norse.server.search import extract as extract_module
from fhir_norse.server.search.extract import (
    IndexExtractor,
    extractor_for,
    first_element,
    parse_reference,
    rewrite_expression,
)
from fhir_norse.store.rows import (
    CompositeRow,
    DateRow,
    IndexRow,
    NumberRow,
    ReferenceRow,
    StringRow,
    TokenRow,
    UriRow,
)
from fhir_norse.store.search.params import SearchParamRegistry, full_registry

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
USAGE = "http://terminology.hl7.org/CodeSystem/usage-context-type"
SNOMED = "http://snomed.info/sct"
END_OF_DAY = (23, 59, 59, 999999)


@cache
def spec_extractor() -> IndexExtractor:
    """Every R4 parameter of the stored types, advertised or not: the extraction rules are tested on the
    whole specification (a site may enable any of them); what the server advertises is tested in
    tests/store/search/test_advertised.py."""
    return extractor_for(full_registry())


def rows_of(resource: dict[str, Any], param: str, extractor: IndexExtractor | None = None) -> set[IndexRow]:
    rows = (extractor or spec_extractor()).extract(resource)
    assert len(rows) == len(set(rows)), "rows are deduplicated"
    return {row for row in rows if row.param == param}


def params_of(resource: dict[str, Any]) -> set[str]:
    return {row.param for row in spec_extractor().extract(resource)}


# --------------------------------------------------------------------------------------------
# Resources


def phq9_observation() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "phq9-total",
        "meta": {"profile": ["http://example.org/StructureDefinition/rom-score"]},
        "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": "survey", "display": "Survey"}]}],
        "code": {
            "coding": [{"system": LOINC, "code": "44261-6", "display": "PHQ-9 total score"}],
            "text": "PHQ-9 Total",
        },
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "effectiveDateTime": "2024-05-03T10:15:00+02:00",
        "issued": "2024-05-03T08:20:00Z",
        "performer": [{"reference": "Patient/p1"}],
        "valueQuantity": {"value": 14, "unit": "score", "system": UCUM, "code": "{score}"},
        "derivedFrom": [{"reference": "QuestionnaireResponse/qr1"}],
    }


def blood_pressure() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "bp",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "subject": {"reference": "Group/g1"},
        "effectivePeriod": {"start": "2024-05-03T10:00:00Z", "end": "2024-05-03T10:05:00Z"},
        "component": [
            {
                "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                "valueQuantity": {"value": 120.5, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
            },
            {
                "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                "valueQuantity": {"value": 80, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
            },
        ],
    }


def severity_observation() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "severity",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "44261-6"}]},
        "subject": {"reference": "Patient/p1"},
        "valueCodeableConcept": {
            "coding": [{"system": SNOMED, "code": "6471000179103", "display": "Moderate"}],
            "text": "Moderate depression",
        },
        "component": [
            {
                "code": {"coding": [{"system": LOINC, "code": "44250-9"}]},
                "valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA6569-3"}]},
            }
        ],
    }


def patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [
            {
                "system": "urn:oid:2.16.578.1.12.4.1.4.1",
                "value": "01017012345",
                "type": {"text": "National identity number"},
            }
        ],
        "active": True,
        "name": [
            {
                "use": "official",
                "family": "Lefèvre",
                "given": ["Anne", "Marie"],
                "prefix": ["Dr."],
                "text": "Dr. Anne Marie Lefèvre",
            }
        ],
        "telecom": [
            {"system": "phone", "value": "+47 12345678", "use": "mobile"},
            {"system": "email", "value": "anne@example.org"},
        ],
        "gender": "female",
        "birthDate": "1970-03",
        "address": [
            {
                "use": "home",
                "line": ["Rue de l'Église 4"],
                "city": "Besançon",
                "postalCode": "25000",
                "country": "FR",
            }
        ],
        "generalPractitioner": [{"reference": "Practitioner/gp1"}],
        "managingOrganization": {"reference": "Organization/clinic"},
    }


def questionnaire_response() -> dict[str, Any]:
    return {
        "resourceType": "QuestionnaireResponse",
        "id": "qr1",
        "questionnaire": "http://example.org/fhir/Questionnaire/phq-9|1.0",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "author": {"reference": "Patient/p1"},
        "authored": "2024-05-03T10:14:59Z",
        "item": [{"linkId": "1", "answer": [{"valueCoding": {"system": LOINC, "code": "LA6569-3"}}]}],
    }


def questionnaire() -> dict[str, Any]:
    return {
        "resourceType": "Questionnaire",
        "id": "phq-9",
        "url": "http://example.org/fhir/Questionnaire/phq-9",
        "version": "1.0",
        "name": "PHQ9",
        "title": "Patient Health Questionnaire-9",
        "status": "active",
        "date": "2024-01-15",
        "useContext": [
            {
                "code": {"system": USAGE, "code": "age"},
                "valueRange": {"low": {"value": 18, "unit": "a", "system": UCUM, "code": "a"}},
            },
            {
                "code": {"system": USAGE, "code": "focus"},
                "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "35489007"}]},
            },
        ],
        "item": [
            {
                "linkId": "1",
                "code": [{"system": LOINC, "code": "44250-9", "display": "Little interest"}],
                "type": "choice",
            }
        ],
    }


def alert_flag() -> dict[str, Any]:
    return {
        "resourceType": "Flag",
        "id": "f1",
        "status": "active",
        "code": {"coding": [{"system": "http://example.org/alerts", "code": "suicide-risk"}]},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2024-05-03"},
        "author": {"reference": "Device/scoring-engine"},
        "encounter": {"reference": "Encounter/e1"},
    }


def review_task() -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "id": "t1",
        "status": "requested",
        "intent": "order",
        "priority": "urgent",
        "code": {"text": "Review alert"},
        "for": {"reference": "Patient/p1/_history/4"},
        "owner": {"reference": "https://ehr.example.org/fhir/Practitioner/pr1"},
        "requester": {"reference": "#me"},
        "basedOn": [{"identifier": {"system": "http://example.org/orders", "value": "o-1"}}],
        "focus": {
            "reference": "urn:uuid:8a7e0b6a-3f34-4ad4-9f0c-0b3b5c5b0e43",
            "type": "QuestionnaireResponse",
        },
        "authoredOn": "2024-05-03T10:15:00Z",
        "lastModified": "2024-05-03T10:16:00Z",
        "executionPeriod": {"end": "2024-05-10"},
        "businessStatus": {"coding": [{"system": "http://example.org/task-status", "code": "waiting"}]},
        "groupIdentifier": {"system": "http://example.org/groups", "value": "g-1", "type": {"text": "Batch"}},
    }


def encounter() -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "AMB",
            "display": "ambulatory",
        },
        "subject": {"reference": "Patient/p1"},
        "participant": [
            {"individual": {"reference": "Practitioner/pr1"}},
            {"individual": {"reference": "PractitionerRole/role1"}},
        ],
        "period": {"start": "2024-05-03T10:00:00Z", "end": "2024-05-03T10:50:00Z"},
        "length": {"value": 50, "unit": "min", "system": UCUM, "code": "min"},
    }


def text_observation() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "72133-2"}]},
        "valueString": "Feeling  Much BETTER",
    }


def date_observation() -> dict[str, Any]:
    obs = text_observation()
    del obs["valueString"]
    return {**obs, "valueDateTime": "2024-02-29"}


def deceased_patient() -> dict[str, Any]:
    return {**patient(), "deceasedDateTime": "2021-06-30T23:30:00-01:00"}


# --------------------------------------------------------------------------------------------
# Observation


def test_observation_tokens_with_folded_text() -> None:
    obs = phq9_observation()
    assert rows_of(obs, "code") == {TokenRow("code", LOINC, "44261-6", "phq-9 total")}
    # Without CodeableConcept.text the Coding.display is the text.
    assert rows_of(obs, "category") == {TokenRow("category", CATEGORY, "survey", "survey")}
    assert rows_of(obs, "status") == {TokenRow("status", None, "final")}
    assert rows_of(obs, "combo-code") == {TokenRow("combo-code", LOINC, "44261-6", "phq-9 total")}


def test_observation_subject_and_patient_references() -> None:
    obs = phq9_observation()
    assert rows_of(obs, "subject") == {ReferenceRow("subject", "Patient", "p1")}
    assert rows_of(obs, "patient") == {ReferenceRow("patient", "Patient", "p1")}
    assert rows_of(obs, "derived-from") == {ReferenceRow("derived-from", "QuestionnaireResponse", "qr1")}
    assert rows_of(obs, "performer") == {ReferenceRow("performer", "Patient", "p1")}


def test_patient_parameter_keeps_only_references_to_patients() -> None:
    bp = blood_pressure()
    assert rows_of(bp, "subject") == {ReferenceRow("subject", "Group", "g1")}
    assert rows_of(bp, "patient") == set()


def test_observation_effective_date_time_is_a_utc_range() -> None:
    assert rows_of(phq9_observation(), "date") == {
        DateRow("date", datetime(2024, 5, 3, 8, 15), datetime(2024, 5, 3, 8, 15, 0, 999999))
    }


def test_observation_effective_period_spans_start_to_end() -> None:
    assert rows_of(blood_pressure(), "date") == {
        DateRow("date", datetime(2024, 5, 3, 10, 0), datetime(2024, 5, 3, 10, 5, 0, 999999))
    }


def test_observation_value_quantity_with_implicit_range() -> None:
    obs = phq9_observation()
    assert rows_of(obs, "value-quantity") == {
        NumberRow("value-quantity", Decimal(14), Decimal("13.5"), Decimal("14.5"), UCUM, "{score}", "score")
    }
    assert rows_of(obs, "combo-value-quantity") == {
        NumberRow(
            "combo-value-quantity", Decimal(14), Decimal("13.5"), Decimal("14.5"), UCUM, "{score}", "score"
        )
    }
    assert rows_of(obs, "value-concept") == set()
    assert rows_of(obs, "value-date") == set()


def test_observation_code_value_quantity_composite() -> None:
    expected = CompositeRow(
        "code-value-quantity",
        LOINC,
        "44261-6",
        c2_system=UCUM,
        c2_code="{score}",
        c2_low=Decimal("13.5"),
        c2_high=Decimal("14.5"),
    )
    assert rows_of(phq9_observation(), "code-value-quantity") == {expected}
    assert rows_of(phq9_observation(), "combo-code-value-quantity") == {
        replace(expected, param="combo-code-value-quantity")
    }


def test_observation_components() -> None:
    bp = blood_pressure()
    assert rows_of(bp, "component-code") == {
        TokenRow("component-code", LOINC, "8480-6"),
        TokenRow("component-code", LOINC, "8462-4"),
    }
    assert rows_of(bp, "combo-code") == {
        TokenRow("combo-code", LOINC, "85354-9"),
        TokenRow("combo-code", LOINC, "8480-6"),
        TokenRow("combo-code", LOINC, "8462-4"),
    }
    assert rows_of(bp, "component-value-quantity") == {
        NumberRow(
            "component-value-quantity",
            Decimal("120.5"),
            Decimal("120.45"),
            Decimal("120.55"),
            UCUM,
            "mm[Hg]",
            "mmHg",
        ),
        NumberRow(
            "component-value-quantity", Decimal(80), Decimal("79.5"), Decimal("80.5"), UCUM, "mm[Hg]", "mmHg"
        ),
    }
    systolic = CompositeRow(
        "component-code-value-quantity",
        LOINC,
        "8480-6",
        c2_system=UCUM,
        c2_code="mm[Hg]",
        c2_low=Decimal("120.45"),
        c2_high=Decimal("120.55"),
    )
    diastolic = CompositeRow(
        "component-code-value-quantity",
        LOINC,
        "8462-4",
        c2_system=UCUM,
        c2_code="mm[Hg]",
        c2_low=Decimal("79.5"),
        c2_high=Decimal("80.5"),
    )
    # Each code pairs only with the value of its own component.
    assert rows_of(bp, "component-code-value-quantity") == {systolic, diastolic}
    combo = {
        CompositeRow(
            "combo-code-value-quantity", r.c1_system, r.c1_code, r.c2_system, r.c2_code, r.c2_low, r.c2_high
        )
        for r in (systolic, diastolic)
    }
    assert rows_of(bp, "combo-code-value-quantity") == combo
    # No value at the top level: nothing for the top-level composites.
    assert rows_of(bp, "code-value-quantity") == set()


def test_observation_value_concept() -> None:
    obs = severity_observation()
    assert rows_of(obs, "value-concept") == {
        TokenRow("value-concept", SNOMED, "6471000179103", "moderate depression")
    }
    assert rows_of(obs, "combo-value-concept") == {
        TokenRow("combo-value-concept", SNOMED, "6471000179103", "moderate depression"),
        TokenRow("combo-value-concept", LOINC, "LA6569-3"),
    }
    assert rows_of(obs, "component-value-concept") == {TokenRow("component-value-concept", LOINC, "LA6569-3")}
    assert rows_of(obs, "code-value-concept") == {
        CompositeRow("code-value-concept", LOINC, "44261-6", c2_system=SNOMED, c2_code="6471000179103")
    }
    assert rows_of(obs, "component-code-value-concept") == {
        CompositeRow("component-code-value-concept", LOINC, "44250-9", c2_system=LOINC, c2_code="LA6569-3")
    }
    # ``(Observation.value as CodeableConcept).text`` is part of value-string.
    assert rows_of(obs, "value-string") == {
        StringRow("value-string", "moderate depression", "Moderate depression")
    }


def test_observation_value_string_and_date_composites() -> None:
    text_obs = text_observation()
    assert rows_of(text_obs, "value-string") == {
        StringRow("value-string", "feeling much better", "Feeling  Much BETTER")
    }
    assert rows_of(text_obs, "code-value-string") == {
        CompositeRow("code-value-string", LOINC, "72133-2", c2_string="feeling much better")
    }
    date_obs = date_observation()
    day = (datetime(2024, 2, 29), datetime(2024, 2, 29, *END_OF_DAY))
    assert rows_of(date_obs, "value-date") == {DateRow("value-date", *day)}
    assert rows_of(date_obs, "code-value-date") == {
        CompositeRow("code-value-date", LOINC, "72133-2", c2_date_low=day[0], c2_date_high=day[1])
    }


def test_observation_meta_and_identifier() -> None:
    obs = {
        **phq9_observation(),
        "meta": {
            "profile": ["http://example.org/StructureDefinition/rom-score"],
            "tag": [{"system": "http://example.org/tags", "code": "rom"}],
            "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
        },
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": "urn:uuid:6c1e"}],
    }
    assert rows_of(obs, "_profile") == {
        UriRow("_profile", "http://example.org/StructureDefinition/rom-score")
    }
    assert rows_of(obs, "_tag") == {TokenRow("_tag", "http://example.org/tags", "rom")}
    assert rows_of(obs, "_security") == {
        TokenRow("_security", "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "R")
    }
    assert rows_of(obs, "identifier") == {TokenRow("identifier", "urn:ietf:rfc:3986", "urn:uuid:6c1e")}


def test_identical_values_give_one_row() -> None:
    obs = phq9_observation()
    obs["category"] = [
        {"coding": [{"system": CATEGORY, "code": "survey"}]},
        {"coding": [{"system": CATEGORY, "code": "survey"}]},
    ]
    assert spec_extractor().extract(obs).count(TokenRow("category", CATEGORY, "survey")) == 1


def test_extension_parameter_uses_the_extension_value() -> None:
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "48018-6"}]},
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/observation-geneticsGene",
                "valueCodeableConcept": {
                    "coding": [{"system": "http://www.genenames.org", "code": "HGNC:1100"}]
                },
            },
            {
                "url": "http://hl7.org/fhir/StructureDefinition/observation-geneticsDnaVariant",
                "valueString": "NM_000492.3:c.1521_1523delCTT",
            },
        ],
    }
    assert rows_of(obs, "gene-identifier") == {
        TokenRow("gene-identifier", "http://www.genenames.org", "HGNC:1100")
    }
    assert rows_of(obs, "dna-variant") == {
        StringRow("dna-variant", "nm_000492.3:c.1521_1523delctt", "NM_000492.3:c.1521_1523delCTT")
    }


# --------------------------------------------------------------------------------------------
# Patient


def test_patient_name_parts_are_separate_strings() -> None:
    pat = patient()
    assert rows_of(pat, "name") == {
        StringRow("name", "lefevre", "Lefèvre"),
        StringRow("name", "anne", "Anne"),
        StringRow("name", "marie", "Marie"),
        StringRow("name", "dr.", "Dr."),
        StringRow("name", "dr. anne marie lefevre", "Dr. Anne Marie Lefèvre"),
    }
    assert rows_of(pat, "family") == {StringRow("family", "lefevre", "Lefèvre")}
    assert rows_of(pat, "given") == {StringRow("given", "anne", "Anne"), StringRow("given", "marie", "Marie")}


def test_patient_partial_birthdate_covers_the_month() -> None:
    assert rows_of(patient(), "birthdate") == {
        DateRow("birthdate", datetime(1970, 3, 1), datetime(1970, 3, 31, *END_OF_DAY))
    }


def test_patient_tokens() -> None:
    pat = patient()
    assert rows_of(pat, "identifier") == {
        TokenRow("identifier", "urn:oid:2.16.578.1.12.4.1.4.1", "01017012345", "national identity number")
    }
    assert rows_of(pat, "gender") == {TokenRow("gender", None, "female")}
    assert rows_of(pat, "active") == {TokenRow("active", None, "true")}
    # ``Patient.deceased.exists() and ...`` is false for a living patient, and that is indexed.
    assert rows_of(pat, "deceased") == {TokenRow("deceased", None, "false")}
    assert rows_of(pat, "address-use") == {TokenRow("address-use", None, "home")}


def test_patient_telecom_tokens_use_the_value_without_system() -> None:
    pat = patient()
    assert rows_of(pat, "phone") == {TokenRow("phone", None, "+47 12345678")}
    assert rows_of(pat, "email") == {TokenRow("email", None, "anne@example.org")}
    assert rows_of(pat, "telecom") == {
        TokenRow("telecom", None, "+47 12345678"),
        TokenRow("telecom", None, "anne@example.org"),
    }


def test_patient_address_with_accents() -> None:
    pat = patient()
    assert rows_of(pat, "address-city") == {StringRow("address-city", "besancon", "Besançon")}
    assert rows_of(pat, "address") == {
        StringRow("address", "rue de l'eglise 4", "Rue de l'Église 4"),
        StringRow("address", "besancon", "Besançon"),
        StringRow("address", "25000", "25000"),
        StringRow("address", "fr", "FR"),
    }
    assert rows_of(pat, "address-postalcode") == {StringRow("address-postalcode", "25000", "25000")}


def test_patient_references_and_deceased_date() -> None:
    pat = deceased_patient()
    assert rows_of(pat, "general-practitioner") == {
        ReferenceRow("general-practitioner", "Practitioner", "gp1")
    }
    assert rows_of(pat, "organization") == {ReferenceRow("organization", "Organization", "clinic")}
    assert rows_of(pat, "deceased") == {TokenRow("deceased", None, "true")}
    assert rows_of(pat, "death-date") == {
        DateRow("death-date", datetime(2021, 7, 1, 0, 30), datetime(2021, 7, 1, 0, 30, 0, 999999))
    }


def test_patient_extension_string_parameter() -> None:
    pat = {
        **patient(),
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-extensions-Patient-mothersMaidenName",
                "valueString": "Østby",
            }
        ],
    }
    assert rows_of(pat, "mothersMaidenName") == {StringRow("mothersMaidenName", "ostby", "Østby")}


# --------------------------------------------------------------------------------------------
# Questionnaire and QuestionnaireResponse


def test_questionnaire_response() -> None:
    qr = questionnaire_response()
    assert rows_of(qr, "questionnaire") == {
        ReferenceRow(
            "questionnaire",
            "Questionnaire",
            "phq-9",
            url="http://example.org/fhir/Questionnaire/phq-9",
            canonical_version="1.0",
        )
    }
    assert rows_of(qr, "subject") == {ReferenceRow("subject", "Patient", "p1")}
    assert rows_of(qr, "patient") == {ReferenceRow("patient", "Patient", "p1")}
    assert rows_of(qr, "author") == {ReferenceRow("author", "Patient", "p1")}
    assert rows_of(qr, "authored") == {
        DateRow("authored", datetime(2024, 5, 3, 10, 14, 59), datetime(2024, 5, 3, 10, 14, 59, 999999))
    }
    assert rows_of(qr, "status") == {TokenRow("status", None, "completed")}


def test_questionnaire_response_item_subject_uses_has_extension() -> None:
    qr = questionnaire_response()
    qr["item"].append(
        {
            "linkId": "about",
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/questionnaireresponse-isSubject",
                    "valueBoolean": True,
                }
            ],
            "answer": [{"valueReference": {"reference": "RelatedPerson/mother"}}],
        }
    )
    assert rows_of(qr, "item-subject") == {ReferenceRow("item-subject", "RelatedPerson", "mother")}


def test_questionnaire() -> None:
    q = questionnaire()
    assert rows_of(q, "url") == {UriRow("url", "http://example.org/fhir/Questionnaire/phq-9")}
    assert rows_of(q, "version") == {TokenRow("version", None, "1.0")}
    assert rows_of(q, "name") == {StringRow("name", "phq9", "PHQ9")}
    assert rows_of(q, "title") == {
        StringRow("title", "patient health questionnaire-9", "Patient Health Questionnaire-9")
    }
    assert rows_of(q, "code") == {TokenRow("code", LOINC, "44250-9", "little interest")}
    assert rows_of(q, "status") == {TokenRow("status", None, "active")}
    assert rows_of(q, "date") == {DateRow("date", datetime(2024, 1, 15), datetime(2024, 1, 15, *END_OF_DAY))}


def test_questionnaire_use_context_range_and_composites() -> None:
    q = questionnaire()
    # A Range open above: the value is its low end and the high bound is unbounded.
    assert rows_of(q, "context-quantity") == {
        NumberRow("context-quantity", Decimal(18), Decimal(18), Decimal("Infinity"), UCUM, "a", "a")
    }
    assert rows_of(q, "context") == {TokenRow("context", SNOMED, "35489007")}
    assert rows_of(q, "context-type") == {
        TokenRow("context-type", USAGE, "age"),
        TokenRow("context-type", USAGE, "focus"),
    }
    assert rows_of(q, "context-type-quantity") == {
        CompositeRow(
            "context-type-quantity",
            USAGE,
            "age",
            c2_system=UCUM,
            c2_code="a",
            c2_low=Decimal(18),
            c2_high=Decimal("Infinity"),
        )
    }
    assert rows_of(q, "context-type-value") == {
        CompositeRow("context-type-value", USAGE, "focus", c2_system=SNOMED, c2_code="35489007")
    }


# --------------------------------------------------------------------------------------------
# Flag, Task, Encounter


def test_flag() -> None:
    flag = alert_flag()
    assert rows_of(flag, "patient") == {ReferenceRow("patient", "Patient", "p1")}
    assert rows_of(flag, "subject") == {ReferenceRow("subject", "Patient", "p1")}
    assert rows_of(flag, "author") == {ReferenceRow("author", "Device", "scoring-engine")}
    # A Period without end is open above.
    assert rows_of(flag, "date") == {DateRow("date", datetime(2024, 5, 3), None)}
    assert rows_of(flag, "encounter") == {ReferenceRow("encounter", "Encounter", "e1")}


def test_task_reference_forms() -> None:
    task = review_task()
    assert rows_of(task, "subject") == {ReferenceRow("subject", "Patient", "p1", "4")}
    assert rows_of(task, "patient") == {ReferenceRow("patient", "Patient", "p1", "4")}
    assert rows_of(task, "owner") == {
        ReferenceRow("owner", "Practitioner", "pr1", url="https://ehr.example.org/fhir/Practitioner/pr1")
    }
    # Contained and identifier-only references are not indexed.
    assert rows_of(task, "requester") == set()
    assert rows_of(task, "based-on") == set()
    assert rows_of(task, "focus") == {
        ReferenceRow(
            "focus", "QuestionnaireResponse", None, url="urn:uuid:8a7e0b6a-3f34-4ad4-9f0c-0b3b5c5b0e43"
        )
    }
    # A CodeableConcept with text only gives a text-only token.
    assert rows_of(task, "code") == {TokenRow("code", None, None, "review alert")}
    assert rows_of(task, "period") == {DateRow("period", None, datetime(2024, 5, 10, *END_OF_DAY))}
    assert rows_of(task, "modified") == {
        DateRow("modified", datetime(2024, 5, 3, 10, 16), datetime(2024, 5, 3, 10, 16, 0, 999999))
    }
    assert rows_of(task, "group-identifier") == {
        TokenRow("group-identifier", "http://example.org/groups", "g-1", "batch")
    }
    assert rows_of(task, "business-status") == {
        TokenRow("business-status", "http://example.org/task-status", "waiting")
    }
    assert rows_of(task, "intent") == {TokenRow("intent", None, "order")}


def test_encounter() -> None:
    enc = encounter()
    assert rows_of(enc, "date") == {
        DateRow("date", datetime(2024, 5, 3, 10, 0), datetime(2024, 5, 3, 10, 50, 0, 999999))
    }
    assert rows_of(enc, "class") == {
        TokenRow("class", "http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB", "ambulatory")
    }
    assert rows_of(enc, "participant") == {
        ReferenceRow("participant", "Practitioner", "pr1"),
        ReferenceRow("participant", "PractitionerRole", "role1"),
    }
    assert rows_of(enc, "practitioner") == {ReferenceRow("practitioner", "Practitioner", "pr1")}
    # Duration is a Quantity.
    assert rows_of(enc, "length") == {
        NumberRow("length", Decimal(50), Decimal("49.5"), Decimal("50.5"), UCUM, "min", "min")
    }


# --------------------------------------------------------------------------------------------
# Data types no R4 parameter of our types reaches: through a registry of our own


def custom_extractor(*definitions: dict[str, Any]) -> IndexExtractor:
    full = [
        {
            "resourceType": "SearchParameter",
            "url": f"http://example.org/SearchParameter/{d['code']}",
            "base": ["Task"],
            **d,
        }
        for d in definitions
    ]
    return IndexExtractor(SearchParamRegistry(full, ["Task"]))


def task_with_inputs(*values: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "input": [{"type": {"text": "x"}, **value} for value in values],
    }


def test_money_range_and_timing() -> None:
    extractor = custom_extractor(
        {"code": "price", "type": "quantity", "expression": "Task.input.value.ofType(Money)"},
        {"code": "band", "type": "quantity", "expression": "Task.input.value as Range"},
        {"code": "when", "type": "date", "expression": "Task.input.value.ofType(Timing)"},
        {"code": "count", "type": "number", "expression": "Task.input.value.ofType(integer)"},
    )
    task = task_with_inputs(
        {"valueMoney": {"value": 125.50, "currency": "NOK"}},
        {
            "valueRange": {
                "low": {"value": 5, "system": UCUM, "code": "mg"},
                "high": {"value": 10, "system": UCUM, "code": "mg"},
            }
        },
        {"valueRange": {"high": {"value": 3, "unit": "times"}}},
        {
            "valueTiming": {
                "event": ["2024-05-03T10:00:00Z", "2024-05-01"],
                "repeat": {"boundsPeriod": {"start": "2024-04-30", "end": "2024-05-02"}},
            }
        },
        {"valueInteger": 7},
    )
    assert rows_of(task, "price", extractor) == {
        NumberRow(
            "price", Decimal("125.5"), Decimal("125.45"), Decimal("125.55"), "urn:iso:std:iso:4217", "NOK"
        )
    }
    assert rows_of(task, "band", extractor) == {
        NumberRow("band", Decimal(5), Decimal(5), Decimal(10), UCUM, "mg"),
        NumberRow("band", Decimal(3), Decimal("-Infinity"), Decimal(3), None, None, "times"),
    }
    # A Timing counts by its outer limits: events and bounds together.
    assert rows_of(task, "when", extractor) == {
        DateRow("when", datetime(2024, 4, 30), datetime(2024, 5, 3, 10, 0, 0, 999999))
    }
    assert rows_of(task, "count", extractor) == {
        NumberRow("count", Decimal(7), Decimal("6.5"), Decimal("7.5"))
    }


def test_parameters_that_cannot_compile_are_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    extractor = custom_extractor(
        {"code": "broken", "type": "token", "expression": "Task.status.where("},
        {"code": "unknown-function", "type": "token", "expression": "Task.status.memberOf('http://x')"},
        {"code": "status", "type": "token", "expression": "Task.status"},
    )
    with caplog.at_level(logging.DEBUG, logger="fhir_norse.server.search.extract"):
        rows = extractor.extract(task_with_inputs())
    assert rows == [TokenRow("status", None, "requested")]
    reported = {(t, c): reason for t, c, reason in extractor.unsupported}
    assert set(reported) == {("Task", "broken"), ("Task", "unknown-function")}
    assert reported[("Task", "broken")].startswith("cannot parse")
    assert reported[("Task", "unknown-function")] == "function memberOf() is not implemented by fhirpathpy"
    assert sum("not indexed" in r.message for r in caplog.records) == 2
    # Reported once: a second write neither compiles again nor logs again.
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="fhir_norse.server.search.extract"):
        extractor.extract(task_with_inputs())
    assert caplog.records == []
    assert len(extractor.unsupported) == 2


def test_a_parameter_failing_on_the_data_does_not_fail_the_write(caplog: pytest.LogCaptureFixture) -> None:
    extractor = custom_extractor(
        # ``is`` raises on more than one input.
        {"code": "only-input", "type": "token", "expression": "Task.input.value is string"},
        {"code": "status", "type": "token", "expression": "Task.status"},
    )
    task = task_with_inputs({"valueString": "a"}, {"valueString": "b"})
    with caplog.at_level(logging.WARNING, logger="fhir_norse.server.search.extract"):
        assert extractor.extract(task) == [TokenRow("status", None, "requested")]
        extractor.extract(task)
    assert len([r for r in caplog.records if "only-input" in r.message]) == 1


def test_composites_need_two_indexable_components() -> None:
    extractor = custom_extractor(
        {"code": "a", "type": "token", "expression": "Task.code"},
        {"code": "b", "type": "reference", "expression": "Task.owner"},
        {
            "code": "a-b",
            "type": "composite",
            "expression": "Task",
            "component": [
                {"definition": "http://example.org/SearchParameter/a", "expression": "code"},
                {"definition": "http://example.org/SearchParameter/b", "expression": "owner"},
            ],
        },
        {
            "code": "a-missing",
            "type": "composite",
            "expression": "Task",
            "component": [
                {"definition": "http://example.org/SearchParameter/a", "expression": "code"},
                {"definition": "http://example.org/SearchParameter/none", "expression": "x"},
            ],
        },
    )
    extractor.prepare(["Task"])
    assert sorted(extractor.unsupported) == [
        ("Task", "a-b", "component of type reference cannot be indexed"),
        ("Task", "a-missing", "component http://example.org/SearchParameter/none is not defined"),
    ]


# --------------------------------------------------------------------------------------------
# The whole R4 set, and the building blocks


def test_every_r4_parameter_of_our_types_compiles() -> None:
    """Every R4 parameter of the stored types compiles, but one: DocumentReference's ``relationship``
    pairs a code with a *reference*, and the composite index has no reference column. It is not
    advertised (the CapabilityStatement does not list it), so nobody can search by it and be misled."""
    extractor = IndexExtractor(spec_extractor().registry)
    extractor.prepare()
    assert [(t, p) for t, p, _why in extractor.unsupported] == [("DocumentReference", "relationship")]


SAMPLES = [
    phq9_observation,
    blood_pressure,
    severity_observation,
    text_observation,
    date_observation,
    patient,
    deceased_patient,
    questionnaire_response,
    questionnaire,
    alert_flag,
    review_task,
    encounter,
]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.__name__)
def test_skipping_absent_elements_never_changes_the_rows(
    sample: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    resource = sample()
    fast = IndexExtractor(spec_extractor().registry).extract(resource)
    monkeypatch.setattr(extract_module, "_present", lambda requires, data: True)
    slow = IndexExtractor(spec_extractor().registry).extract(resource)
    assert set(fast) == set(slow)
    assert len(fast) == len(slow)


def test_unrelated_types_and_resources_without_type() -> None:
    assert spec_extractor().extract({"resourceType": "Basic", "id": "b"}) == []
    assert spec_extractor().extract({"id": "b"}) == []
    assert params_of({"resourceType": "Binary", "contentType": "text/plain"}) == set()


@pytest.mark.parametrize(
    ("expression", "rewritten"),
    [
        ("(Observation.value as Quantity)", "(Observation.value.ofType(Quantity))"),
        ("Observation.component.value.as(Quantity)", "Observation.component.value.ofType(Quantity)"),
        ("value.as(DateTime) | value.as(Period)", "value.ofType(dateTime) | value.ofType(Period)"),
        ("(Patient.deceased as dateTime)", "(Patient.deceased.ofType(dateTime))"),
        ("Observation.extension('http://x/ as y')", "Observation.extension('http://x/ as y')"),
        (
            "Observation.subject.where(resolve() is Patient)",
            "Observation.subject.where(resolve() is Patient)",
        ),
    ],
)
def test_rewrite_expression(expression: str, rewritten: str) -> None:
    assert rewrite_expression(expression) == rewritten


@pytest.mark.parametrize(
    ("branch", "step"),
    [
        ("code.coding", ("code", None)),
        ("value.ofType(Quantity)", ("value", "Quantity")),
        ("(value.ofType(CodeableConcept)).text", ("value", "CodeableConcept")),
        ("extension('http://x')", ("extension", None)),
        ("telecom.where(system='email')", ("telecom", None)),
        ("deceased.exists() and deceased != false", None),
        ("children().code", None),
    ],
)
def test_first_element(branch: str, step: tuple[str, str | None] | None) -> None:
    assert first_element(branch) == step


@pytest.mark.parametrize(
    ("reference", "canonical", "row"),
    [
        ("Patient/1", False, ReferenceRow("", "Patient", "1")),
        ("Patient/1/_history/2", False, ReferenceRow("", "Patient", "1", "2")),
        (
            "http://h/fhir/Patient/1/_history/2",
            False,
            ReferenceRow("", "Patient", "1", "2", url="http://h/fhir/Patient/1"),
        ),
        ("#contained", False, None),
        ("urn:oid:1.2.3", False, ReferenceRow("", None, None, url="urn:oid:1.2.3")),
        (
            "http://x/Questionnaire/q|1.0",
            True,
            ReferenceRow("", "Questionnaire", "q", url="http://x/Questionnaire/q", canonical_version="1.0"),
        ),
        ("http://x/q-without-type", True, ReferenceRow("", None, None, url="http://x/q-without-type")),
    ],
)
def test_parse_reference(reference: str, canonical: bool, row: ReferenceRow | None) -> None:
    assert parse_reference(reference, canonical) == row
