"""Every operation of this server's own that ``/metadata`` lists resolves: its ``definition`` canonical
finds exactly one OperationDefinition on the server once the content pack is published
(``profiles/OperationDefinition-*.json``; https://hl7.org/fhir/R4/capabilitystatement.html,
https://hl7.org/fhir/R4/operationdefinition.html)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.server.published import PUBLISHED_TAG
from tests.fhir_r4_client import check_response
from tests.tokens import bearer

ROOT = Path(__file__).resolve().parents[2]
OURS = "http://fhir-norse.org/"
OPERATION_DEFINITION = "http://fhir-norse.org/fhir/OperationDefinition/"
FHIR = {"Content-Type": "application/fhir+json"}

# Not a vacuous pass: these are the operations of our own the CapabilityStatement lists today.
EXPECTED = {
    OPERATION_DEFINITION + "Patient-tailored-form",
    OPERATION_DEFINITION + "Patient-adaptive-state",
}


@pytest.fixture
def published(settings: Settings) -> Iterator[FastAPI]:
    """An app started on this checkout's content pack with publishing on (as a server starts)."""
    app = create_app(settings.model_copy(update={"publish_content": True, "content_dir": ROOT}))
    yield app
    app.state.service.storage.engine.dispose()


def own_operations(system_client: TestClient) -> list[tuple[str, dict[str, Any]]]:
    """(resource type, operation) for every listed operation whose definition is ours."""
    response = system_client.get("/fhir/metadata")
    assert response.status_code == 200, response.text
    return [
        (resource["type"], operation)
        for resource in response.json()["rest"][0]["resource"]
        for operation in resource.get("operation") or []
        if operation["definition"].startswith(OURS)
    ]


def test_every_own_operation_in_the_capability_statement_resolves(published: FastAPI) -> None:
    with TestClient(published, headers=bearer(published), raise_server_exceptions=False) as system_client:
        system_client.event_hooks["response"] = [check_response]
        listed = own_operations(system_client)
        assert {operation["definition"] for _, operation in listed} == EXPECTED
        for res_type, operation in listed:
            canonical = operation["definition"]
            found = system_client.get("/fhir/OperationDefinition", params={"url": canonical})
            assert found.status_code == 200, found.text
            entries = found.json().get("entry") or []
            assert len(entries) == 1, f"{canonical}: {len(entries)} OperationDefinitions"
            definition = entries[0]["resource"]
            assert definition["url"] == canonical
            assert definition["code"] == operation["name"]
            assert res_type in definition["resource"]
            assert definition["instance"] is True
            assert definition["affectsState"] is False
            assert PUBLISHED_TAG in definition["meta"]["tag"]


def test_published_operation_definitions_are_read_only(published: FastAPI) -> None:
    with TestClient(published, headers=bearer(published), raise_server_exceptions=False) as system_client:
        for canonical in sorted(EXPECTED):
            entries = (
                system_client.get("/fhir/OperationDefinition", params={"url": canonical}).json().get("entry")
            )
            assert entries, canonical
            stored = entries[0]["resource"]
            path = f"/fhir/OperationDefinition/{stored['id']}"
            changed = {**stored, "title": "changed"}
            assert system_client.put(path, json=changed, headers=FHIR).status_code == 405
            assert system_client.delete(path).status_code == 405
