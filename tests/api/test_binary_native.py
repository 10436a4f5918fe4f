"""A Binary in its own format: ``GET Binary/<id>`` with an Accept header naming its content type answers the
bytes themselves (https://hl7.org/fhir/R4/binary.html#rest), as an EHR fetching a report's
``presentedForm`` URL expects; every other Accept (FHIR JSON, ``*/*``) keeps the FHIR resource."""

from __future__ import annotations

import base64

from fastapi.testclient import TestClient

PDF = b"%PDF-1.7\n% a tiny stand-in for a report\n%%EOF\n"


def _binary(client: TestClient) -> str:
    created = client.post(
        "/fhir/Binary",
        json={
            "resourceType": "Binary",
            "contentType": "application/pdf",
            "data": base64.b64encode(PDF).decode(),
        },
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def test_a_binary_is_read_natively_only_when_its_type_is_asked_for(system_client: TestClient) -> None:
    binary = _binary(system_client)
    native = system_client.get(f"/fhir/Binary/{binary}", headers={"Accept": "application/pdf"})
    assert native.status_code == 200 and native.content == PDF
    assert native.headers["content-type"] == "application/pdf" and native.headers.get("etag")
    wildcard = system_client.get(f"/fhir/Binary/{binary}", headers={"Accept": "application/*"})
    assert wildcard.content == PDF
    for accept in ("application/fhir+json", "*/*", "application/json, application/pdf"):
        resource = system_client.get(f"/fhir/Binary/{binary}", headers={"Accept": accept})
        assert resource.status_code == 200 and resource.json()["resourceType"] == "Binary", accept
    other = system_client.get(f"/fhir/Binary/{binary}", headers={"Accept": "image/png"})
    assert other.json()["resourceType"] == "Binary"
