"""Interaction tests over HTTP: read, vread, create, update, patch, delete and their headers.

https://hl7.org/fhir/R4/http.html. Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

FHIR = {"Content-Type": "application/fhir+json"}


def patient(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "name": [{"family": "Nordmann", "given": ["Kari"]}],
        "gender": "female",
        **extra,
    }


def create(system_client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = system_client.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def issue_codes(response: Any) -> list[str]:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return [i["code"] for i in body["issue"]]


def test_create_assigns_id_version_and_headers(system_client: TestClient) -> None:
    response = system_client.post(
        "/fhir/Patient", json=patient(id="client-chosen", meta={"versionId": "99"}), headers=FHIR
    )
    assert response.status_code == 201
    body = response.json()
    assert body["id"] != "client-chosen"
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"].endswith("Z")
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Location"] == f"http://testserver/fhir/Patient/{body['id']}/_history/1"
    assert "Last-Modified" in response.headers
    assert response.headers["content-type"].startswith("application/fhir+json")


def test_read_returns_stored_resource(system_client: TestClient) -> None:
    created = create(system_client, patient())
    response = system_client.get(f"/fhir/Patient/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created
    assert response.headers["ETag"] == 'W/"1"'


def test_read_accepts_plain_json_and_format(system_client: TestClient) -> None:
    created = create(system_client, patient())
    assert system_client.get(f"/fhir/Patient/{created['id']}?_format=json").status_code == 200
    assert (
        system_client.get(
            f"/fhir/Patient/{created['id']}", headers={"Accept": "application/json"}
        ).status_code
        == 200
    )
    assert system_client.get(f"/fhir/Patient/{created['id']}?_format=xml").status_code == 406


def test_create_with_application_json_is_accepted(system_client: TestClient) -> None:
    response = system_client.post(
        "/fhir/Patient", json=patient(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 201


def test_unknown_id_is_404_and_unknown_type_is_404(system_client: TestClient) -> None:
    response = system_client.get("/fhir/Patient/does-not-exist")
    assert response.status_code == 404
    assert issue_codes(response) == ["not-found"]
    response = system_client.get("/fhir/Medication/1")
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"
    assert (
        system_client.post("/fhir/Medication", json={"resourceType": "Medication"}, headers=FHIR).status_code
        == 404
    )


def test_update_creates_with_client_id_then_versions(system_client: TestClient) -> None:
    response = system_client.put("/fhir/Patient/kari-1", json=patient(id="kari-1"), headers=FHIR)
    assert response.status_code == 201
    assert response.json()["meta"]["versionId"] == "1"
    response = system_client.put(
        "/fhir/Patient/kari-1", json=patient(id="kari-1", gender="other"), headers=FHIR
    )
    assert response.status_code == 200
    assert response.json()["meta"]["versionId"] == "2"
    assert response.headers["Location"].endswith("/Patient/kari-1/_history/2")
    assert system_client.get("/fhir/Patient/kari-1").json()["gender"] == "other"


def test_update_id_mismatch_and_missing_id_are_400(system_client: TestClient) -> None:
    assert system_client.put("/fhir/Patient/a", json=patient(id="b"), headers=FHIR).status_code == 400
    assert system_client.put("/fhir/Patient/a", json=patient(), headers=FHIR).status_code == 400


def test_vread_returns_each_version(system_client: TestClient) -> None:
    system_client.put("/fhir/Patient/v", json=patient(id="v"), headers=FHIR)
    system_client.put("/fhir/Patient/v", json=patient(id="v", gender="male"), headers=FHIR)
    first = system_client.get("/fhir/Patient/v/_history/1")
    second = system_client.get("/fhir/Patient/v/_history/2")
    assert first.json()["gender"] == "female" and first.headers["ETag"] == 'W/"1"'
    assert second.json()["gender"] == "male"
    assert system_client.get("/fhir/Patient/v/_history/3").status_code == 404
    assert system_client.get("/fhir/Patient/v/_history/x").status_code == 404


def test_if_match_precondition(system_client: TestClient) -> None:
    system_client.put("/fhir/Patient/m", json=patient(id="m"), headers=FHIR)
    stale = system_client.put(
        "/fhir/Patient/m", json=patient(id="m", gender="male"), headers={**FHIR, "If-Match": 'W/"7"'}
    )
    assert stale.status_code == 412
    assert issue_codes(stale) == ["conflict"]
    fresh = system_client.put(
        "/fhir/Patient/m", json=patient(id="m", gender="male"), headers={**FHIR, "If-Match": 'W/"1"'}
    )
    assert fresh.status_code == 200
    assert system_client.get("/fhir/Patient/m").json()["meta"]["versionId"] == "2"


def test_if_none_match_and_if_modified_since_give_304(system_client: TestClient) -> None:
    created = create(system_client, patient())
    url = f"/fhir/Patient/{created['id']}"
    assert system_client.get(url, headers={"If-None-Match": 'W/"1"'}).status_code == 304
    assert system_client.get(url, headers={"If-None-Match": 'W/"2"'}).status_code == 200
    last_modified = system_client.get(url).headers["Last-Modified"]
    assert system_client.get(url, headers={"If-Modified-Since": last_modified}).status_code == 304
    assert (
        system_client.get(url, headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}).status_code
        == 200
    )


def test_prefer_return(system_client: TestClient) -> None:
    minimal = system_client.post(
        "/fhir/Patient", json=patient(), headers={**FHIR, "Prefer": "return=minimal"}
    )
    assert minimal.status_code == 201 and minimal.content == b""
    assert minimal.headers["Location"]
    outcome = system_client.post(
        "/fhir/Patient", json=patient(), headers={**FHIR, "Prefer": "return=OperationOutcome"}
    )
    assert outcome.status_code == 201
    assert outcome.json()["resourceType"] == "OperationOutcome"
    full = system_client.post(
        "/fhir/Patient", json=patient(), headers={**FHIR, "Prefer": "return=representation"}
    )
    assert full.json()["resourceType"] == "Patient"


def test_server_owns_meta_on_update(system_client: TestClient) -> None:
    body = patient(
        id="owned",
        meta={
            "versionId": "42",
            "lastUpdated": "2001-01-01T00:00:00Z",
            "tag": [{"system": "http://example.org/tags", "code": "keep"}],
        },
    )
    stored = system_client.put("/fhir/Patient/owned", json=body, headers=FHIR).json()
    assert stored["meta"]["versionId"] == "1"
    assert stored["meta"]["lastUpdated"] != "2001-01-01T00:00:00Z"
    assert stored["meta"]["tag"] == [{"system": "http://example.org/tags", "code": "keep"}]


def test_conditional_create(system_client: TestClient) -> None:
    body = patient(identifier=[{"system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": "01017012345"}])
    headers = {**FHIR, "If-None-Exist": "identifier=urn:oid:2.16.578.1.12.4.1.4.1|01017012345"}
    first = system_client.post("/fhir/Patient", json=body, headers=headers)
    assert first.status_code == 201
    second = system_client.post("/fhir/Patient", json=body, headers=headers)
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    create(system_client, body)  # a plain create makes a duplicate ...
    third = system_client.post("/fhir/Patient", json=body, headers=headers)
    assert third.status_code == 412  # ... and now the condition is ambiguous


def test_conditional_update(system_client: TestClient) -> None:
    ident = {"system": "http://hospital.example/mrn", "value": "A-1"}
    created = system_client.put(
        "/fhir/Patient?identifier=http://hospital.example/mrn|A-1",
        json=patient(identifier=[ident]),
        headers=FHIR,
    )
    assert created.status_code == 201
    updated = system_client.put(
        "/fhir/Patient?identifier=http://hospital.example/mrn|A-1",
        json=patient(identifier=[ident], gender="male"),
        headers=FHIR,
    )
    assert updated.status_code == 200
    assert updated.json()["id"] == created.json()["id"]
    assert updated.json()["meta"]["versionId"] == "2"
    create(system_client, patient(identifier=[ident]))
    ambiguous = system_client.put(
        "/fhir/Patient?identifier=http://hospital.example/mrn|A-1",
        json=patient(identifier=[ident]),
        headers=FHIR,
    )
    assert ambiguous.status_code == 412


def test_json_patch(system_client: TestClient) -> None:
    created = create(system_client, patient())
    url = f"/fhir/Patient/{created['id']}"
    ops = [
        {"op": "replace", "path": "/gender", "value": "male"},
        {"op": "add", "path": "/birthDate", "value": "1970-01-01"},
    ]
    response = system_client.patch(url, json=ops, headers={"Content-Type": "application/json-patch+json"})
    assert response.status_code == 200, response.text
    assert response.json()["gender"] == "male"
    assert response.json()["birthDate"] == "1970-01-01"
    assert response.json()["meta"]["versionId"] == "2"
    bad_code = system_client.patch(
        url,
        json=[{"op": "replace", "path": "/gender", "value": "robot"}],
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert bad_code.status_code == 400
    not_applicable = system_client.patch(
        url,
        json=[{"op": "remove", "path": "/nothing"}],
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert not_applicable.status_code == 422
    stale = system_client.patch(
        url, json=ops, headers={"Content-Type": "application/json-patch+json", "If-Match": 'W/"1"'}
    )
    assert stale.status_code == 412
    assert system_client.get(url).json()["meta"]["versionId"] == "2"


def test_delete_is_soft_and_read_answers_410(system_client: TestClient) -> None:
    created = create(system_client, patient())
    url = f"/fhir/Patient/{created['id']}"
    response = system_client.delete(url)
    assert response.status_code == 204
    gone = system_client.get(url)
    assert gone.status_code == 410
    assert issue_codes(gone) == ["deleted"]
    assert system_client.get(f"{url}/_history/1").status_code == 200
    assert system_client.get(f"{url}/_history/2").status_code == 410
    assert system_client.delete(url).status_code == 204  # idempotent
    assert system_client.delete("/fhir/Patient/never-was").status_code == 404
    # Updating a deleted resource brings it back as a new version.
    revived = system_client.put(url, json={**patient(), "id": created["id"]}, headers=FHIR)
    assert revived.status_code == 201
    assert revived.json()["meta"]["versionId"] == "3"


def test_conditional_delete(system_client: TestClient) -> None:
    create(system_client, patient(identifier=[{"system": "http://x", "value": "d1"}]))
    assert system_client.delete("/fhir/Patient?identifier=http://x|d1").status_code == 204
    assert system_client.delete("/fhir/Patient?identifier=http://x|nothing").status_code == 204
    create(system_client, patient(identifier=[{"system": "http://x", "value": "d2"}]))
    create(system_client, patient(identifier=[{"system": "http://x", "value": "d2"}]))
    assert system_client.delete("/fhir/Patient?identifier=http://x|d2").status_code == 412
