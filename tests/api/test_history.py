"""History at instance, type and system level: https://hl7.org/fhir/R4/http.html#history."""

from __future__ import annotations

from fastapi.testclient import TestClient

FHIR = {"Content-Type": "application/fhir+json"}


def test_instance_history_lists_versions_newest_first(system_client: TestClient) -> None:
    system_client.put("/fhir/Patient/h", json={"resourceType": "Patient", "id": "h"}, headers=FHIR)
    system_client.put(
        "/fhir/Patient/h", json={"resourceType": "Patient", "id": "h", "gender": "male"}, headers=FHIR
    )
    system_client.delete("/fhir/Patient/h")
    bundle = system_client.get("/fhir/Patient/h/_history").json()
    assert bundle["type"] == "history"
    methods = [e["request"]["method"] for e in bundle["entry"]]
    assert methods == ["DELETE", "PUT", "PUT"] or methods == ["DELETE", "PUT", "POST"]
    assert "resource" not in bundle["entry"][0]
    assert bundle["entry"][1]["resource"]["meta"]["versionId"] == "2"
    assert system_client.get("/fhir/Patient/unknown/_history").status_code == 404


def test_type_and_system_history_with_count_and_paging(system_client: TestClient) -> None:
    for i in range(5):
        system_client.post(
            "/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": f"F{i}"}]}, headers=FHIR
        )
    system_client.post(
        "/fhir/Organization", json={"resourceType": "Organization", "name": "Klinikk"}, headers=FHIR
    )
    type_history = system_client.get("/fhir/Patient/_history").json()
    assert len(type_history["entry"]) == 5
    seen: list[str] = []
    url: str | None = "/fhir/_history?_count=2"
    pages = 0
    while url:
        page = system_client.get(url.replace("http://testserver", "")).json()
        assert len(page.get("entry", [])) <= 2
        seen += [e["fullUrl"] for e in page.get("entry", [])]
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        url = nxt[0] if nxt else None
        pages += 1
    # System history holds the audit trail too (one AuditEvent per interaction, stored as resources).
    data = [u for u in seen if "/AuditEvent/" not in u]
    assert len(data) == 6 and len(set(seen)) == len(seen)
    assert pages == (len(seen) + 1) // 2
    assert data[0].split("/")[-2] == "Organization"  # newest first


def test_history_since(system_client: TestClient) -> None:
    system_client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR)
    bundle = system_client.get("/fhir/Patient/_history?_since=2999-01-01").json()
    assert bundle.get("entry", []) == []
    bundle = system_client.get("/fhir/Patient/_history?_since=2000-01-01T00:00:00Z").json()
    assert len(bundle["entry"]) == 1
    assert system_client.get("/fhir/_history?_since=yesterday").status_code == 400


def test_history_previous_link(system_client: TestClient) -> None:
    for _ in range(3):
        system_client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR)
    first = system_client.get("/fhir/Patient/_history?_count=1").json()
    second_url = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = system_client.get(second_url.replace("http://testserver", "")).json()
    prev_url = next(link["url"] for link in second["link"] if link["relation"] == "previous")
    back = system_client.get(prev_url.replace("http://testserver", "")).json()
    assert back["entry"][0]["fullUrl"] == first["entry"][0]["fullUrl"]
