"""Issue 12 (hardening), the items fixed so far, each failing on the code before the fix (SQLite and
PostgreSQL): forged AuditEvents, Patients created by patient tokens, 500s on out-of-range dates and
version numbers, and the API documentation in production."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from tests.tokens import bearer

FHIR = {"Content-Type": "application/fhir+json"}
EVENT = {
    "resourceType": "AuditEvent",
    "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
    "recorded": "2026-01-01T00:00:00Z",
    "agent": [{"requestor": True, "who": {"display": "someone"}}],
    "source": {"observer": {"display": "elsewhere"}},
}


def _patient(system_client: TestClient) -> str:
    answer = system_client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def test_no_caller_can_write_an_audit_event(app: FastAPI, system_client: TestClient) -> None:
    """Item 4: only the server writes AuditEvents (system and patient tokens alike, REST and Bundles)."""
    patient = _patient(system_client)
    forged = {**EVENT, "entity": [{"what": {"reference": f"Patient/{patient}"}}]}
    assert system_client.post("/fhir/AuditEvent", json=forged, headers=FHIR).status_code == 405
    token = {**bearer(app, "patient/*.cruds", patient=patient), **FHIR}
    assert system_client.post("/fhir/AuditEvent", json=forged, headers=token).status_code in (403, 405)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": forged, "request": {"method": "POST", "url": "AuditEvent"}}],
    }
    assert system_client.post("/fhir", json=bundle, headers=FHIR).status_code == 405
    listed = system_client.get(f"/fhir/AuditEvent?entity=Patient/{patient}&agent-name=someone").json()
    assert "entry" not in listed or all(
        e["resource"]["agent"][0].get("who", {}).get("display") != "someone" for e in listed["entry"]
    )


def test_a_patient_token_creates_no_patient(app: FastAPI, system_client: TestClient) -> None:
    """Item 3: a patient app acts for its patient; it cannot make new ones."""
    patient = _patient(system_client)
    token = {**bearer(app, "patient/*.cruds", patient=patient), **FHIR}
    refused = system_client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=token)
    assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("query", ["date=ge9999-12-31T23:59:59-14:00", "date=le0001-01-01T00:00:00%2B14:00"])
def test_dates_at_the_edge_of_time_are_searched_not_500(system_client: TestClient, query: str) -> None:
    """Item 13: a valid dateTime whose zone shifts it past the representable years matches nothing."""
    answer = system_client.get(f"/fhir/Observation?{query}")
    assert answer.status_code == 200, answer.text
    assert "entry" not in answer.json()


def test_a_version_number_too_large_is_not_found(system_client: TestClient) -> None:
    """Item 14: ``_history/<20 digits>`` names no version (404), it is not a database overflow (500)."""
    patient = _patient(system_client)
    for version in ("99999999999999999999999", "2147483648", "0"):
        answer = system_client.get(f"/fhir/Patient/{patient}/_history/{version}")
        assert answer.status_code == 404, (version, answer.text)
    assert system_client.get(f"/fhir/Patient/{patient}/_history/1").status_code == 200


@pytest.fixture
def production(tmp_path: Path) -> Iterator[FastAPI]:
    """A production-mode app on a database of its own (its signing key needs its own passphrase)."""
    url = f"sqlite:///{tmp_path / 'production.sqlite3'}"
    engine = create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    local = Settings(
        database_url=url,
        mode="production",
        key_passphrase=SecretStr("a long hospital-specific test secret"),
        publish_content=False,
    )
    application = create_app(local)
    yield application
    application.state.service.storage.engine.dispose()


def test_the_api_documentation_is_off_in_production(production: FastAPI, app: FastAPI) -> None:
    """Item 9: ``/docs`` and ``/openapi.json`` are a development aid."""
    with TestClient(production) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 404
    with TestClient(app) as client:
        assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("query", ["name=a%00b", "name%00x=a", "identifier=urn:x%7C%01"])
def test_a_control_character_in_a_search_is_a_400(system_client: TestClient, query: str) -> None:
    """Item 15: a NUL (or another control character) in a search answers 400, not a PostgreSQL 500."""
    answer = system_client.get(f"/fhir/Patient?{query}")
    assert answer.status_code == 400, answer.text
    assert answer.json()["resourceType"] == "OperationOutcome"
    posted = system_client.post(
        "/fhir/Patient/_search",
        content=query.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert posted.status_code == 400, posted.text
