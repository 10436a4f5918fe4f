"""SMART on FHIR authorization over HTTP: tokens, scopes, patient compartments, care teams.

https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html. Every test runs on
SQLite and PostgreSQL. A refused patient-context access answers 404, as for a resource that
does not exist, so a patient app cannot probe for other patients' data.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.fhir_r4_client import check_response
from tests.tokens import bearer

FHIR = {"Content-Type": "application/fhir+json"}
LOINC = "http://loinc.org"


def obs(patient: str, code: str = "44261-6", performer: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2024-05-01T10:00:00Z",
    }
    if performer:
        body["performer"] = [{"reference": performer}]
    return body


@pytest.fixture
def world(system_client: TestClient) -> dict[str, str]:
    """Two patients with one Observation each, a practitioner in Sonja's care team, another outside it."""
    for pid in ("sonja", "harald"):
        assert (
            system_client.put(
                f"/fhir/Patient/{pid}", json={"resourceType": "Patient", "id": pid}, headers=FHIR
            ).status_code
            == 201
        )
    for prid in ("therapist", "stranger"):
        system_client.put(
            f"/fhir/Practitioner/{prid}", json={"resourceType": "Practitioner", "id": prid}, headers=FHIR
        )
    sonja_obs = system_client.post(
        "/fhir/Observation", json=obs("sonja", performer="Practitioner/therapist"), headers=FHIR
    ).json()["id"]
    harald_obs = system_client.post("/fhir/Observation", json=obs("harald"), headers=FHIR).json()["id"]
    system_client.post(
        "/fhir/CareTeam",
        headers=FHIR,
        json={
            "resourceType": "CareTeam",
            "status": "active",
            "subject": {"reference": "Patient/sonja"},
            "participant": [{"member": {"reference": "Practitioner/therapist"}}],
        },
    )
    system_client.post(
        "/fhir/Questionnaire",
        headers=FHIR,
        json={"resourceType": "Questionnaire", "status": "active", "url": "http://example.org/q"},
    )
    return {"sonja_obs": sonja_obs, "harald_obs": harald_obs}


def as_token(app: FastAPI, scope: str, **context: str) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False, headers=bearer(app, scope, **context)) as c:
        c.event_hooks["response"] = [check_response]
        yield c


@pytest.fixture
def sonja(app: FastAPI) -> Iterator[TestClient]:
    yield from as_token(app, "patient/*.cruds", patient="sonja")


@pytest.fixture
def therapist(app: FastAPI) -> Iterator[TestClient]:
    yield from as_token(app, "user/*.cruds", practitioner="therapist")


@pytest.fixture
def stranger(app: FastAPI) -> Iterator[TestClient]:
    yield from as_token(app, "user/*.cruds", practitioner="stranger")


def ids(bundle: dict[str, Any], mode: str = "match") -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode}


# --- tokens ------------------------------------------------------------------------------------


def test_public_endpoints_need_no_token(app: FastAPI) -> None:
    with TestClient(app) as anonymous:
        assert anonymous.get("/fhir/metadata").status_code == 200
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/.well-known/smart-configuration").status_code == 200
        assert anonymous.get("/.well-known/jwks.json").status_code == 200


def test_missing_bad_and_expired_tokens_get_401(app: FastAPI) -> None:
    with TestClient(app) as anonymous:
        missing = anonymous.get("/fhir/Patient")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        assert missing.json()["resourceType"] == "OperationOutcome"
        good = bearer(app)["Authorization"]
        tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
        bad = anonymous.get("/fhir/Patient", headers={"Authorization": tampered})
        assert bad.status_code == 401
        assert 'error="invalid_token"' in bad.headers["WWW-Authenticate"]
        _header, payload, _sig = good.split(" ", 1)[1].split(".")
        unsigned = anonymous.get("/fhir/Patient", headers={"Authorization": f"Bearer {_none_alg(payload)}"})
        assert unsigned.status_code == 401
        expired = app.state.token_service.issue(
            subject="x", client_id="x", scope="system/*.cruds", audience="http://testserver/fhir", ttl=-60
        )[0]
        assert (
            anonymous.get("/fhir/Patient", headers={"Authorization": f"Bearer {expired}"}).status_code == 401
        )
        other_audience = app.state.token_service.issue(
            subject="x", client_id="x", scope="system/*.cruds", audience="http://elsewhere/fhir"
        )[0]
        response = anonymous.get("/fhir/Patient", headers={"Authorization": f"Bearer {other_audience}"})
        assert response.status_code == 401


def _none_alg(payload: str) -> str:
    header = base64.urlsafe_b64encode(orjson.dumps({"alg": "none", "typ": "at+jwt"})).rstrip(b"=").decode()
    return f"{header}.{payload}."


# --- scopes ------------------------------------------------------------------------------------


def test_insufficient_scope_is_403(app: FastAPI, world: dict[str, str]) -> None:
    for reader in as_token(app, "system/Observation.rs"):
        assert reader.get(f"/fhir/Observation/{world['sonja_obs']}").status_code == 200
        assert reader.get("/fhir/Observation").status_code == 200
        refused = reader.post("/fhir/Observation", json=obs("sonja"), headers=FHIR)
        assert refused.status_code == 403
        assert refused.json()["issue"][0]["code"] == "forbidden"
        assert reader.get("/fhir/Patient/sonja").status_code == 403
        assert reader.delete(f"/fhir/Observation/{world['sonja_obs']}").status_code == 403


def test_v1_scopes(app: FastAPI, world: dict[str, str]) -> None:
    for reader in as_token(app, "system/Observation.read"):
        assert reader.get(f"/fhir/Observation/{world['sonja_obs']}").status_code == 200
        assert reader.post("/fhir/Observation", json=obs("sonja"), headers=FHIR).status_code == 403
    for writer in as_token(app, "system/Observation.write"):
        assert writer.post("/fhir/Observation", json=obs("sonja"), headers=FHIR).status_code == 201
        assert writer.get(f"/fhir/Observation/{world['sonja_obs']}").status_code == 403


def test_scopes_apply_to_each_transaction_entry(app: FastAPI, world: dict[str, str]) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": obs("sonja"), "request": {"method": "POST", "url": "Observation"}},
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        ],
    }
    for writer in as_token(app, "system/Observation.c"):
        assert writer.post("/fhir", json=bundle, headers=FHIR).status_code == 403
    for everything in as_token(app, "system/*.cruds"):
        before = everything.get("/fhir/Observation?_total=accurate&_count=0").json()["total"]
        assert before == 2


# --- the patient compartment ---------------------------------------------------------------------


def test_patient_token_reads_only_its_own_data(sonja: TestClient, world: dict[str, str]) -> None:
    assert sonja.get("/fhir/Patient/sonja").status_code == 200
    assert sonja.get(f"/fhir/Observation/{world['sonja_obs']}").status_code == 200
    for url in (
        "/fhir/Patient/harald",
        f"/fhir/Observation/{world['harald_obs']}",
        f"/fhir/Observation/{world['harald_obs']}/_history/1",
    ):
        refused = sonja.get(url)
        assert refused.status_code == 404, url
        assert refused.json()["issue"][0]["code"] == "not-found"
    # Not revealed: another patient's data answers exactly like an unknown id.
    assert sonja.get("/fhir/Observation/no-such-id").json()["issue"][0]["code"] == "not-found"
    # Resources outside any patient compartment can be read.
    assert len(ids(sonja.get("/fhir/Questionnaire").json())) == 1


def test_patient_token_search_include_revinclude(sonja: TestClient, world: dict[str, str]) -> None:
    assert ids(sonja.get("/fhir/Observation").json()) == {world["sonja_obs"]}
    assert ids(sonja.get("/fhir/Observation?subject=Patient/harald").json()) == set()
    assert ids(sonja.get("/fhir/Patient").json()) == {"sonja"}
    included = sonja.get("/fhir/Observation?_include=Observation:subject").json()
    assert ids(included, "include") == {"sonja"}
    rev = sonja.get("/fhir/Patient?_revinclude=Observation:subject").json()
    assert ids(rev) == {"sonja"} and ids(rev, "include") == {world["sonja_obs"]}
    # Through another patient's Practitioner-free search, nothing of Harald's leaks.
    everything = sonja.get("/fhir/Practitioner?_revinclude=Observation:performer").json()
    assert world["harald_obs"] not in ids(everything, "include")


def test_patient_token_history(sonja: TestClient, world: dict[str, str]) -> None:
    assert sonja.get("/fhir/Patient/harald/_history").status_code == 404
    assert sonja.get("/fhir/Patient/sonja/_history").status_code == 200
    seen = {
        e["fullUrl"].rsplit("/", 1)[-1]
        for e in sonja.get("/fhir/Observation/_history").json().get("entry", [])
    }
    assert seen == {world["sonja_obs"]}


def test_patient_token_writes_only_into_its_compartment(sonja: TestClient, world: dict[str, str]) -> None:
    assert sonja.post("/fhir/Observation", json=obs("sonja"), headers=FHIR).status_code == 201
    assert sonja.post("/fhir/Observation", json=obs("harald"), headers=FHIR).status_code == 403
    moved = {**obs("harald"), "id": world["sonja_obs"]}
    assert sonja.put(f"/fhir/Observation/{world['sonja_obs']}", json=moved, headers=FHIR).status_code == 403
    harald = {**obs("harald"), "id": world["harald_obs"]}
    assert sonja.put(f"/fhir/Observation/{world['harald_obs']}", json=harald, headers=FHIR).status_code == 404
    assert sonja.delete(f"/fhir/Observation/{world['harald_obs']}").status_code == 404
    assert (
        sonja.post(
            "/fhir/Questionnaire", headers=FHIR, json={"resourceType": "Questionnaire", "status": "draft"}
        ).status_code
        == 403
    )


def test_patient_token_in_a_transaction(
    sonja: TestClient, world: dict[str, str], system_client: TestClient
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": obs("sonja"), "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "GET", "url": f"Observation/{world['harald_obs']}"}},
        ],
    }
    response = sonja.post("/fhir", json=bundle, headers=FHIR)
    assert response.status_code == 404
    assert (
        system_client.get("/fhir/Observation?_total=accurate&_count=0").json()["total"] == 2
    )  # nothing stored


# --- practitioners and care teams ------------------------------------------------------------------


def test_practitioner_reaches_only_patients_in_care(
    therapist: TestClient, stranger: TestClient, world: dict[str, str]
) -> None:
    assert therapist.get("/fhir/Patient/sonja").status_code == 200
    assert therapist.get(f"/fhir/Observation/{world['sonja_obs']}").status_code == 200
    assert therapist.get("/fhir/Patient/harald").status_code == 404
    assert ids(therapist.get("/fhir/Observation").json()) == {world["sonja_obs"]}
    assert stranger.get("/fhir/Patient/sonja").status_code == 404
    assert ids(stranger.get("/fhir/Observation").json()) == set()


def test_episode_of_care_manager_reaches_the_patient(
    app: FastAPI, system_client: TestClient, world: dict[str, str]
) -> None:
    system_client.post(
        "/fhir/EpisodeOfCare",
        headers=FHIR,
        json={
            "resourceType": "EpisodeOfCare",
            "status": "active",
            "patient": {"reference": "Patient/harald"},
            "careManager": {"reference": "Practitioner/stranger"},
        },
    )
    for manager in as_token(app, "user/*.rs", practitioner="stranger"):
        assert manager.get("/fhir/Patient/harald").status_code == 200
        assert manager.get("/fhir/Patient/sonja").status_code == 404


# --- the audit trail -----------------------------------------------------------------------------


def audit_events(system_client: TestClient, query: str) -> list[dict[str, Any]]:
    bundle = system_client.get(f"/fhir/AuditEvent?{query}&_count=200").json()
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def test_every_access_is_audited(sonja: TestClient, system_client: TestClient, world: dict[str, str]) -> None:
    sonja.get(f"/fhir/Observation/{world['sonja_obs']}")
    sonja.get(f"/fhir/Observation/{world['harald_obs']}")  # refused
    events = audit_events(system_client, "patient=Patient/sonja")
    reads = [e for e in events if e["subtype"][0]["code"] == "read"]
    assert any(e["outcome"] == "0" and e["agent"][0] for e in reads)
    refused = audit_events(system_client, "outcome=4")
    assert any(
        any(
            ent.get("what", {}).get("reference", "").startswith("Observation/" + world["harald_obs"])
            for ent in e.get("entity", [])
        )
        for e in refused
    )
    # The privacy officer's questions: who saw Sonja's data, by agent and by date.
    assert audit_events(system_client, "agent=Patient/sonja")
    assert audit_events(system_client, "patient=Patient/sonja&date=ge2000-01-01")
    assert audit_events(system_client, "agent:identifier=urn:fhir-norse:client|test-operator")


def test_writes_are_audited_in_the_same_transaction(system_client: TestClient) -> None:
    before = len(audit_events(system_client, "action=C&outcome=0"))
    refused_before = len(audit_events(system_client, "action=C&outcome=4"))
    bad = {"resourceType": "Observation", "status": "nonsense", "code": {"text": "x"}}
    assert system_client.post("/fhir/Observation", json=bad, headers=FHIR).status_code == 400
    created = system_client.post("/fhir/Observation", json=obs("sonja"), headers=FHIR).json()
    creates = audit_events(system_client, "action=C&outcome=0")
    assert len(creates) == before + 1
    # The refused create stored nothing but its own record.
    assert len(audit_events(system_client, "action=C&outcome=4")) == refused_before + 1
    assert any(
        ent.get("what", {}).get("reference", "").startswith(f"Observation/{created['id']}")
        for e in creates
        for ent in e.get("entity", [])
    )


def test_validate_is_audited_although_it_runs_read_only(system_client: TestClient) -> None:
    """$validate only reads (no write lock on SQLite); its AuditEvent is written after it, as a read's."""
    before = len(audit_events(system_client, "subtype=validate"))
    answer = system_client.post("/fhir/Observation/$validate", json=obs("sonja"), headers=FHIR)
    assert answer.status_code == 200, answer.text
    events = audit_events(system_client, "subtype=validate")
    assert len(events) == before + 1
    assert events[0]["outcome"] == "0"


def test_audit_events_cannot_be_changed(system_client: TestClient) -> None:
    system_client.get("/fhir/Patient")
    event = audit_events(system_client, "subtype=search-type")[0]
    assert system_client.put(f"/fhir/AuditEvent/{event['id']}", json=event, headers=FHIR).status_code == 405
    assert system_client.delete(f"/fhir/AuditEvent/{event['id']}").status_code == 405
    patch = [{"op": "replace", "path": "/outcome", "value": "0"}]
    assert (
        system_client.patch(
            f"/fhir/AuditEvent/{event['id']}",
            json=patch,
            headers={"Content-Type": "application/json-patch+json"},
        ).status_code
        == 405
    )


def test_token_grants_are_audited(app: FastAPI, system_client: TestClient) -> None:
    with TestClient(app) as anonymous:
        refused = anonymous.post(
            "/auth/token",
            data={
                "grant_type": "client_credentials",
                "scope": "system/*.rs",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": "not.a.jwt",
            },
        )
    assert refused.status_code in (400, 401)
    grants = audit_events(system_client, "type=http://dicom.nema.org/resources/ontology/DCM|110114")
    assert grants and grants[0]["outcome"] != "0"
    assert "not.a.jwt" not in orjson.dumps(grants).decode()


def test_cors_is_off_by_default(system_client: TestClient) -> None:
    response = system_client.options(
        "/fhir/Patient", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in response.headers


def test_cors_can_be_turned_on(settings: Any) -> None:
    from fhir_norse.api.app import create_app

    app = create_app(settings.model_copy(update={"cors_origins": ["https://app.example.no"]}))
    try:
        with TestClient(app) as browser:
            allowed = browser.options(
                "/fhir/Patient",
                headers={"Origin": "https://app.example.no", "Access-Control-Request-Method": "GET"},
            )
            assert allowed.headers["access-control-allow-origin"] == "https://app.example.no"
            other = browser.options(
                "/fhir/Patient",
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
            )
            assert "access-control-allow-origin" not in other.headers
    finally:
        app.state.service.storage.engine.dispose()


def test_tokens_never_reach_the_logs(app: FastAPI, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    header = bearer(app)["Authorization"]
    with caplog.at_level(logging.DEBUG), TestClient(app, raise_server_exceptions=False) as c:
        c.get("/fhir/Patient", headers={"Authorization": header})
        c.get("/fhir/Patient", headers={"Authorization": header[:-3] + "xyz"})
    token = header.split(" ", 1)[1]
    assert token[:40] not in caplog.text
    assert token.split(".")[2][:20] not in caplog.text
