"""Intake validation of QuestionnaireResponses at the storage seam (issue 5, item 1).

Every refusal is a 422 OperationOutcome whose issues name the element or linkId, and nothing of the
refused request is stored (no response, no Observation, no Flag).
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
from fastapi.testclient import TestClient

from tests.intake_support import (
    FHIR,
    NF21_STATIC,
    NF21_STATIC_NEWEST,
    PHQ9,
    PHQ9_ITEMS,
    create_patient,
    nf21_answers,
    post_response,
    response,
    search,
)


def expressions(outcome: dict[str, Any]) -> list[str]:
    return [e for issue in outcome["issue"] for e in issue.get("expression", [])]


def nothing_stored(system_client: TestClient) -> None:
    for res_type in ("QuestionnaireResponse", "Observation", "DiagnosticReport", "Flag", "Provenance"):
        assert search(system_client, res_type) == [], res_type


def valid(system_client: TestClient, **kw: Any) -> dict[str, Any]:
    return response(NF21_STATIC, nf21_answers(), patient=create_patient(system_client), **kw)


def test_unknown_questionnaire_is_422(system_client: TestClient) -> None:
    body = valid(system_client)
    body["questionnaire"] = "http://example.org/Questionnaire/unknown|1.0.0"
    answer = post_response(system_client, body)
    assert answer.status_code == 422
    assert "not known" in answer.json()["issue"][0]["diagnostics"]
    assert expressions(answer.json()) == ["QuestionnaireResponse.questionnaire"]
    nothing_stored(system_client)


def test_unknown_questionnaire_version_is_422(system_client: TestClient) -> None:
    body = valid(system_client)
    body["questionnaire"] = NF21_STATIC.replace("2.1.0", "9.9.9")
    assert post_response(system_client, body).status_code == 422
    nothing_stored(system_client)


def test_a_bare_canonical_takes_the_newest_version(system_client: TestClient) -> None:
    """The bare canonical names the newest published version (2.2.0): an answer only 2.1.0 asks is
    refused under it, and the newest version's answers are accepted and scored."""
    patient = create_patient(system_client)
    body = {
        **response(NF21_STATIC, nf21_answers(), patient=patient),
        "questionnaire": NF21_STATIC.split("|")[0],
    }
    answer = post_response(system_client, body)
    assert answer.status_code == 422
    assert "linkId 'alliance-goal' is not in" in answer.text
    newest = response(NF21_STATIC_NEWEST, nf21_answers(version="2.2.0"), patient=patient)
    body = {**newest, "questionnaire": NF21_STATIC.split("|")[0]}
    assert post_response(system_client, body).status_code == 201
    assert len(search(system_client, "DiagnosticReport")) == 1


def test_missing_questionnaire_is_422(system_client: TestClient) -> None:
    body = valid(system_client)
    del body["questionnaire"]
    answer = post_response(system_client, body)
    assert answer.status_code == 422
    assert answer.json()["issue"][0]["code"] == "required"


def test_subject_must_be_an_existing_patient(system_client: TestClient) -> None:
    body = valid(system_client)
    body["subject"] = {"reference": "Patient/does-not-exist"}
    answer = post_response(system_client, body)
    assert answer.status_code == 422
    assert expressions(answer.json()) == ["QuestionnaireResponse.subject"]
    body["subject"] = {"reference": "Group/g1"}
    assert post_response(system_client, body).status_code == 422
    del body["subject"]
    assert post_response(system_client, body).status_code == 422
    nothing_stored(system_client)


def test_a_deleted_patient_is_not_a_subject(system_client: TestClient) -> None:
    body = valid(system_client)
    patient = body["subject"]["reference"]
    assert system_client.delete(f"/fhir/{patient}").status_code == 204
    assert post_response(system_client, body).status_code == 422


def test_every_problem_is_reported_with_its_linkid(system_client: TestClient) -> None:
    body = valid(system_client)
    triggers = body["item"][0]["item"]
    triggers[0]["answer"][0]["valueCoding"]["code"] = "9"  # not an answer option
    triggers.append({"linkId": "no-such-item", "answer": [{"valueString": "x"}]})
    body["subject"] = {"reference": "Patient/does-not-exist"}
    answer = post_response(system_client, body)
    assert answer.status_code == 422
    found = expressions(answer.json())
    assert "QuestionnaireResponse.subject" in found
    diagnostics = " ".join(i["diagnostics"] for i in answer.json()["issue"])
    assert "sad-1" in diagnostics and "no-such-item" in diagnostics
    nothing_stored(system_client)


WEEKLY = {
    "url": "http://fhir-norse.org/fhir/StructureDefinition/administration-context",
    "valueCoding": {
        "system": "http://fhir-norse.org/fhir/CodeSystem/administration-context",
        "code": "weekly",
    },
}


def test_answers_to_a_closed_scale_are_refused(system_client: TestClient) -> None:
    """At a weekly administration sad-2 is asked only when the sad trigger opens the scale (the static
    form's enableWhen; the patient's history has not opened it)."""
    patient = create_patient(system_client)
    answers = nf21_answers({"sad": 2}, overrides={"sad-2": "5"})
    body = response(NF21_STATIC, answers, patient=patient)
    body["extension"] = [WEEKLY]
    answer = post_response(system_client, body)
    assert answer.status_code == 422
    assert "sad-2" in answer.json()["issue"][0]["diagnostics"]


def test_the_intake_administration_asks_every_scale(system_client: TestClient) -> None:
    """The first administration (context intake, or no context and no history) asks the full bank, so
    the items of a scale whose trigger is low are accepted there."""
    patient = create_patient(system_client)
    answers = nf21_answers({"sad": 2}, overrides={"sad-2": "5"})
    answer = post_response(system_client, response(NF21_STATIC, answers, patient=patient))
    assert answer.status_code == 201, answer.text


def test_wrong_answer_type_is_refused(system_client: TestClient) -> None:
    body = valid(system_client)
    body["item"][0]["item"][0]["answer"] = [{"valueInteger": 5}]
    answer = post_response(system_client, body)
    assert answer.status_code == 422
    assert "sad-1" in answer.json()["issue"][0]["diagnostics"]


def test_required_items_of_a_completed_phq9(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    partial = {"44250-9": "LA6569-3", "44255-8": "LA6569-3"}
    completed = response(PHQ9, partial, patient=patient)
    answer = post_response(system_client, completed)
    assert answer.status_code == 422
    assert any("44259-0" in i["diagnostics"] for i in answer.json()["issue"])
    # The same partial answers are a valid autosave while in progress, and are not scored.
    saved = post_response(system_client, response(PHQ9, partial, patient=patient, status="in-progress"))
    assert saved.status_code == 201
    assert search(system_client, "Observation") == []
    stopped = post_response(system_client, response(PHQ9, partial, patient=patient, status="stopped"))
    assert stopped.status_code == 201
    assert search(system_client, "Observation") == []


def test_form_filler_extras_are_accepted(system_client: TestClient) -> None:
    """ordinalValue on answer Codings, unknown meta.profile and meta.tag values, calculated items."""
    patient = create_patient(system_client)
    body = response(PHQ9, {i: "LA6569-3" for i in PHQ9_ITEMS} | {"44261-6": 9}, patient=patient)
    for item in body["item"]:
        for ans in item.get("answer", []):
            if "valueCoding" in ans:
                ans["valueCoding"]["extension"] = [
                    {"url": "http://hl7.org/fhir/StructureDefinition/ordinalValue", "valueDecimal": 1}
                ]
    body["meta"] = {
        "profile": ["http://example.org/StructureDefinition/some-renderer-qr"],
        "tag": [{"system": "http://example.org/tags", "code": "from-app"}],
    }
    assert post_response(system_client, body).status_code == 201


def test_a_completed_response_is_not_reopened(system_client: TestClient) -> None:
    stored = post_response(system_client, valid(system_client)).json()
    reopened = copy.deepcopy(stored)
    reopened["status"] = "in-progress"
    answer = system_client.put(
        f"/fhir/QuestionnaireResponse/{stored['id']}", content=orjson.dumps(reopened), headers=FHIR
    )
    assert answer.status_code == 422
    assert expressions(answer.json()) == ["QuestionnaireResponse.status"]


def test_an_amendment_keeps_subject_and_questionnaire(system_client: TestClient) -> None:
    stored = post_response(system_client, valid(system_client)).json()
    moved = copy.deepcopy(stored)
    moved["status"] = "amended"
    moved["subject"] = {"reference": f"Patient/{create_patient(system_client, 'Hansen')}"}
    answer = system_client.put(
        f"/fhir/QuestionnaireResponse/{stored['id']}", content=orjson.dumps(moved), headers=FHIR
    )
    assert answer.status_code == 422
    assert expressions(answer.json()) == ["QuestionnaireResponse.subject"]


def test_a_refused_entry_rolls_back_the_whole_transaction(system_client: TestClient) -> None:
    """A Patient created in the same transaction is a valid subject; a bad response undoes it all."""
    patient = {
        "fullUrl": "urn:uuid:7f1f0e4c-0000-4000-8000-000000000001",
        "resource": {"resourceType": "Patient"},
    }
    good = response(NF21_STATIC, nf21_answers(), patient="x")
    good["subject"] = {"reference": patient["fullUrl"]}
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {**patient, "request": {"method": "POST", "url": "Patient"}},
            {"resource": good, "request": {"method": "POST", "url": "QuestionnaireResponse"}},
        ],
    }
    ok = system_client.post("/fhir", content=orjson.dumps(bundle), headers=FHIR)
    assert ok.status_code == 200, ok.text
    assert len(search(system_client, "DiagnosticReport")) == 1
    bad = copy.deepcopy(bundle)
    good["item"][0]["item"][0]["answer"][0]["valueCoding"]["code"] = "9"  # not an answer option
    bad["entry"] = [
        bundle["entry"][0],
        {"resource": good, "request": {"method": "POST", "url": "QuestionnaireResponse"}},
    ]
    refused = system_client.post("/fhir", content=orjson.dumps(bad), headers=FHIR)
    assert refused.status_code == 422
    assert len(search(system_client, "Patient")) == 1
    assert len(search(system_client, "DiagnosticReport")) == 1
