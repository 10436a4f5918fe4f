"""Issue 18, item 3: ``Patient/[id]/$everything`` (https://hl7.org/fhir/R4/patient-operation-everything.html)
on SQLite and PostgreSQL.

One clinic per database (module scope): Kari with a scored urgent response (so a QuestionnaireResponse,
its Observations, DiagnosticReport, Flag and review Task), a CareTeam naming her therapist, Binaries
whose securityContext names her and her report, and Ola with the same kind of record and a Binary of
his own. Every answer is parsed by an independent R4 parser (fhirclient, ``check_response``).
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.server.operations.everything import DEFINITION
from tests.fhir_r4_client import check_response
from tests.intake_support import (
    FHIR,
    NF21_STATIC,
    create_patient,
    nf21_answers,
    post_response,
    publish_questionnaires,
    response,
    search,
)
from tests.rom.test_report import _truncate
from tests.tokens import bearer

BASE = "http://testserver/fhir"
# The record types the clinic's data has (searched by ``patient`` to know the expected record).
RECORD_TYPES = (
    "QuestionnaireResponse",
    "Observation",
    "DiagnosticReport",
    "Flag",
    "Task",
    "CareTeam",
    "Provenance",
)
Key = tuple[str, str]


@dataclass
class Clinic:
    app: FastAPI
    client: TestClient
    kari: str
    ola: str
    kari_org: str
    therapist: str
    # (type, id) of each patient's record: the Patient, its compartment and its Binaries.
    record: dict[str, set[Key]]
    care_team: str
    report: str


def _created(client: TestClient, body: dict[str, Any]) -> str:
    answer = client.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _binary(context: str) -> dict[str, Any]:
    return {
        "resourceType": "Binary",
        "contentType": "text/plain",
        "data": base64.b64encode(b"session notes").decode(),
        "securityContext": {"reference": context},
    }


def _record(client: TestClient, patient: str) -> set[Key]:
    """The patient's compartment as the searches of each type see it."""
    keys = {("Patient", patient)}
    for res_type in RECORD_TYPES:
        keys |= {(res_type, r["id"]) for r in search(client, f"{res_type}?patient=Patient/{patient}")}
    return keys


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def clinic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clinic]:
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("everything") / "fhir.sqlite3"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("pg_schema_url")
        _truncate(url)
    settings = Settings(database_url=url, base_url=BASE, mode="development", publish_content=False)
    app = create_app(settings)
    publish_questionnaires(app.state.service)
    try:
        with TestClient(app, headers=bearer(app), raise_server_exceptions=False) as client:
            client.event_hooks["response"] = [check_response]
            ids: dict[str, str] = {}
            for who in ("kari", "ola"):
                ids[f"{who}_org"] = _created(
                    client, {"resourceType": "Organization", "name": f"{who} clinic"}
                )
                ids[who] = create_patient(
                    client,
                    family=who,
                    managingOrganization={"reference": f"Organization/{ids[f'{who}_org']}"},
                )
                scored = post_response(
                    client, response(NF21_STATIC, nf21_answers({"suicide": 6}), patient=ids[who])
                )
                assert scored.status_code == 201, scored.text
            therapist = _created(client, {"resourceType": "Practitioner", "name": [{"family": "Terapeut"}]})
            _created(client, {"resourceType": "Practitioner", "name": [{"family": "Fremmed"}]})
            (report,) = search(client, f"DiagnosticReport?patient=Patient/{ids['kari']}")
            binaries = {
                "kari": [
                    _created(client, _binary(f"Patient/{ids['kari']}")),
                    _created(client, _binary(f"DiagnosticReport/{report['id']}")),
                    _created(client, _binary(f"DiagnosticReport/{report['id']}/_history/1")),
                ],
                "ola": [_created(client, _binary(f"Patient/{ids['ola']}"))],
            }
            care_team = _created(
                client,
                {
                    "resourceType": "CareTeam",
                    "status": "active",
                    "subject": {"reference": f"Patient/{ids['kari']}"},
                    "participant": [{"member": {"reference": f"Practitioner/{therapist}"}}],
                },
            )
            record = {
                who: _record(client, ids[who]) | {("Binary", b) for b in binaries[who]}
                for who in ("kari", "ola")
            }
            yield Clinic(
                app,
                client,
                ids["kari"],
                ids["ola"],
                ids["kari_org"],
                therapist,
                record,
                care_team,
                report["id"],
            )
    finally:
        app.state.service.storage.engine.dispose()


def _everything(
    clinic: Clinic, query: str = "", patient: str | None = None, **headers: str
) -> httpx.Response:
    url = f"/fhir/Patient/{patient or clinic.kari}/$everything" + (f"?{query}" if query else "")
    answer: httpx.Response = clinic.client.get(url, headers=headers)
    return answer


def _entries(answer: httpx.Response) -> list[dict[str, Any]]:
    assert answer.status_code == 200, answer.text
    bundle = answer.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    entries: list[dict[str, Any]] = bundle.get("entry", [])
    for entry in entries:
        resource = entry["resource"]
        assert entry["fullUrl"] == f"{BASE}/{resource['resourceType']}/{resource['id']}"
    return entries


def _keys(entries: list[dict[str, Any]], mode: str) -> set[Key]:
    return {
        (e["resource"]["resourceType"], e["resource"]["id"]) for e in entries if e["search"]["mode"] == mode
    }


def _all_pages(clinic: Clinic, query: str, **headers: str) -> tuple[list[dict[str, Any]], int]:
    """Every entry of every page (following ``next``), and the number of pages."""
    url: str | None = f"/fhir/Patient/{clinic.kari}/$everything?{query}"
    entries: list[dict[str, Any]] = []
    pages = 0
    while url:
        answer = clinic.client.get(url, headers=headers)
        entries += _entries(answer)
        pages += 1
        url = next((link["url"] for link in answer.json()["link"] if link["relation"] == "next"), None)
        if url is not None:
            assert url.startswith(f"{BASE}/Patient/{clinic.kari}/$everything?")
            url = url.removeprefix("http://testserver")
    return entries, pages


def test_the_record_exactly_with_what_it_references(clinic: Clinic) -> None:
    record = clinic.record["kari"]
    kinds = {t for t, _ in record}
    # The record has what the issue names, Binaries (by securityContext, a versioned one too) included.
    assert {"Patient", "Observation", "QuestionnaireResponse", "DiagnosticReport", "Flag", "Task"} <= kinds
    assert {"CareTeam", "Binary"} <= kinds
    answer = _everything(clinic, "_count=1000")
    entries = _entries(answer)
    assert _keys(entries, "match") == record
    # The therapist (CareTeam.participant) and the clinic (Patient.managingOrganization), not the stranger.
    assert _keys(entries, "include") == {
        ("Practitioner", clinic.therapist),
        ("Organization", clinic.kari_org),
    }
    assert len(entries) == len(record) + 2  # each once
    assert answer.json()["total"] == len(entries)
    assert not _keys(entries, "match") & clinic.record["ola"]


def test_paging_returns_the_record_once(clinic: Clinic) -> None:
    entries, pages = _all_pages(clinic, "_count=4")
    keys = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in entries]
    assert len(keys) == len(set(keys)) == len(clinic.record["kari"]) + 2
    assert set(keys) == clinic.record["kari"] | {
        ("Practitioner", clinic.therapist),
        ("Organization", clinic.kari_org),
    }
    assert pages == -(-len(keys) // 4)
    # A resource updated while a client pages keeps its place: the pages after it do not repeat it.
    first = _everything(clinic, "_count=4").json()
    (first_key,) = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in first["entry"]][:1]
    after = next(link["url"] for link in first["link"] if link["relation"] == "next")
    current = clinic.client.get(f"/fhir/{first_key[0]}/{first_key[1]}").json()
    assert (
        clinic.client.put(f"/fhir/{first_key[0]}/{first_key[1]}", json=current, headers=FHIR).status_code
        == 200
    )
    rest, _ = _all_pages(clinic, after.split("?", 1)[1])
    assert first_key not in {(e["resource"]["resourceType"], e["resource"]["id"]) for e in rest}
    assert len(rest) == len(keys) - 4


def test_type_and_since(clinic: Clinic) -> None:
    only = _entries(_everything(clinic, "_type=Observation,Flag&_type=Task&_count=1000"))
    assert _keys(only, "match") == {
        k for k in clinic.record["kari"] if k[0] in ("Observation", "Flag", "Task")
    }
    assert not _keys(only, "include")
    # The directory resources that the returned types reference come along.
    team = _entries(_everything(clinic, "_type=CareTeam,Practitioner"))
    assert _keys(team, "match") == {("CareTeam", clinic.care_team)}
    assert _keys(team, "include") == {("Practitioner", clinic.therapist)}
    # _since: resources last updated at or after the instant, whatever their type.
    full = _entries(_everything(clinic, "_count=1000"))
    updated = {
        (e["resource"]["resourceType"], e["resource"]["id"]): datetime.fromisoformat(
            e["resource"]["meta"]["lastUpdated"]
        )
        for e in full
    }
    instant = clinic.client.get(f"/fhir/CareTeam/{clinic.care_team}").json()["meta"]["lastUpdated"]
    since = datetime.fromisoformat(instant)
    recent = _entries(_everything(clinic, httpx.QueryParams({"_since": instant, "_count": "1000"}).__str__()))
    expected = {k for k, when in updated.items() if when >= since}
    assert ("CareTeam", clinic.care_team) in expected and len(expected) < len(updated)
    assert {(e["resource"]["resourceType"], e["resource"]["id"]) for e in recent} == expected


def test_bad_parameters_are_refused(clinic: Clinic) -> None:
    for query, code in (
        ("_type=Observation,NoSuchType", "not-supported"),
        ("_since=yesterday", "invalid"),
        ("_count=-1", "invalid"),
        ("start=2025-01-01", "not-supported"),
        ("_since=2025&_since=2026", "invalid"),
    ):
        answer = _everything(clinic, query)
        assert answer.status_code == 400, (query, answer.text)
        assert answer.json()["issue"][0]["code"] == code, query
    # An unknown parameter: ignored with a warning, refused when the client asks for strict handling.
    lenient = _everything(clinic, "_type=Patient&colour=blue").json()
    assert lenient["entry"][-1]["search"]["mode"] == "outcome"
    assert "colour" in lenient["entry"][-1]["resource"]["issue"][0]["diagnostics"]
    assert _everything(clinic, "colour=blue", Prefer="handling=strict").status_code == 400


def test_post_with_parameters(clinic: Clinic) -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [{"name": "_type", "valueCode": "Flag"}, {"name": "_count", "valueInteger": 1000}],
    }
    answer = clinic.client.post(f"/fhir/Patient/{clinic.kari}/$everything", json=body, headers=FHIR)
    assert _keys(_entries(answer), "match") == {k for k in clinic.record["kari"] if k[0] == "Flag"}


def test_only_what_the_caller_may_read(clinic: Clinic) -> None:
    app = clinic.app
    own = bearer(app, "patient/*.rs", patient=clinic.kari)
    assert _keys(_entries(_everything(clinic, "_count=1000", **own)), "match") == clinic.record["kari"]
    # Another patient's token: 404, as for a read of the patient.
    other = bearer(app, "patient/*.rs", patient=clinic.ola)
    assert _everything(clinic, **other).status_code == 404
    # Scopes for Patient and Observation only: the rest of the record is left out.
    narrow = bearer(app, "patient/Patient.r patient/Observation.rs", patient=clinic.kari)
    kinds = {t for t, _ in _keys(_entries(_everything(clinic, "_count=1000", **narrow)), "match")}
    assert kinds == {"Patient", "Observation"}
    # The therapist through the care team; a practitioner outside it gets 404.
    therapist = bearer(app, "user/*.rs", practitioner=clinic.therapist)
    entries = _entries(_everything(clinic, "_count=1000", **therapist))
    assert _keys(entries, "match") == clinic.record["kari"]
    assert _everything(clinic, patient=clinic.ola, **therapist).status_code == 404
    stranger = bearer(app, "user/*.rs", practitioner="no-care-team")
    assert _everything(clinic, **stranger).status_code == 404
    assert _everything(clinic, patient="no-such-patient").status_code == 404


def test_audited_as_one_operation_on_the_patient(clinic: Clinic) -> None:
    query = f"AuditEvent?entity=Patient/{clinic.ola}&subtype=urn:fhir-norse:operation|everything"
    before_ids = {e["id"] for e in search(clinic.client, query)}
    _entries(_everything(clinic, "_count=2", patient=clinic.ola))
    events = search(clinic.client, query)
    assert len(events) == len(before_ids) + 1
    (event,) = [e for e in events if e["id"] not in before_ids]
    whats = [entity.get("what", {}).get("reference", "") for entity in event["entity"]]
    # The patient as the operation's target and as the patient concerned; no one else.
    assert {w for w in whats if w.startswith("Patient/")} == {f"Patient/{clinic.ola}"}
    assert event["outcome"] == "0"
    assert {c["code"] for c in event["subtype"]} >= {"everything"}


def test_the_capability_statement_lists_the_operation(clinic: Clinic) -> None:
    statement = clinic.client.get("/fhir/metadata").json()
    patient = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Patient")
    (everything,) = [o for o in patient["operation"] if o["name"] == "everything"]
    assert everything["definition"] == DEFINITION
    observation = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Observation")
    assert all(o["name"] != "everything" for o in observation.get("operation", []))
