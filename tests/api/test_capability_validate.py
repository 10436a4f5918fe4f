"""``/metadata`` and ``$validate``."""

from __future__ import annotations

from fastapi.testclient import TestClient

from fhir_norse.store.resource_types import SUPPORTED_TYPES

FHIR = {"Content-Type": "application/fhir+json"}


def test_capability_statement_describes_the_server(system_client: TestClient) -> None:
    response = system_client.get("/fhir/metadata")
    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    rest = statement["rest"][0]
    assert [r["type"] for r in rest["resource"]] == list(SUPPORTED_TYPES)
    observation = next(r for r in rest["resource"] if r["type"] == "Observation")
    codes = {i["code"] for i in observation["interaction"]}
    assert {
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "create",
        "search-type",
        "history-instance",
    } <= codes
    params = {p["name"]: p["type"] for p in observation["searchParam"]}
    assert params["patient"] == "reference"
    assert params["code-value-quantity"] == "composite"
    assert params["_lastUpdated"] == "date"
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch", "history-system"}


def test_validate_type_level(system_client: TestClient) -> None:
    good = system_client.post(
        "/fhir/Patient/$validate", json={"resourceType": "Patient", "gender": "female"}, headers=FHIR
    )
    assert good.status_code == 200
    assert good.json()["issue"][0]["severity"] == "information"
    bad = system_client.post(
        "/fhir/Patient/$validate", json={"resourceType": "Patient", "gender": "robot"}, headers=FHIR
    )
    assert bad.status_code == 200
    assert bad.json()["issue"][0]["severity"] == "error"
    assert "Patient.gender" in bad.json()["issue"][0]["expression"]
    wrapped = system_client.post(
        "/fhir/Patient/$validate",
        headers=FHIR,
        json={
            "resourceType": "Parameters",
            "parameter": [{"name": "resource", "resource": {"resourceType": "Patient"}}],
        },
    )
    assert wrapped.json()["issue"][0]["severity"] == "information"
    # Nothing was stored.
    assert system_client.get("/fhir/Patient?_total=accurate").json()["total"] == 0


def test_validate_instance_level(system_client: TestClient) -> None:
    system_client.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1"}, headers=FHIR)
    ok = system_client.post(
        "/fhir/Patient/p1/$validate", json={"resourceType": "Patient", "id": "p1"}, headers=FHIR
    )
    assert ok.json()["issue"][0]["severity"] == "information"
    mismatch = system_client.post(
        "/fhir/Patient/p1/$validate", json={"resourceType": "Patient", "id": "p2"}, headers=FHIR
    )
    assert mismatch.json()["issue"][0]["severity"] == "error"
    assert (
        system_client.post(
            "/fhir/Patient/nope/$validate", json={"resourceType": "Patient"}, headers=FHIR
        ).status_code
        == 404
    )
