"""Issue 12, item 22: the tailored form is a Questionnaire of its own that a form filler can fetch by
canonical and answer by ``url|version``, on SQLite and PostgreSQL.

``Patient/{id}/$tailored-form`` used to answer a form without ``url``, so a form filler (LHC-Forms fetches
by canonical) had nothing to name in ``QuestionnaireResponse.questionnaire`` and its answer was refused
with 422. The form now has a deterministic canonical (a digest of the static ``url|version`` and the
tailored items), ``derivedFrom`` the static form, is stored (read-only) the first time it is made, and a
response to it is validated against it and scored with the static form's mapping.
"""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.intake_support import (
    FHIR,
    NF21_STATIC,
    answers_to,
    create_patient,
    nf21,
    nf21_answers,
    post_response,
    response,
    search,
)

STATIC_URL = NF21_STATIC.split("|")[0]
SCALES = "http://fhir-norse.org/fhir/CodeSystem/nf21-scales"


def _tailored(client: TestClient, patient: str, **params: str) -> dict[str, Any]:
    # These tests tailor 2.1.0 (still published); without questionnaire= the newest version is taken.
    params = {"questionnaire": NF21_STATIC, **params}
    query = "&".join(f"{k}={v}" for k, v in params.items())
    got = client.get(f"/fhir/Patient/{patient}/$tailored-form" + (f"?{query}" if query else ""))
    assert got.status_code == 200, got.text
    return dict(got.json())


def _with_sad_open(client: TestClient) -> str:
    """A patient whose intake opened the sadness scale: the weekly tailored form asks it in full."""
    patient = create_patient(client)
    intake = response(NF21_STATIC, nf21_answers({"sad": 6}), patient=patient, authored="2026-03-02T09:00:00Z")
    assert post_response(client, intake).status_code == 201
    return patient


def test_the_tailored_form_has_its_own_canonical_and_resolves_by_url(system_client: TestClient) -> None:
    patient = _with_sad_open(system_client)
    form = _tailored(system_client, patient)
    assert form["url"].startswith(f"{STATIC_URL}-tailored-")
    assert form["version"] == "2.1.0"
    assert form["derivedFrom"] == [NF21_STATIC]
    assert form["status"] == "active"
    assert patient not in str(form)  # shared by every patient it fits: nothing of this one in it
    groups = {g["linkId"]: g for g in form["item"]}
    assert "enableWhen" not in groups["group-sad"] and "enableWhen" in groups["group-worry"]

    # Stored once: the same call gives the same resource, and a form filler finds it by canonical.
    again = _tailored(system_client, patient)
    assert (again["id"], again["url"], again["meta"]["versionId"]) == (form["id"], form["url"], "1")
    (found,) = search(system_client, f"Questionnaire?url={form['url']}")
    assert found["id"] == form["id"] and found["item"] == form["item"]
    read = system_client.get(f"/fhir/Questionnaire/{form['id']}")
    assert read.status_code == 200 and read.json()["url"] == form["url"]

    # The server's: read-only over the API, as the content pack is.
    changed = {**found, "status": "retired"}
    refused = system_client.put(f"/fhir/Questionnaire/{form['id']}", json=changed, headers=FHIR)
    assert refused.status_code == 405
    assert refused.json()["resourceType"] == "OperationOutcome"
    assert "read-only" in refused.json()["issue"][0]["diagnostics"]
    assert system_client.delete(f"/fhir/Questionnaire/{form['id']}").status_code == 405
    assert system_client.get(f"/fhir/Questionnaire/{form['id']}").json()["status"] == "active"


def test_a_response_naming_the_tailored_canonical_is_accepted_and_scored(system_client: TestClient) -> None:
    patient = _with_sad_open(system_client)
    form = _tailored(system_client, patient)
    sad = nf21().scale("sad")
    # The sad trigger is low this week, yet its items are asked in full: the tailored form says so.
    answers = {**nf21_answers({"sad": 3}), **{i: "3" for i in sad.items if i not in sad.reverse_keyed}}
    answers |= {i: "5" for i in sad.reverse_keyed}
    body = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{form['url']}|{form['version']}",
        "status": "completed",
        "subject": {"reference": f"Patient/{patient}"},
        "authored": "2026-03-09T09:00:00Z",
        "item": answers_to(form, answers),
    }
    stored = post_response(system_client, body)
    assert stored.status_code == 201, stored.text
    qr_id = stored.json()["id"]
    derived = [
        o
        for o in search(system_client, f"Observation?subject=Patient/{patient}")
        if o["derivedFrom"][0]["reference"].startswith(f"QuestionnaireResponse/{qr_id}/")
    ]
    scores = {o["code"]["coding"][0]["code"]: o for o in derived if "valueQuantity" in o}
    assert scores["sad"]["valueQuantity"]["value"] == 3
    answered = next(
        c for c in scores["sad"]["component"] if c["code"]["coding"][0]["code"] == "items-answered"
    )
    assert answered["valueInteger"] == len(sad.items)
    (provenance,) = search(system_client, f"Provenance?target=Observation/{scores['sad']['id']}")
    mapping = next(e for e in provenance["entity"] if "identifier" in e["what"])
    assert mapping["what"]["identifier"]["value"] == "nf21|2.1.0"


def test_the_same_tailoring_gives_the_same_canonical_and_another_one_another(
    system_client: TestClient,
) -> None:
    first, second = create_patient(system_client), create_patient(system_client, family="Berg")
    closing = create_patient(system_client, family="Dahl")
    override = {
        "resourceType": "ServiceRequest",
        "meta": {"profile": ["http://fhir-norse.org/fhir/StructureDefinition/rom-scale-override"]},
        "status": "active",
        "intent": "order",
        "doNotPerform": True,
        "category": [
            {
                "coding": [
                    {"system": "http://fhir-norse.org/fhir/CodeSystem/rom-codes", "code": "scale-override"}
                ]
            }
        ],
        "code": {"coding": [{"system": SCALES, "code": "worry"}]},
        "subject": {"reference": f"Patient/{closing}"},
        "authoredOn": "2026-03-01T10:00:00+01:00",
        "requester": {"reference": "Practitioner/dr-hansen"},
        "reasonCode": [{"text": "worry is worked with elsewhere"}],
    }
    assert system_client.post("/fhir/ServiceRequest", json=override, headers=FHIR).status_code == 201
    a, b, c = (_tailored(system_client, p) for p in (first, second, closing))
    assert a["url"] == b["url"] and a["id"] == b["id"]  # two intakes, the full bank: one form
    assert c["url"] != a["url"]
    assert "group-worry" not in {g["linkId"] for g in c["item"]}
    assert len(search(system_client, f"Questionnaire?derived-from={NF21_STATIC}")) >= 2


def test_a_client_form_deriving_from_the_static_form_with_other_answers_is_refused(
    system_client: TestClient,
) -> None:
    """Scoring follows ``derivedFrom`` only for a form that defines each item as the static form does:
    a form with its own answer codes must not be scored by the static form's mapping (422, nothing
    stored). Before, the response was accepted unscored."""
    patient = create_patient(system_client)
    form = _tailored(system_client, patient)
    own = {k: v for k, v in form.items() if k not in ("id", "meta")}
    own["url"] = "http://example.org/fhir/Questionnaire/my-nf21"
    first_question = own["item"][0]["item"][0]
    for option in first_question["answerOption"]:
        option["valueCoding"] = {**option["valueCoding"], "code": "x" + option["valueCoding"]["code"]}
    created = system_client.post("/fhir/Questionnaire", json=own, headers=FHIR)
    assert created.status_code == 201, created.text
    body = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{own['url']}|{own['version']}",
        "status": "completed",
        "subject": {"reference": f"Patient/{patient}"},
        "authored": "2026-03-09T09:00:00Z",
        "item": answers_to(own, {first_question["linkId"]: "x6"}),
    }
    refused = post_response(system_client, body)
    assert refused.status_code == 422, refused.text
    outcome = refused.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert first_question["linkId"] in outcome["issue"][0]["diagnostics"]
    assert NF21_STATIC in outcome["issue"][0]["diagnostics"]
    assert search(system_client, f"QuestionnaireResponse?subject=Patient/{patient}") == []
    assert search(system_client, f"Observation?subject=Patient/{patient}") == []
