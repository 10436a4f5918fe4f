"""Issue 12, items 5 and 24 (SQLite and PostgreSQL): published content cannot be shadowed, ``url|version``
names one canonical resource, a response that is stored but not scored says so, and a response without
``authored`` is accepted and dated by the time the server received it."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.auth.caller import Caller
from fhir_norse.config import Settings
from fhir_norse.outcomes import FhirError
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.resources import now_ms, stamp_meta
from tests.intake_support import (
    NF21_STATIC,
    NF21_STATIC_NEWEST,
    create_patient,
    nf21_answers,
    post_response,
    publish_questionnaires,
    questionnaire,
    response,
    search,
)
from tests.tokens import bearer

FHIR = {"Content-Type": "application/fhir+json"}
OUTCOME = {"Prefer": "return=OperationOutcome"}
NF21_URL, _, NF21_VERSION = NF21_STATIC.partition("|")
# Every published version of the static form (issue 13 added 2.2.0; a bare canonical takes the newest).
PUBLISHED_VERSIONS = [NF21_VERSION, NF21_STATIC_NEWEST.partition("|")[2]]
MOOD = "http://example.org/Questionnaire/mood"


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    application = create_app(settings)
    publish_questionnaires(application.state.service)
    yield application
    application.state.service.storage.engine.dispose()


def issues(answer: Any) -> list[dict[str, Any]]:
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome", body
    return list(body["issue"])


def refused(answer: Any, status: int, code: str, *words: str) -> None:
    """``answer`` is a ``status`` OperationOutcome whose first issue has ``code`` and names ``words``."""
    assert answer.status_code == status, answer.text
    first = issues(answer)[0]
    assert first["severity"] == "error" and first["code"] == code, first
    for word in words:
        assert word in first["diagnostics"], (word, first["diagnostics"])


def stored_forms(system_client: TestClient, url: str) -> list[dict[str, Any]]:
    return search(system_client, f"Questionnaire?url={url}")


def nf21_copy(**changes: Any) -> dict[str, Any]:
    """The published static form as a client would copy it (no id, no meta)."""
    body = copy.deepcopy(questionnaire(NF21_STATIC))
    body.pop("id", None)
    body.pop("meta", None)
    return {**body, **changes}


def mood(version: str | None = "1", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Questionnaire",
        "url": MOOD,
        "status": "active",
        "item": [{"linkId": "mood", "type": "string"}],
        **changes,
    }
    if version is not None:
        body["version"] = version
    return body


def bare(patient: str) -> dict[str, Any]:
    """A response naming the static form by its bare canonical (the newest version)."""
    newest = response(NF21_STATIC_NEWEST, nf21_answers(version="2.2.0"), patient=patient)
    return {**newest, "questionnaire": NF21_URL}


def store_bypassing_the_checks(service: FhirService, res_type: str, body: dict[str, Any]) -> None:
    """Store ``body`` as the code before these rules could (a shadow left in an existing database)."""
    with service.storage.write() as uow:
        moment = now_ms()
        stamped = stamp_meta(body, body["id"], 1, moment)
        uow.save(
            res_type=res_type,
            res_id=body["id"],
            body=stamped,
            version=1,
            last_updated=moment,
            method="create",
            previous=None,
            index_rows=service.kernel.extractor.extract(stamped),
        )


# --- item 5: published content ------------------------------------------------------------------------


def test_a_copy_of_a_published_form_is_refused(system_client: TestClient) -> None:
    """A second Questionnaire under nf21-static|2.1.0 would be what intake validates against."""
    answer = system_client.post("/fhir/Questionnaire", json=nf21_copy(), headers=FHIR)
    refused(answer, 409, "business-rule", NF21_URL, "published content")
    # A PUT under another id, and a copy that claims the published tag, are refused alike.
    answer = system_client.put("/fhir/Questionnaire/mine", json=nf21_copy(id="mine"), headers=FHIR)
    refused(answer, 409, "business-rule", "published content")
    forged = nf21_copy(
        meta={"tag": [{"system": "http://fhir-norse.org/fhir/CodeSystem/content-tags", "code": "published"}]}
    )
    refused(
        system_client.post("/fhir/Questionnaire", json=forged, headers=FHIR), 403, "forbidden", "published"
    )
    assert sorted(q["id"] for q in stored_forms(system_client, NF21_URL)) == [
        f"nf21-static-{v}" for v in PUBLISHED_VERSIONS
    ]
    assert system_client.get("/fhir/Questionnaire/mine").status_code == 404


def test_no_newer_version_of_a_published_url(system_client: TestClient) -> None:
    """A newer version would become what a bare canonical resolves to, and no mapping scores it."""
    newer = nf21_copy(version="2.9.0")
    refused(
        system_client.post("/fhir/Questionnaire", json=newer, headers=FHIR), 409, "business-rule", NF21_URL
    )
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": newer, "request": {"method": "POST", "url": "Questionnaire"}},
        ],
    }
    refused(system_client.post("/fhir", json=bundle, headers=FHIR), 409, "business-rule", "published content")
    assert search(system_client, "Patient") == []  # the whole transaction was rolled back
    assert sorted(q["version"] for q in stored_forms(system_client, NF21_URL)) == PUBLISHED_VERSIONS
    # The bare canonical still names the published form, and a response to it is scored.
    patient = create_patient(system_client)
    body = bare(patient)
    assert post_response(system_client, body).status_code == 201
    assert len(search(system_client, f"DiagnosticReport?subject=Patient/{patient}")) == 1


def test_a_client_resource_cannot_move_onto_a_published_url(system_client: TestClient) -> None:
    created = system_client.post("/fhir/Questionnaire", json=mood(), headers=FHIR)
    assert created.status_code == 201, created.text
    own = created.json()
    patch = [{"op": "replace", "path": "/url", "value": NF21_URL}]
    answer = system_client.patch(
        f"/fhir/Questionnaire/{own['id']}",
        json=patch,
        headers={"Content-Type": "application/json-patch+json"},
    )
    refused(answer, 409, "business-rule", "published content")
    moved = {**own, "url": NF21_URL, "version": "3.0.0"}
    refused(
        system_client.put(f"/fhir/Questionnaire/{own['id']}", json=moved, headers=FHIR), 409, "business-rule"
    )
    current = system_client.get(f"/fhir/Questionnaire/{own['id']}").json()
    assert current["url"] == MOOD and current["meta"]["versionId"] == "1"


def test_a_shadow_stored_before_the_rule_does_not_capture_the_bare_canonical(
    app: FastAPI, system_client: TestClient
) -> None:
    """A copy with a higher version that an older server let in: the pack's form still answers."""
    shadow = nf21_copy(id="shadow", version="9.0.0", item=[{"linkId": "x", "type": "string"}])
    store_bypassing_the_checks(app.state.service, "Questionnaire", shadow)
    patient = create_patient(system_client)
    answer = post_response(system_client, bare(patient), **OUTCOME)
    assert answer.status_code == 201, answer.text
    assert not [i for i in issues(answer) if "not scored" in i["diagnostics"]]
    reports = search(system_client, f"DiagnosticReport?subject=Patient/{patient}")
    assert len(reports) == 1
    # The shadow may be deleted (it is not published), and is refused if written again.
    assert system_client.delete("/fhir/Questionnaire/shadow").status_code == 204
    refused(system_client.put("/fhir/Questionnaire/shadow", json=shadow, headers=FHIR), 409, "business-rule")


# --- item 5: url|version is unique per canonical type -----------------------------------------------


def test_url_and_version_name_one_resource_per_type(system_client: TestClient) -> None:
    first = system_client.post("/fhir/Questionnaire", json=mood(), headers=FHIR)
    assert first.status_code == 201, first.text
    refused(
        system_client.post("/fhir/Questionnaire", json=mood(), headers=FHIR),
        409,
        "duplicate",
        f"{MOOD}|1",
        first.json()["id"],
    )
    refused(
        system_client.put("/fhir/Questionnaire/other", json=mood(id="other"), headers=FHIR), 409, "duplicate"
    )
    assert len(stored_forms(system_client, MOOD)) == 1
    # The resource itself may be updated; another version, or the same url on another type, is new.
    same = {**first.json(), "title": "Mood"}
    assert system_client.put(f"/fhir/Questionnaire/{same['id']}", json=same, headers=FHIR).status_code == 200
    assert system_client.post("/fhir/Questionnaire", json=mood("2"), headers=FHIR).status_code == 201
    value_set = {"resourceType": "ValueSet", "url": MOOD, "version": "1", "status": "active"}
    assert system_client.post("/fhir/ValueSet", json=value_set, headers=FHIR).status_code == 201
    refused(system_client.post("/fhir/ValueSet", json=value_set, headers=FHIR), 409, "duplicate")
    # Without a version, the url alone is the key among the versionless ones.
    assert system_client.post("/fhir/Questionnaire", json=mood(None), headers=FHIR).status_code == 201
    refused(
        system_client.post("/fhir/Questionnaire", json=mood(None), headers=FHIR),
        409,
        "duplicate",
        "without a version",
    )
    assert sorted(str(q.get("version")) for q in stored_forms(system_client, MOOD)) == ["1", "2", "None"]


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "CodeSystem", "status": "active", "content": "complete"},
        {"resourceType": "ConceptMap", "status": "active"},
    ],
    ids=lambda r: r["resourceType"],
)
def test_every_canonical_type_is_unique(system_client: TestClient, resource: dict[str, Any]) -> None:
    res_type = resource["resourceType"]
    body = {**resource, "url": "http://example.org/canonical/x", "version": "1.0"}
    assert system_client.post(f"/fhir/{res_type}", json=body, headers=FHIR).status_code == 201
    refused(system_client.post(f"/fhir/{res_type}", json=body, headers=FHIR), 409, "duplicate")
    assert len(search(system_client, f"{res_type}?url=http://example.org/canonical/x")) == 1


def test_concurrent_creates_of_one_canonical_make_one_resource(app: FastAPI) -> None:
    service: FhirService = app.state.service
    ctx = RequestContext(caller=Caller.operator(), base_url="http://testserver/fhir")
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4, timeout=30)

    def work() -> None:
        barrier.wait()
        try:
            status = service.create(ctx, "Questionnaire", mood()).status
        except FhirError as error:
            status = error.status
        with lock:
            statuses.append(status)

    with service.storage.read() as view:
        before = view.history_count(res_type="Questionnaire")
    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201, 409, 409, 409]
    with service.storage.read() as view:
        assert view.history_count(res_type="Questionnaire") == before + 1


def test_the_server_still_publishes_new_versions_of_its_pack(settings: Settings, tmp_path: Path) -> None:
    """Only the server writes a pack url: at start-up it publishes a new file beside the old version."""
    url = "http://fhir-norse.org/fhir/Questionnaire/check-in"
    form = {"resourceType": "Questionnaire", "id": "check-in", "url": url, "status": "active"}
    folder = tmp_path / "questionnaires" / "pack"
    folder.mkdir(parents=True)
    (folder / "v1.json").write_text(json.dumps({**form, "version": "1.0.0"}))

    def started() -> FastAPI:
        return create_app(settings.model_copy(update={"publish_content": True, "content_dir": tmp_path}))

    first = started()
    with TestClient(first, headers=bearer(first)) as client:
        refused(
            client.post("/fhir/Questionnaire", json={**form, "version": "1.1.0"}, headers=FHIR),
            409,
            "business-rule",
        )
    first.state.service.storage.engine.dispose()
    (folder / "v2.json").write_text(json.dumps({**form, "version": "1.1.0"}))
    again = started()
    with TestClient(again, headers=bearer(again)) as client:
        found = client.get(f"/fhir/Questionnaire?url={url}").json()
        assert sorted(e["resource"]["version"] for e in found["entry"]) == ["1.0.0", "1.1.0"]
        # Each publication is in the operator's audit trail.
        events = client.get("/fhir/AuditEvent?entity=Questionnaire/check-in-1.1.0").json()
        assert len(events.get("entry", [])) == 1
    again.state.service.storage.engine.dispose()


# --- item 5: a response that is stored but not scored says so ------------------------------------------


def test_a_response_to_a_form_no_mapping_scores_is_stored_with_a_warning(system_client: TestClient) -> None:
    assert system_client.post("/fhir/Questionnaire", json=mood(), headers=FHIR).status_code == 201
    patient = create_patient(system_client)
    body = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{MOOD}|1",
        "status": "completed",
        "subject": {"reference": f"Patient/{patient}"},
        "authored": "2026-03-02T09:00:00Z",
        "item": [{"linkId": "mood", "answer": [{"valueString": "fine"}]}],
    }
    answer = post_response(system_client, body, **OUTCOME)
    assert answer.status_code == 201, answer.text
    warnings = [i for i in issues(answer) if i["severity"] == "warning"]
    assert [i["diagnostics"] for i in warnings] == [f"not scored: no scoring mapping for {MOOD}|1"]
    assert search(system_client, "Observation") == [] and search(system_client, "QuestionnaireResponse")
    # In a transaction the entry's outcome carries it.
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": body, "request": {"method": "POST", "url": "QuestionnaireResponse"}}],
    }
    entry = system_client.post("/fhir", content=orjson.dumps(bundle), headers=FHIR).json()["entry"][0]
    assert "not scored: no scoring mapping" in entry["response"]["outcome"]["issue"][0]["diagnostics"]


def test_an_in_progress_response_says_it_was_not_scored(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    body = response(NF21_STATIC, nf21_answers(), patient=patient, status="in-progress")
    answer = post_response(system_client, body, **OUTCOME)
    assert answer.status_code == 201, answer.text
    warning = next(i for i in issues(answer) if i["severity"] == "warning")
    assert warning["diagnostics"].startswith("not scored: the response is in-progress")
    assert warning["expression"] == ["QuestionnaireResponse.status"]
    assert search(system_client, f"Observation?subject=Patient/{patient}") == []


# --- item 24: authored is optional -------------------------------------------------------------------


def test_a_response_without_authored_is_dated_by_its_arrival(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    body = response(NF21_STATIC, nf21_answers({"sad": 6}), patient=patient)
    del body["authored"]
    answer = post_response(system_client, body, **OUTCOME)
    assert answer.status_code == 201, answer.text
    stored = system_client.get("/fhir/" + answer.headers["Location"].split("/fhir/", 1)[1]).json()
    received = stored["meta"]["lastUpdated"]
    assert "authored" not in stored  # kept as sent
    warning = next(i for i in issues(answer) if i["severity"] == "warning")
    assert warning["expression"] == ["QuestionnaireResponse.authored"]
    assert "authored is absent" in warning["diagnostics"] and received in warning["diagnostics"]
    observations = search(system_client, f"Observation?subject=Patient/{patient}")
    assert observations and {o["effectiveDateTime"] for o in observations} == {received}
    report = search(system_client, f"DiagnosticReport?subject=Patient/{patient}")[0]
    assert report["effectiveDateTime"] == received

    # An amendment without authored keeps the time of the first scoring; its scores change.
    amended = {
        **stored,
        "status": "amended",
        "item": response(NF21_STATIC, nf21_answers({"sad": 2}), patient=patient)["item"],
    }
    again = system_client.put(
        f"/fhir/QuestionnaireResponse/{stored['id']}",
        content=orjson.dumps(amended),
        headers={**FHIR, **OUTCOME},
    )
    assert again.status_code == 200, again.text
    assert any(received in i["diagnostics"] for i in issues(again) if i["severity"] == "warning")
    sad = search(
        system_client,
        f"Observation?subject=Patient/{patient}&code=http://fhir-norse.org/fhir/CodeSystem/nf21-scales|sad",
    )
    assert [(o["status"], o["effectiveDateTime"], o["valueQuantity"]["value"]) for o in sad] == [
        ("amended", received, 2)
    ]


def test_the_time_received_orders_a_response_after_earlier_ones(system_client: TestClient) -> None:
    """Change is computed against the administrations before the time the server received it."""
    patient = create_patient(system_client)
    first = response(NF21_STATIC, nf21_answers({"sad": 2}), patient=patient, authored="2020-01-05T09:00:00Z")
    assert post_response(system_client, first).status_code == 201
    later = response(NF21_STATIC, nf21_answers({"sad": 7}), patient=patient)
    del later["authored"]
    assert post_response(system_client, later).status_code == 201
    sad = search(
        system_client,
        f"Observation?subject=Patient/{patient}&code=http://fhir-norse.org/fhir/CodeSystem/nf21-scales|sad",
    )
    newest = max(sad, key=lambda o: str(o["effectiveDateTime"]))
    assert newest["valueQuantity"]["value"] == 7
    codes = {c["code"]["coding"][0]["code"] for c in newest["component"]}
    assert "rc-previous" in codes  # compared with the first administration
