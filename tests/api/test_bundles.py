"""Batch and transaction Bundles: https://hl7.org/fhir/R4/http.html#transaction."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

FHIR = {"Content-Type": "application/fhir+json"}


def observation(subject: str, code: str = "8867-4", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2024-05-01T10:00:00Z",
        **extra,
    }


def total(system_client: TestClient, res_type: str) -> int:
    value: int = system_client.get(f"/fhir/{res_type}?_total=accurate&_count=0").json()["total"]
    return value


def test_transaction_resolves_urn_uuid_references(system_client: TestClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0c3b1b64-6c5c-4b6d-9d6e-000000000002",
                "resource": observation("urn:uuid:0c3b1b64-6c5c-4b6d-9d6e-000000000001"),
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": "urn:uuid:0c3b1b64-6c5c-4b6d-9d6e-000000000001",
                "resource": {"resourceType": "Patient", "name": [{"family": "Hansen"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }
    response = system_client.post("/fhir", json=bundle, headers=FHIR)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "transaction-response"
    obs_entry, patient_entry = body["entry"]
    assert obs_entry["response"]["status"].startswith("201")
    patient_id = patient_entry["response"]["location"].split("/")[1]
    obs_location = obs_entry["response"]["location"]
    stored = system_client.get(f"/fhir/{obs_location.rsplit('/_history', 1)[0]}").json()
    assert stored["subject"]["reference"] == f"Patient/{patient_id}"


def test_transaction_is_atomic_when_50th_entry_is_invalid(system_client: TestClient) -> None:
    entries: list[dict[str, Any]] = [
        {
            "resource": {"resourceType": "Patient", "name": [{"family": f"P{i}"}]},
            "request": {"method": "POST", "url": "Patient"},
        }
        for i in range(49)
    ]
    entries.append(
        {
            "resource": {"resourceType": "Observation", "status": "not-a-status", "code": {"text": "x"}},
            "request": {"method": "POST", "url": "Observation"},
        }
    )
    response = system_client.post(
        "/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": entries}, headers=FHIR
    )
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert any("Bundle.entry[49]" in e for i in outcome["issue"] for e in i.get("expression", []))
    assert total(system_client, "Patient") == 0
    stored = [e["fullUrl"] for e in system_client.get("/fhir/_history").json().get("entry", [])]
    assert [url for url in stored if "/AuditEvent/" not in url] == []


def test_transaction_conditional_reference_and_if_none_exist(system_client: TestClient) -> None:
    system_client.post(
        "/fhir/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": "http://hospital.example/mrn", "value": "777"}],
        },
        headers=FHIR,
    )
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": observation("Patient?identifier=http://hospital.example/mrn|777"),
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "http://hospital.example/mrn", "value": "777"}],
                },
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": "identifier=http://hospital.example/mrn|777",
                },
            },
        ],
    }
    response = system_client.post("/fhir", json=bundle, headers=FHIR)
    assert response.status_code == 200, response.text
    assert response.json()["entry"][1]["response"]["status"].startswith("200")
    assert total(system_client, "Patient") == 1
    obs = system_client.get("/fhir/Observation").json()["entry"][0]["resource"]
    patient_id = system_client.get("/fhir/Patient").json()["entry"][0]["resource"]["id"]
    assert obs["subject"]["reference"] == f"Patient/{patient_id}"


def test_transaction_unresolvable_conditional_reference_stores_nothing(system_client: TestClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": observation("Patient?identifier=http://nowhere|0"),
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    response = system_client.post("/fhir", json=bundle, headers=FHIR)
    assert response.status_code == 412
    assert total(system_client, "Patient") == 0


def test_transaction_put_delete_patch_and_get(system_client: TestClient) -> None:
    system_client.put(
        "/fhir/Patient/keep", json={"resourceType": "Patient", "id": "keep", "gender": "female"}, headers=FHIR
    )
    system_client.put("/fhir/Patient/drop", json={"resourceType": "Patient", "id": "drop"}, headers=FHIR)
    patch = base64.b64encode(orjson.dumps([{"op": "replace", "path": "/gender", "value": "male"}])).decode()
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "GET", "url": "Patient/keep"}},
            {
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "application/json-patch+json",
                    "data": patch,
                },
                "request": {"method": "PATCH", "url": "Patient/keep"},
            },
            {"request": {"method": "DELETE", "url": "Patient/drop"}},
            {
                "resource": {"resourceType": "Patient", "id": "new-one"},
                "request": {"method": "PUT", "url": "Patient/new-one"},
            },
        ],
    }
    response = system_client.post("/fhir", json=bundle, headers=FHIR)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    # GET runs after the writes, so it sees the patched resource.
    assert entries[0]["resource"]["gender"] == "male"
    assert entries[1]["response"]["status"].startswith("200")
    assert entries[2]["response"]["status"].startswith("204")
    assert entries[3]["response"]["status"].startswith("201")
    assert system_client.get("/fhir/Patient/drop").status_code == 410


def test_batch_entries_succeed_or_fail_independently(system_client: TestClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {"resourceType": "Observation", "status": "bad"},
                "request": {"method": "POST", "url": "Observation"},
            },
            {"request": {"method": "GET", "url": "Patient/missing"}},
        ],
    }
    response = system_client.post("/fhir", json=bundle, headers=FHIR)
    assert response.status_code == 200
    body = response.json()
    assert body["type"] == "batch-response"
    statuses = [e["response"]["status"][:3] for e in body["entry"]]
    assert statuses == ["201", "400", "404"]
    assert body["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert total(system_client, "Patient") == 1


def test_bundle_of_wrong_type_is_400(system_client: TestClient) -> None:
    response = system_client.post(
        "/fhir", json={"resourceType": "Bundle", "type": "collection"}, headers=FHIR
    )
    assert response.status_code == 400
    response = system_client.post(
        "/fhir",
        json={
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": {"resourceType": "Patient"}}],
        },
        headers=FHIR,
    )
    assert response.status_code == 400


def _transaction(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def test_transaction_of_plain_creates_is_stored_in_a_batch(app: FastAPI, system_client: TestClient) -> None:
    """Plain creates go in with one statement per table, yet each is a create of its own: its own id,
    version 1, index rows (searchable), history entry and AuditEvent (with its patient)."""
    patient = system_client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR).json()["id"]
    entries = [
        {
            "resource": observation(f"Patient/{patient}", code=f"code-{i}"),
            "request": {"method": "POST", "url": "Observation"},
        }
        for i in range(30)
    ]
    statements: list[str] = []
    engine = app.state.service.storage.engine

    def count(conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        response = system_client.post("/fhir", json=_transaction(entries), headers=FHIR)
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    assert response.status_code == 200, response.text
    answers = response.json()["entry"]
    assert [a["response"]["status"] for a in answers] == ["201 Created"] * 30
    ids = [a["response"]["location"].split("/")[1] for a in answers]
    assert len(set(ids)) == 30
    assert all(a["response"]["location"].endswith("/_history/1") for a in answers)
    # Far fewer statements than the nine per entry of one-by-one storage.
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) <= 12, inserts
    for i in (0, 29):
        found = system_client.get(f"/fhir/Observation?code=code-{i}&subject=Patient/{patient}").json()
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [ids[i]]
    history = system_client.get(f"/fhir/Observation/{ids[7]}/_history").json()
    assert [e["request"]["method"] for e in history["entry"]] == ["POST"]
    audits = system_client.get(f"/fhir/AuditEvent?entity=Observation/{ids[7]}&subtype=create").json()
    events = [e["resource"] for e in audits.get("entry", [])]
    assert len(events) == 1
    by_patient = system_client.get(f"/fhir/AuditEvent?patient={patient}&subtype=create&_count=100").json()
    assert len(by_patient.get("entry", [])) == 31  # the Patient and its 30 Observations


def test_transaction_failing_after_its_batched_creates_leaves_nothing(system_client: TestClient) -> None:
    """The batched creates are stored before the entries that follow them; a later entry that fails
    (here a PUT whose If-Match names no version) rolls them back with the rest."""
    patient = system_client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR).json()["id"]
    before = total(system_client, "Observation")
    audits_before = len(
        system_client.get("/fhir/AuditEvent?subtype=create&_count=1000").json().get("entry", [])
    )
    entries = [
        {"resource": observation(f"Patient/{patient}"), "request": {"method": "POST", "url": "Observation"}}
        for _ in range(20)
    ]
    entries.append(
        {
            "resource": {"resourceType": "Patient", "id": patient, "active": True},
            "request": {"method": "PUT", "url": f"Patient/{patient}", "ifMatch": 'W/"7"'},
        }
    )
    response = system_client.post("/fhir", json=_transaction(entries), headers=FHIR)
    assert response.status_code == 412, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert total(system_client, "Observation") == before
    audits_after = system_client.get("/fhir/AuditEvent?subtype=create&_count=1000").json().get("entry", [])
    assert len(audits_after) == audits_before


def test_transaction_search_of_the_audit_trail_sees_its_own_creates(system_client: TestClient) -> None:
    """A transaction's AuditEvents are inserted together before it commits, and before any entry of it
    reads the trail."""
    patient = system_client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR).json()["id"]
    entries = [
        {"resource": observation(f"Patient/{patient}"), "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "GET", "url": f"AuditEvent?patient={patient}&subtype=create"}},
    ]
    response = system_client.post("/fhir", json=_transaction(entries), headers=FHIR)
    assert response.status_code == 200, response.text
    created, searched = response.json()["entry"]
    obs_id = created["response"]["location"].split("/")[1]
    entities = [
        e["what"].get("reference")
        for hit in searched["resource"].get("entry", [])
        for e in hit["resource"].get("entity", [])
        if "what" in e
    ]
    assert f"Observation/{obs_id}/_history/1" in entities
