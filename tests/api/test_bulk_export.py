"""Bulk Data Access 2.0 ``$export`` (https://hl7.org/fhir/uv/bulkdata/STU2/export.html) over HTTP, on SQLite
and PostgreSQL.

The client here is written from the IG: kick-off (``Prefer: respond-async``), poll the
``Content-Location`` until 200, download every file of the manifest with the bearer token, and parse every
line with the independent R4 parser (fhirclient). Jobs run when the test runs the app's export worker
(``run_pending``: no background thread in tests). What an export holds is compared with what the
equivalent searches return.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.server.bulk.exporter import snapshot
from fhir_norse.server.bulk.jobs import JobStore
from fhir_norse.server.bulk.worker import BulkExportWorker
from fhir_norse.store.bulk_tables import BULK_EXPORT_JOB
from tests.fhir_r4_client import check_response, parse_r4
from tests.tokens import bearer

FHIR = {"Content-Type": "application/fhir+json"}
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
BASE = "http://testserver/fhir"
LOINC = "http://loinc.org"


@pytest.fixture
def bulk_settings(settings: Settings, tmp_path: Path) -> Settings:
    # Two lines per file, so that the splitting of a type into several files is exercised.
    return settings.model_copy(
        update={"bulk_export_dir": tmp_path / "bulk", "bulk_file_lines": 2, "bulk_snapshot_grace_s": 0.0}
    )


@pytest.fixture
def bulk_app(bulk_settings: Settings) -> Iterator[FastAPI]:
    application = create_app(bulk_settings)
    yield application
    application.state.service.storage.engine.dispose()


@pytest.fixture
def client(bulk_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(bulk_app, raise_server_exceptions=False) as test_client:
        test_client.headers.update(bearer(bulk_app))
        test_client.event_hooks["response"] = [check_response]
        yield test_client


# ---------------------------------------------------------------------- a client written from the IG


def kick_off(client: TestClient, path: str, params: Any = None, **headers: str) -> str:
    """The kick-off request; the status URL (Content-Location) of the 202."""
    response = client.get(f"/fhir/{path}", params=params, headers={**ASYNC, **headers})
    assert response.status_code == 202, response.text
    location = str(response.headers["content-location"])
    assert location.startswith(f"{BASE}/")
    return location


def finish(app: FastAPI, client: TestClient, status_url: str) -> dict[str, Any]:
    """Poll until the manifest comes (running the app's export worker in between)."""
    for _ in range(3):
        response = client.get(status_url)
        if response.status_code == 200:
            assert response.headers["content-type"].startswith("application/json")
            assert "expires" in response.headers
            manifest: dict[str, Any] = response.json()
            return manifest
        assert response.status_code == 202, response.text
        assert response.headers["x-progress"]
        assert int(response.headers["retry-after"]) > 0
        worker: BulkExportWorker = app.state.bulk_export
        worker.run_pending()
    raise AssertionError("the export did not finish")


def download(client: TestClient, manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every output file's resources by type, each line parsed as R4."""
    assert manifest["requiresAccessToken"] is True
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in manifest["output"]:
        response = client.get(entry["url"])
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/fhir+ndjson")
        lines = response.content.decode().splitlines()
        assert len(lines) == entry["count"] > 0
        for line in lines:
            resource = orjson.loads(line)
            parse_r4(resource)
            assert resource["resourceType"] == entry["type"]
            out.setdefault(entry["type"], []).append(resource)
    return out


def export(
    app: FastAPI, client: TestClient, path: str, params: Any = None
) -> dict[str, list[dict[str, Any]]]:
    return download(client, finish(app, client, kick_off(client, path, params)))


def keys(resources: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(r["id"], r["meta"]["versionId"]) for r in resources}


def search(client: TestClient, query: str) -> set[tuple[str, str]]:
    """Every match of a search, all pages."""
    found: set[tuple[str, str]] = set()
    url: str | None = f"/fhir/{query}"
    while url:
        bundle = client.get(url).json()
        found |= {(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in bundle.get("entry", [])}
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return found


# ---------------------------------------------------------------------- data


def create(client: TestClient, resource: dict[str, Any]) -> str:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def observation(patient: str, code: str, status: str = "final") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


def seed(client: TestClient) -> dict[str, str]:
    """Three patients with Observations, a Practitioner (no patient's), and a Group of two of them (one
    inactive)."""
    ids = {name: create(client, {"resourceType": "Patient", "name": [{"family": name}]}) for name in "abc"}
    for name, patient in ids.items():
        create(client, observation(patient, "8867-4"))
        create(client, observation(patient, "9279-1", "preliminary" if name == "b" else "final"))
    ids["doc"] = create(client, {"resourceType": "Practitioner", "name": [{"family": "Berg"}]})
    ids["group"] = create(
        client,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [
                {"entity": {"reference": f"Patient/{ids['a']}"}},
                {"entity": {"reference": f"Patient/{ids['b']}"}, "inactive": True},
            ],
        },
    )
    return ids


# ---------------------------------------------------------------------- the tests


def test_system_export_holds_what_search_finds_in_split_files(
    bulk_app: FastAPI, client: TestClient, bulk_settings: Settings
) -> None:
    ids = seed(client)
    status_url = kick_off(client, "$export")
    queued = client.get(status_url)
    assert queued.status_code == 202 and queued.headers["x-progress"] == "queued"
    manifest = finish(bulk_app, client, status_url)
    assert manifest["request"] == f"{BASE}/$export"
    assert manifest["error"] == []
    exported = download(client, manifest)
    for res_type in ("Patient", "Observation", "Practitioner", "Group"):
        assert keys(exported[res_type]) == search(client, f"{res_type}?_count=100"), res_type
    # Six Observations, two lines per file: three files.
    assert [e["count"] for e in manifest["output"] if e["type"] == "Observation"] == [2, 2, 2]
    assert "AuditEvent" not in exported
    # The manifest's instant is no earlier than the last write exported.
    moment = datetime.fromisoformat(manifest["transactionTime"])
    assert all(datetime.fromisoformat(p["meta"]["lastUpdated"]) <= moment for p in exported["Patient"])
    # Files need the token (the IG's requiresAccessToken); the kick-off and each download are audited.
    anonymous = client.get(manifest["output"][0]["url"], headers={"Authorization": ""})
    assert anonymous.status_code == 401
    audits = client.get("/fhir/AuditEvent", params={"subtype": "urn:fhir-norse:operation|export"}).json()
    assert len(audits.get("entry", [])) == 1 + len(manifest["output"])
    assert ids["doc"] in {p["id"] for p in exported["Practitioner"]}


def test_patient_and_group_exports_hold_the_compartments_of_their_patients(
    bulk_app: FastAPI, client: TestClient
) -> None:
    ids = seed(client)
    everyone = export(bulk_app, client, "Patient/$export")
    assert set(everyone) == {"Patient", "Observation", "Group"}
    assert keys(everyone["Observation"]) == search(client, "Observation?_count=100")
    group = export(bulk_app, client, f"Group/{ids['group']}/$export")
    # Only the active member's compartment (and the Group, which names her).
    assert {p["id"] for p in group["Patient"]} == {ids["a"]}
    assert keys(group["Observation"]) == search(client, f"Observation?subject=Patient/{ids['a']}")
    assert [g["id"] for g in group["Group"]] == [ids["group"]]
    assert client.get("/fhir/Group/unknown/$export", headers=ASYNC).status_code == 404


def test_type_since_and_type_filter_select_exactly_what_the_searches_select(
    bulk_app: FastAPI, client: TestClient
) -> None:
    ids = seed(client)
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    late = create(client, observation(ids["c"], "8867-4", "amended"))
    create(client, {"resourceType": "Patient", "name": [{"family": "late"}]})
    params = [
        ("_type", "Observation"),
        ("_type", "Patient"),
        ("_since", since),
        ("_outputFormat", "application/ndjson"),
    ]
    newer = export(bulk_app, client, "$export", params)
    assert keys(newer["Observation"]) == search(client, f"Observation?_lastUpdated=gt{since}")
    assert keys(newer["Patient"]) == search(client, f"Patient?_lastUpdated=gt{since}")
    assert late in {o["id"] for o in newer["Observation"]}
    # Two filters of one type are alternatives; the comma inside the first is an OR of codes.
    filters = f"Observation?status=final&code={LOINC}|8867-4,{LOINC}|9279-1,Observation?status=amended"
    filtered = export(
        bulk_app, client, "$export", {"_type": "Observation,Practitioner", "_typeFilter": filters}
    )
    expected = search(client, "Observation?status=final&code=8867-4,9279-1") | search(
        client, "Observation?status=amended"
    )
    assert keys(filtered["Observation"]) == expected
    assert set(filtered) == {"Observation", "Practitioner"}
    # POST with a Parameters body, and an unsupported parameter ignored under handling=lenient.
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueString": "Observation"},
            {"name": "_typeFilter", "valueString": "Observation?status=preliminary"},
            {"name": "includeAssociatedData", "valueCode": "LatestProvenanceResources"},
        ],
    }
    response = client.post(
        "/fhir/$export", json=body, headers={**ASYNC, **FHIR, "Prefer": "respond-async, handling=lenient"}
    )
    assert response.status_code == 202, response.text
    manifest = finish(bulk_app, client, response.headers["content-location"])
    assert manifest["request"] == f"{BASE}/$export"
    assert keys(download(client, manifest)["Observation"]) == search(client, "Observation?status=preliminary")
    [error] = manifest["error"]
    outcome = orjson.loads(client.get(error["url"]).content.splitlines()[0])
    assert parse_r4(outcome) and "includeAssociatedData" in outcome["issue"][0]["diagnostics"]


# (path, parameters, headers, status): each refused with an OperationOutcome.
BAD_KICK_OFFS: list[tuple[str, dict[str, str] | None, dict[str, str], int]] = [
    ("$export", None, {"Prefer": "return=minimal"}, 400),
    ("$export", None, {"Accept": "text/csv"}, 406),
    ("$export", {"_outputFormat": "text/csv"}, {}, 400),
    ("$export", {"patient": "Patient/1"}, {}, 400),
    ("$export", {"_elements": "id"}, {}, 400),
    ("$export", {"_type": "Foo"}, {}, 400),
    ("$export", {"_type": "AuditEvent"}, {}, 400),
    ("Patient/$export", {"_type": "Practitioner"}, {}, 400),
    ("$export", {"_since": "yesterday"}, {}, 400),
    ("$export", {"_typeFilter": "Observation?_sort=date"}, {}, 400),
    ("$export", {"_typeFilter": "Observation?nonsense=1"}, {}, 400),
    ("$export", {"_type": "Patient", "_typeFilter": "Observation?status=final"}, {}, 400),
]


def test_bad_kick_offs_answer_an_operation_outcome(bulk_app: FastAPI, client: TestClient) -> None:
    for path, params, headers, status in BAD_KICK_OFFS:
        response = client.get(f"/fhir/{path}", params=params, headers={**ASYNC, **headers})
        assert response.status_code == status, (path, params, headers, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    # Each refusal is audited, and none queued a job.
    audits = client.get("/fhir/AuditEvent", params={"subtype": "urn:fhir-norse:operation|export"}).json()
    assert len(audits["entry"]) == len(BAD_KICK_OFFS)
    assert {e["resource"]["outcome"] for e in audits["entry"]} == {"4"}
    with bulk_app.state.service.storage.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(BULK_EXPORT_JOB)).scalar_one() == 0


def test_only_backend_services_with_scopes_for_the_types_may_export(
    bulk_app: FastAPI, client: TestClient
) -> None:
    ids = seed(client)
    patient_token = bearer(bulk_app, "patient/*.rs", patient=ids["a"])
    assert client.get("/fhir/Patient/$export", headers={**ASYNC, **patient_token}).status_code == 403
    assert (
        client.get(f"/fhir/Group/{ids['group']}/$export", headers={**ASYNC, **patient_token}).status_code
        == 403
    )
    narrow = bearer(bulk_app, "system/Patient.rs")
    refused = client.get("/fhir/$export", params={"_type": "Observation"}, headers={**ASYNC, **narrow})
    assert refused.status_code == 403
    # Without _type: only what the scopes allow.
    accepted = client.get("/fhir/$export", headers={**ASYNC, **narrow})
    assert accepted.status_code == 202
    manifest = finish(bulk_app, client, accepted.headers["content-location"])
    assert {e["type"] for e in manifest["output"]} == {"Patient"}
    # (The files belong to the job's client, test-operator, which both tokens name.)


def test_another_client_cannot_see_a_job_and_a_cancelled_job_is_gone(
    bulk_app: FastAPI, client: TestClient, bulk_settings: Settings
) -> None:
    seed(client)
    status_url = kick_off(client, "$export")
    manifest = finish(bulk_app, client, status_url)
    job_folder = bulk_settings.bulk_export_dir / status_url.rsplit("/", 1)[1]
    assert job_folder.is_dir()
    token, _ = bulk_app.state.token_service.issue(
        subject="other", client_id="other-client", scope="system/*.rs", audience=BASE
    )
    other = {"Authorization": f"Bearer {token}"}
    file_url = manifest["output"][0]["url"]
    assert client.get(status_url, headers=other).status_code == 404
    assert client.get(file_url, headers=other).status_code == 404
    assert client.delete(status_url, headers=other).status_code == 404
    assert client.get(file_url).status_code == 200
    cancelled = client.delete(status_url)
    assert cancelled.status_code == 202, cancelled.text
    assert client.get(status_url).status_code == 404
    assert client.get(file_url).status_code == 404
    assert client.delete(status_url).status_code == 404
    assert not job_folder.exists()


def test_an_expired_export_answers_404_and_the_sweep_deletes_its_files(
    bulk_app: FastAPI, client: TestClient, bulk_settings: Settings
) -> None:
    seed(client)
    status_url = kick_off(client, "$export", {"_type": "Patient"})
    manifest = finish(bulk_app, client, status_url)
    job_id = status_url.rsplit("/", 1)[1]
    worker: BulkExportWorker = bulk_app.state.bulk_export
    assert worker.jobs.sweep() == 0
    engine: sa.Engine = bulk_app.state.service.storage.engine
    with engine.begin() as conn:
        conn.execute(
            sa.update(BULK_EXPORT_JOB)
            .where(BULK_EXPORT_JOB.c.id == job_id)
            .values(expires_at=datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=1))
        )
    assert client.get(status_url).status_code == 404
    assert client.get(manifest["output"][0]["url"]).status_code == 404
    assert worker.jobs.sweep() == 1
    assert not (bulk_settings.bulk_export_dir / job_id).exists()


def test_a_job_whose_worker_died_is_started_over_once_its_lease_expires(
    bulk_app: FastAPI, client: TestClient
) -> None:
    seed(client)
    status_url = kick_off(client, "$export", {"_type": "Observation"})
    job_id = status_url.rsplit("/", 1)[1]
    service = bulk_app.state.service
    running: BulkExportWorker = bulk_app.state.bulk_export
    # A worker in another process claims the job, then dies before it finishes.
    dead = JobStore(service.storage, running.config)
    claimed = dead.claim("dead-worker")
    assert claimed is not None and claimed.id == job_id
    assert running.run_pending() == 0  # its lease is still held
    assert client.get(status_url).status_code == 202
    with service.storage.engine.begin() as conn:
        conn.execute(
            sa.update(BULK_EXPORT_JOB)
            .where(BULK_EXPORT_JOB.c.id == job_id)
            .values(lease_expires_at=datetime(2000, 1, 1))
        )
    manifest = finish(bulk_app, client, status_url)
    assert keys(download(client, manifest)["Observation"]) == search(client, "Observation?_count=100")
    job = running.jobs.get(job_id)
    assert job is not None and job.attempts == 2
    # The dead worker, were it only slow, can no longer record anything for the job.
    assert not dead.renew(claimed, "dead-worker", "Observation: 1/6 resources")


def test_the_snapshot_leaves_out_what_is_written_after_it(bulk_app: FastAPI, client: TestClient) -> None:
    seed(client)
    service = bulk_app.state.service
    count = sa.text("SELECT count(*) FROM resource WHERE res_type = 'Patient'")
    with snapshot(service.storage, 0.0) as (conn, moment):
        before = conn.execute(count).scalar_one()
        late = client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR).json()
        assert conn.execute(count).scalar_one() == before
    assert datetime.fromisoformat(late["meta"]["lastUpdated"]).replace(tzinfo=None) > moment


def test_the_capability_statement_lists_the_export_operations(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").json()
    assert statement["instantiates"] == ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"]
    ig = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/"
    rest = statement["rest"][0]
    assert {"name": "export", "definition": ig + "export"}.items() <= rest["operation"][0].items()
    by_type = {r["type"]: {o["definition"] for o in r.get("operation", [])} for r in rest["resource"]}
    assert ig + "patient-export" in by_type["Patient"]
    assert ig + "group-export" in by_type["Group"]
