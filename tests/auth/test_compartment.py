"""The R4 Patient compartment: https://hl7.org/fhir/R4/compartmentdefinition-patient.html"""

from __future__ import annotations

import json
from typing import Any

import pytest

from fhir_norse.auth.compartment import (
    DEFINITION,
    in_compartment_types,
    patient_compartment_params,
    patients_referenced,
    resource_in_patient_compartment,
)
from fhir_norse.server.search.extract import default_extractor
from fhir_norse.store.resource_types import SUPPORTED_TYPES
from fhir_norse.store.rows import IndexRow, ReferenceRow, TokenRow
from fhir_norse.store.search.params import default_registry


def rows(resource: dict[str, Any]) -> list[IndexRow]:
    return default_extractor().extract(resource)


OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "obs-1",
    "status": "final",
    "category": [
        {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}
            ]
        }
    ],
    "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
    "subject": {"reference": "Patient/1"},
    "performer": [{"reference": "Practitioner/2"}],
    "effectiveDateTime": "2024-03-01T10:00:00Z",
    "valueInteger": 12,
}

QUESTIONNAIRE_RESPONSE: dict[str, Any] = {
    "resourceType": "QuestionnaireResponse",
    "id": "qr-1",
    "questionnaire": "http://example.org/Questionnaire/phq-9|1.0",
    "status": "completed",
    "author": {"reference": "Patient/1"},
    "authored": "2024-03-01T10:00:00Z",
    "item": [{"linkId": "1", "answer": [{"valueInteger": 2}]}],
}

CARE_TEAM: dict[str, Any] = {
    "resourceType": "CareTeam",
    "id": "ct-1",
    "status": "active",
    "subject": {"reference": "Patient/1"},
    "participant": [
        {"member": {"reference": "Practitioner/2"}},
        {"member": {"reference": "Patient/3"}},
    ],
}

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "1",
    "name": [{"family": "Nordmann", "given": ["Ola"]}],
    "birthDate": "1980-05-17",
}

LINKING_PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "9",
    "link": [{"other": {"reference": "Patient/1"}, "type": "replaced-by"}],
}

QUESTIONNAIRE: dict[str, Any] = {
    "resourceType": "Questionnaire",
    "id": "phq-9",
    "url": "http://example.org/Questionnaire/phq-9",
    "status": "active",
    "item": [{"linkId": "1", "text": "Little interest or pleasure in doing things", "type": "integer"}],
}

AUDIT_EVENT: dict[str, Any] = {
    "resourceType": "AuditEvent",
    "id": "ae-1",
    "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
    "action": "R",
    "recorded": "2024-03-01T10:00:00Z",
    "outcome": "0",
    "agent": [{"who": {"reference": "Patient/5"}, "requestor": True}],
    "source": {"observer": {"reference": "Device/server"}},
    "entity": [{"what": {"reference": "Patient/1"}}, {"what": {"reference": "Observation/obs-1"}}],
}


# --- the definition --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource_type", "params"),
    [
        ("Observation", ("subject", "performer")),
        ("QuestionnaireResponse", ("subject", "author")),
        ("Patient", ("link",)),
        ("CareTeam", ("patient", "participant")),
        ("EpisodeOfCare", ("patient",)),
        ("Encounter", ("patient",)),
        ("CarePlan", ("patient", "performer")),
        ("Appointment", ("actor",)),
        ("AuditEvent", ("patient",)),
        ("Flag", ("patient",)),
        ("Provenance", ("patient",)),
        ("Consent", ("patient",)),
        ("DiagnosticReport", ("subject",)),
        ("Communication", ("subject", "sender", "recipient")),
        ("CommunicationRequest", ("subject", "sender", "recipient", "requester")),
        # Not in the R4 Patient compartment at all.
        ("Task", ()),
        ("Questionnaire", ()),
        ("Practitioner", ()),
        ("Subscription", ()),
        ("Binary", ()),
        ("NoSuchType", ()),
    ],
)
def test_patient_compartment_params(resource_type: str, params: tuple[str, ...]) -> None:
    assert patient_compartment_params(resource_type) == params


def test_in_compartment_types() -> None:
    types = in_compartment_types()
    assert {"Patient", "Observation", "QuestionnaireResponse", "AuditEvent", "CareTeam"} <= types
    assert not {"Questionnaire", "Task", "Practitioner", "Organization", "Binary"} & types
    assert all(patient_compartment_params(t) for t in types)


def test_every_compartment_param_of_a_supported_type_is_an_indexed_reference_param() -> None:
    registry = default_registry()
    for resource_type in SUPPORTED_TYPES:
        for code in patient_compartment_params(resource_type):
            definition = registry.get(resource_type, code)
            assert definition is not None, (resource_type, code)
            assert definition.type == "reference", (resource_type, code)
            assert definition in registry.indexed(resource_type), (resource_type, code)


def test_the_shipped_definition_is_the_official_extract() -> None:
    definition = json.loads(DEFINITION.read_text(encoding="utf-8"))
    assert definition["url"] == "http://hl7.org/fhir/CompartmentDefinition/patient"
    assert definition["version"] == "4.0.1"
    assert definition["code"] == "Patient"
    assert all(entry["param"] for entry in definition["resource"])


# --- membership on realistic resources --------------------------------------------------------------


def test_observation_is_in_its_subjects_compartment_only() -> None:
    index = rows(OBSERVATION)
    assert resource_in_patient_compartment("Observation", "obs-1", index, "1")
    assert not resource_in_patient_compartment("Observation", "obs-1", index, "2")
    assert patients_referenced("Observation", index) == {"1"}


def test_observation_performed_by_a_patient_is_in_that_patients_compartment() -> None:
    index = rows({**OBSERVATION, "performer": [{"reference": "Patient/7"}]})
    assert resource_in_patient_compartment("Observation", "obs-1", index, "7")
    assert patients_referenced("Observation", index) == {"1", "7"}


def test_a_monitoring_plan_and_an_appointment_are_in_their_patients_compartment() -> None:
    """The two types the scheduler reads (issue 15): a patient token reaches its own, no one else's."""
    plan = {
        "resourceType": "CarePlan",
        "id": "cp-1",
        "status": "active",
        "intent": "plan",
        "subject": {"reference": "Patient/1"},
        "activity": [{"detail": {"status": "scheduled", "performer": [{"reference": "Patient/1"}]}}],
    }
    assert resource_in_patient_compartment("CarePlan", "cp-1", rows(plan), "1")
    assert not resource_in_patient_compartment("CarePlan", "cp-1", rows(plan), "2")
    assert patients_referenced("CarePlan", rows(plan)) == {"1"}
    visit = {
        "resourceType": "Appointment",
        "id": "ap-1",
        "status": "booked",
        "start": "2026-03-05T08:00:00Z",
        "end": "2026-03-05T08:45:00Z",
        "participant": [
            {"actor": {"reference": "Patient/1"}, "status": "accepted"},
            {"actor": {"reference": "Practitioner/2"}, "status": "accepted"},
        ],
    }
    assert resource_in_patient_compartment("Appointment", "ap-1", rows(visit), "1")
    assert not resource_in_patient_compartment("Appointment", "ap-1", rows(visit), "2")
    assert patients_referenced("Appointment", rows(visit)) == {"1"}


def test_questionnaire_response_authored_by_the_patient() -> None:
    index = rows(QUESTIONNAIRE_RESPONSE)  # no subject: only the author puts it in a compartment
    assert resource_in_patient_compartment("QuestionnaireResponse", "qr-1", index, "1")
    assert not resource_in_patient_compartment("QuestionnaireResponse", "qr-1", index, "2")
    assert patients_referenced("QuestionnaireResponse", index) == {"1"}


def test_care_team_is_in_the_subjects_and_patient_members_compartments() -> None:
    index = rows(CARE_TEAM)
    assert resource_in_patient_compartment("CareTeam", "ct-1", index, "1")
    assert resource_in_patient_compartment("CareTeam", "ct-1", index, "3")
    assert not resource_in_patient_compartment("CareTeam", "ct-1", index, "2")  # Practitioner/2
    assert patients_referenced("CareTeam", index) == {"1", "3"}


def test_a_patient_is_in_its_own_compartment() -> None:
    index = rows(PATIENT)
    assert resource_in_patient_compartment("Patient", "1", index, "1")
    assert not resource_in_patient_compartment("Patient", "1", index, "2")
    assert patients_referenced("Patient", index, resource_id="1") == {"1"}
    assert patients_referenced("Patient", index) == set()


def test_a_patient_linking_another_is_in_the_linked_patients_compartment() -> None:
    index = rows(LINKING_PATIENT)
    assert resource_in_patient_compartment("Patient", "9", index, "1")
    assert resource_in_patient_compartment("Patient", "9", index, "9")
    assert not resource_in_patient_compartment("Patient", "1", rows(PATIENT), "9")
    assert patients_referenced("Patient", index, resource_id="9") == {"1", "9"}


def test_a_questionnaire_is_in_no_compartment() -> None:
    index = rows(QUESTIONNAIRE)
    assert not resource_in_patient_compartment("Questionnaire", "phq-9", index, "1")
    assert patients_referenced("Questionnaire", index, resource_id="phq-9") == set()


def test_an_audit_event_is_in_the_compartments_of_the_patients_it_names() -> None:
    index = rows(AUDIT_EVENT)
    assert resource_in_patient_compartment("AuditEvent", "ae-1", index, "1")  # entity.what
    assert resource_in_patient_compartment("AuditEvent", "ae-1", index, "5")  # agent.who
    assert not resource_in_patient_compartment("AuditEvent", "ae-1", index, "obs-1")
    assert patients_referenced("AuditEvent", index) == {"1", "5"}


def test_only_compartment_params_count() -> None:
    # Provenance is in the compartment of the Patient it targets, not of one it names as entity.
    provenance = {
        "resourceType": "Provenance",
        "target": [{"reference": "Observation/obs-1"}],
        "recorded": "2024-03-01T10:00:00Z",
        "agent": [{"who": {"reference": "Practitioner/2"}}],
        "entity": [{"role": "source", "what": {"reference": "Patient/1"}}],
    }
    index = rows(provenance)
    assert any(isinstance(r, ReferenceRow) and r.target_id == "1" for r in index)
    assert not resource_in_patient_compartment("Provenance", "p-1", index, "1")
    assert patients_referenced("Provenance", index) == set()
    targeted = rows({**provenance, "target": [{"reference": "Patient/1"}]})
    assert patients_referenced("Provenance", targeted) == {"1"}


def test_a_task_for_a_patient_is_outside_the_compartment() -> None:
    # R4 lists Task without parameters; a Task's ``for`` does not put it in the compartment.
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "for": {"reference": "Patient/1"},
    }
    assert not resource_in_patient_compartment("Task", "t-1", rows(task), "1")


# --- which references count -------------------------------------------------------------------------


def test_version_specific_references_count() -> None:
    index = rows({**OBSERVATION, "subject": {"reference": "Patient/1/_history/3"}})
    assert resource_in_patient_compartment("Observation", "obs-1", index, "1")


def test_absolute_references_count_only_on_this_servers_base() -> None:
    foreign = rows({**OBSERVATION, "subject": {"reference": "https://other.example/fhir/Patient/1"}})
    assert not resource_in_patient_compartment("Observation", "obs-1", foreign, "1")
    assert patients_referenced("Observation", foreign) == set()
    ours = rows({**OBSERVATION, "subject": {"reference": "https://fhir.example.org/fhir/Patient/1"}})
    bases = ("https://fhir.example.org/fhir/",)
    assert resource_in_patient_compartment("Observation", "obs-1", ours, "1", base_urls=bases)
    assert patients_referenced("Observation", ours, base_urls=bases) == {"1"}
    assert not resource_in_patient_compartment(
        "Observation", "obs-1", foreign, "1", base_urls=("https://fhir.example.org/fhir",)
    )


def test_contained_logical_and_uuid_references_name_no_patient() -> None:
    for subject in (
        {"reference": "#p1"},
        {"identifier": {"system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": "01018012345"}},
        {"reference": "urn:uuid:6f8a2c4e-0000-4000-8000-000000000001", "type": "Patient"},
    ):
        index = rows({**OBSERVATION, "subject": subject, "performer": []})
        assert patients_referenced("Observation", index) == set(), subject


def test_rows_may_be_given_directly() -> None:
    index: list[IndexRow] = [
        TokenRow("code", "http://loinc.org", "44261-6"),
        ReferenceRow("subject", "Patient", "1"),
        ReferenceRow("performer", "Practitioner", "1"),
        ReferenceRow("based-on", "Patient", "4"),  # not a compartment param
    ]
    assert patients_referenced("Observation", index) == {"1"}
    assert resource_in_patient_compartment("Observation", "x", iter(index), "1")
    assert not resource_in_patient_compartment("Observation", "x", index, "4")
