"""The read and search routes matched ahead of the route table (:class:`fhir_norse.api.routes.HotRoutes`):
they answer exactly as the documented routes do, take only what is theirs, and leave the OpenAPI
document as it was (issue 14)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Match

from fhir_norse.api.routes import HotRoutes

FHIR = {"Content-Type": "application/fhir+json"}


def _scope(method: str, path: str) -> dict[str, object]:
    return {"type": "http", "method": method, "path": path, "root_path": "", "path_params": {}}


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("GET", "/fhir/Observation/o-1", {"res_type": "Observation", "res_id": "o-1"}),
        ("GET", "/fhir/Patient", {"res_type": "Patient"}),
        ("GET", "/fhir/Observation/$lastn", None),  # an operation
        ("GET", "/fhir/Observation/_history", None),
        ("GET", "/fhir/Observation/o-1/_history", None),
        ("GET", "/fhir/Observation/o-1/$everything", None),
        ("GET", "/fhir/metadata", None),
        ("GET", "/fhir/NotAType/1", None),
        ("GET", "/fhir/Observation/", None),
        ("GET", "/fhir/Observation/bad id", None),
        ("GET", "/fhir", None),
        ("POST", "/fhir/Observation", None),
        ("HEAD", "/fhir/Observation/o-1", None),
        ("PUT", "/fhir/Observation/o-1", None),
        ("GET", "/auth/Observation/o-1", None),
    ],
)
def test_only_reads_and_searches_of_a_known_type_match(
    method: str, path: str, params: dict[str, str] | None
) -> None:
    match, child = HotRoutes().matches(_scope(method, path))
    if params is None:
        assert match is Match.NONE
    else:
        assert match is Match.FULL
        assert child["path_params"] == params


def test_the_hot_route_comes_first(app: FastAPI) -> None:
    assert isinstance(app.router.routes[0], HotRoutes)


def test_read_and_search_answer_as_before(system_client: TestClient) -> None:
    created = system_client.post(
        "/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Hot"}]}, headers=FHIR
    )
    assert created.status_code == 201
    pid = created.json()["id"]
    read = system_client.get(f"/fhir/Patient/{pid}")
    assert read.status_code == 200
    assert read.json()["id"] == pid
    assert read.headers["etag"] == 'W/"1"'
    assert read.headers["content-type"].startswith("application/fhir+json")
    assert "x-request-id" in read.headers
    # Conditional read through the same endpoint: 304.
    assert system_client.get(f"/fhir/Patient/{pid}", headers={"If-None-Match": 'W/"1"'}).status_code == 304
    found = system_client.get("/fhir/Patient", params={"family": "Hot"})
    assert found.status_code == 200
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [pid]
    # Errors are OperationOutcomes from the same handlers.
    missing = system_client.get("/fhir/Patient/nope")
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"
    bad = system_client.get(
        "/fhir/Patient", params={"no-such-param": "x"}, headers={"Prefer": "handling=strict"}
    )
    assert bad.status_code == 400
    assert bad.json()["resourceType"] == "OperationOutcome"


def test_a_read_without_a_token_is_refused(app: FastAPI) -> None:
    with TestClient(app, raise_server_exceptions=False) as anonymous:
        answer = anonymous.get("/fhir/Patient/p-1")
        assert answer.status_code == 401
        assert "www-authenticate" in answer.headers
        assert anonymous.get("/fhir/Patient").status_code == 401


def test_what_the_hot_route_leaves_goes_on_to_the_route_table(system_client: TestClient) -> None:
    assert system_client.get("/fhir/metadata").json()["resourceType"] == "CapabilityStatement"
    history = system_client.get("/fhir/Patient/_history")
    assert history.status_code == 200
    assert history.json()["type"] == "history"
    assert system_client.get("/fhir/NotAType/1").status_code == 404
    assert system_client.get("/fhir/Patient/bad%20id").status_code == 400
