"""The audit trail as narrow rows (issue 14, lever 1): one ``audit_log`` row per access plus one
``audit_patient`` row per patient, no AuditEvent resource or index rows, and AuditEvents rendered
from the rows exactly as the builders made them, found by the privacy officer's search parameters
(SQLite and PostgreSQL), and the migration of AuditEvents stored as resources."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import orjson
import sqlalchemy as sa
from fastapi.testclient import TestClient

from fhir_norse.auth.audit import (
    AuditRecorder,
    build_audit_event,
    build_authentication_refusal,
    build_token_grant_event,
    counting_repeats,
)
from fhir_norse.auth.caller import Caller
from fhir_norse.server.audit_log import insert_events, render_row
from fhir_norse.server.resources import stamp_meta
from fhir_norse.store import migrate
from fhir_norse.store.audit_tables import AUDIT_LOG, AUDIT_PATIENT
from fhir_norse.store.db import create_engine

FHIR = {"Content-Type": "application/fhir+json"}
RECORDED = datetime(2026, 3, 4, 5, 6, 7, 891234, tzinfo=UTC)
_INDEX_TABLES = ("idx_token", "idx_string", "idx_date", "idx_number", "idx_reference", "idx_uri")


def _count(conn: sa.Connection, sql: str) -> int:
    return int(conn.execute(sa.text(sql)).scalar_one())


def _counts(database_url: str) -> dict[str, int]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            counts = {
                "log": _count(conn, "SELECT count(*) FROM audit_log"),
                "patient": _count(conn, "SELECT count(*) FROM audit_patient"),
                "resource": _count(conn, "SELECT count(*) FROM resource WHERE res_type = 'AuditEvent'"),
                "history": _count(
                    conn, "SELECT count(*) FROM resource_history WHERE res_type = 'AuditEvent'"
                ),
            }
            for table in _INDEX_TABLES:
                counts["index"] = counts.get("index", 0) + _count(
                    conn, f"SELECT count(*) FROM {table} WHERE res_type = 'AuditEvent'"
                )
            return counts
    finally:
        engine.dispose()


def _patient_with_observation(client: TestClient) -> tuple[str, str]:
    patient = client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR).json()["id"]
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient/{patient}"},
    }
    obs = client.post("/fhir/Observation", json=observation, headers=FHIR).json()["id"]
    return patient, obs


def _matches(client: TestClient, query: str) -> list[dict[str, Any]]:
    answer = client.get(f"/fhir/AuditEvent?{query}")
    assert answer.status_code == 200, answer.text
    return [e["resource"] for e in answer.json().get("entry", []) if e["search"]["mode"] == "match"]


def _read_event(client: TestClient, obs: str) -> dict[str, Any]:
    """The AuditEvent of the last read of Observation/<obs>."""
    events = [
        e
        for e in _matches(client, f"entity=Observation/{obs}&subtype=read&_sort=-date&_count=5")
        if e["subtype"][0]["code"] == "read"
    ]
    assert events
    return events[0]


# ------------------------------------------------------------------ storage
def test_a_read_writes_one_narrow_row_and_no_resource(database_url: str, system_client: TestClient) -> None:
    _, obs = _patient_with_observation(system_client)
    before = _counts(database_url)
    assert system_client.get(f"/fhir/Observation/{obs}").status_code == 200
    after = _counts(database_url)
    assert after["log"] == before["log"] + 1
    assert after["patient"] == before["patient"] + 1  # the observation's patient
    assert after["resource"] == after["history"] == after["index"] == 0


def test_a_read_of_two_patients_data_writes_a_row_per_patient(
    database_url: str, system_client: TestClient
) -> None:
    first, _ = _patient_with_observation(system_client)
    second, _ = _patient_with_observation(system_client)
    before = _counts(database_url)
    assert system_client.get(f"/fhir/Observation?patient={first},{second}").status_code == 200
    after = _counts(database_url)
    assert (after["log"] - before["log"], after["patient"] - before["patient"]) == (1, 2)


def _stored_and_rendered(database_url: str, events: list[dict[str, Any]]) -> list[tuple[Any, str]]:
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            start = conn.execute(sa.select(sa.func.max(AUDIT_LOG.c.pk))).scalar() or 0
            insert_events(conn, events)
            rows = conn.execute(
                sa.select(AUDIT_LOG).where(AUDIT_LOG.c.pk > start).order_by(AUDIT_LOG.c.pk)
            ).all()
            return [(row, render_row(row)) for row in rows]
    finally:
        engine.dispose()


def _built_events() -> list[dict[str, Any]]:
    practitioner = Caller(
        client_id="ehr",
        scopes=frozenset({"user/*.rs"}),
        practitioner="doc-1",
        token_id="jti-1",
    )
    odd_user = Caller(client_id="app", user="Patient/not an id", token_id="jti-2")
    common = {"server_name": "fhir-norse", "server_address": "http://x/fhir", "site": "ward"}
    refusal = build_authentication_refusal(
        failure_reason="401: no token", source_address="10.0.0.9", recorded=RECORDED, request_id="r-9"
    )
    return [
        build_audit_event(
            interaction="search-type",
            outcome="success",
            caller=practitioner,
            resource_type="Observation",
            query="Observation?patient=p1&access_token=eyJabc.def.ghi",
            patients=["p2", "p1"],
            source_address="10.0.0.1",
            request_id="req-1",
            recorded=RECORDED,
            **common,
        ),
        build_audit_event(
            interaction="vread",
            outcome="refused",
            caller=odd_user,
            resource_type="Patient",
            resource_id="p3",
            version="2",
            failure_reason="404: gone",
            recorded=RECORDED,
            **common,
        ),
        build_audit_event(
            interaction="operation:validate",
            outcome="failed",
            caller=Caller(client_id="x", patient="p4"),
            resource_type="Observation",
            failure_reason="500: internal error",
            recorded=RECORDED,
        ),
        build_token_grant_event(
            outcome="success",
            client_id="ehr",
            scopes="system/*.rs",
            source_address="10.0.0.2",
            token_id="jti-3",
            recorded=RECORDED,
            **common,
        ),
        refusal,
        counting_repeats(refusal, count=7, first=RECORDED, last=RECORDED + timedelta(seconds=5)),
        AuditRecorder(server_name="n").refusal_summary(
            "token-grant", None, 3, RECORDED, RECORDED + timedelta(seconds=1)
        ),
    ]


def test_rendered_events_equal_the_built_ones(database_url: str) -> None:
    events = _built_events()
    stored = _stored_and_rendered(database_url, events)
    assert len(stored) == len(events)
    for event, (row, text) in zip(events, stored, strict=True):
        assert row.legacy_body is None  # rendered from inputs, no body kept
        recorded = row.recorded.replace(tzinfo=None)
        assert orjson.loads(text) == stamp_meta(event, row.id, 1, recorded)
    assert "eyJ" not in stored[0][1]
    assert stored[0][0].user_ref == "Practitioner/doc-1" and stored[0][0].jti == "jti-1"


def test_an_event_not_made_by_the_builders_is_kept_as_it_is(database_url: str) -> None:
    event = dict(_built_events()[0])  # a plain dict: no inputs to store
    [(row, text)] = _stored_and_rendered(database_url, [event])
    assert row.legacy_body is not None and row.kind == "rest" and row.user_ref == "Practitioner/doc-1"
    assert orjson.loads(text) == stamp_meta(event, row.id, 1, row.recorded.replace(tzinfo=None))


# ------------------------------------------------------------------ read, vread, history
def test_read_vread_and_history_render_the_event(system_client: TestClient) -> None:
    _, obs = _patient_with_observation(system_client)
    system_client.get(f"/fhir/Observation/{obs}")
    event = _read_event(system_client, obs)
    assert event["meta"]["versionId"] == "1"
    assert event["meta"]["lastUpdated"] == event["recorded"]
    read = system_client.get(f"/fhir/AuditEvent/{event['id']}")
    assert read.status_code == 200 and read.json() == event
    assert system_client.get(f"/fhir/AuditEvent/{event['id']}/_history/1").json() == event
    assert system_client.get(f"/fhir/AuditEvent/{event['id']}/_history/2").status_code == 404
    assert system_client.get("/fhir/AuditEvent/no-such-event").status_code == 404
    history = system_client.get("/fhir/AuditEvent/_history?_count=500").json()
    assert event["id"] in {e["resource"]["id"] for e in history["entry"]}
    one = system_client.get(f"/fhir/AuditEvent/{event['id']}/_history").json()
    assert [e["resource"]["id"] for e in one["entry"]] == [event["id"]]
    everything = system_client.get("/fhir/_history?_count=500").json()
    assert all(e["resource"]["resourceType"] != "AuditEvent" for e in everything.get("entry", []))
    assert system_client.delete(f"/fhir/AuditEvent/{event['id']}").status_code == 405


# ------------------------------------------------------------------ search
def test_search_by_each_parameter(system_client: TestClient) -> None:
    patient, obs = _patient_with_observation(system_client)
    system_client.get(f"/fhir/Observation/{obs}", headers={"X-Request-Id": "req-audit-1"})
    event = _read_event(system_client, obs)
    client_id = next(
        a["who"]["identifier"]["value"] for a in event["agent"] if "identifier" in a.get("who", {})
    )
    policy = next((p for a in event["agent"] for p in a.get("policy", [])), None)
    day = event["recorded"][:10]
    later = (datetime.fromisoformat(event["recorded"][:10]) + timedelta(days=2)).date().isoformat()
    address = event["agent"][0].get("network", {}).get("address")

    def found(query: str) -> bool:
        return event["id"] in {e["id"] for e in _matches(system_client, f"{query}&_count=500")}

    positive = [
        f"patient={patient}",
        f"patient=Patient/{patient}",
        f"entity=Observation/{obs}",
        f"entity=Patient/{patient}",
        f"agent:identifier=urn:fhir-norse:client|{client_id}",
        f"date={day}",
        f"date=ge{day}",
        f"date=le{later}",
        f"date=lt{later}",
        f"date=sa{day}T00:00:00Z" if event["recorded"][11:19] != "00:00:00" else f"date=eq{day}",
        f"_lastUpdated=ge{day}",
        "type=rest",
        "type=http://terminology.hl7.org/CodeSystem/audit-event-type|rest",
        "subtype=read",
        "subtype=http://hl7.org/fhir/restful-interaction|read",
        "action=R",
        "outcome=0",
        f"_id={event['id']}",
    ]
    if policy:
        positive.append(f"policy={quote(policy)}")
    if address:
        positive.append(f"address={address}")
    for query in positive:
        assert found(query), query
    negative = [
        "patient=someone-else",
        "entity=Observation/other",
        "agent:identifier=urn:fhir-norse:client|nobody",
        "agent=Practitioner/nobody",
        f"date=gt{later}",
        f"date=lt{day}",
        "type=110114",
        "subtype=search-type",
        "action=C",
        "outcome=4",
        "_id=other",
        "policy=urn:ietf:params:oauth:jti:none",
        "address=203.0.113.77",
    ]
    for query in negative:
        assert not found(query), query


def test_search_by_agent_reference_and_patient_agent(system_client: TestClient, database_url: str) -> None:
    caller = Caller(client_id="app", practitioner="doc-9", token_id="jti-9")
    patient_app = Caller(client_id="app", patient="pat-9")
    events = [
        build_audit_event(
            interaction="read",
            outcome="success",
            caller=caller,
            resource_type="Patient",
            resource_id="pat-8",
            recorded=RECORDED,
        ),
        build_audit_event(
            interaction="search-type",
            outcome="success",
            caller=patient_app,
            resource_type="Observation",
            query="Observation",
            recorded=RECORDED,
        ),
    ]
    stored = _stored_and_rendered(database_url, events)
    ids = [row.id for row, _ in stored]
    assert [e["id"] for e in _matches(system_client, "agent=Practitioner/doc-9")] == [ids[0]]
    assert [e["id"] for e in _matches(system_client, "agent=doc-9")] == [ids[0]]
    assert [e["id"] for e in _matches(system_client, "agent:Practitioner=doc-9")] == [ids[0]]
    assert [e["id"] for e in _matches(system_client, "patient=pat-8")] == [ids[0]]
    # The patient acting is a patient concerned (AuditEvent-patient includes agent.who).
    assert [e["id"] for e in _matches(system_client, "patient=pat-9")] == [ids[1]]
    assert [e["id"] for e in _matches(system_client, "policy=urn:ietf:params:oauth:jti:jti-9")] == [ids[0]]


def test_sort_paging_total_and_summary_count(system_client: TestClient) -> None:
    _, obs = _patient_with_observation(system_client)
    for _ in range(3):
        system_client.get(f"/fhir/Observation/{obs}")
    query = f"entity=Observation/{obs}&subtype=read"
    bundle = system_client.get(f"/fhir/AuditEvent?{query}&_sort=-date&_count=2&_total=accurate").json()
    assert bundle["total"] == 3 and len(bundle["entry"]) == 2
    first = [e["resource"] for e in bundle["entry"]]
    assert first[0]["recorded"] >= first[1]["recorded"]
    next_url = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    second = system_client.get(next_url.removeprefix("http://testserver")).json()
    rest = [e["resource"] for e in second["entry"] if e["search"]["mode"] == "match"]
    assert len(rest) == 1 and rest[0]["id"] not in {e["id"] for e in first}
    previous = next(link["url"] for link in second["link"] if link["relation"] == "previous")
    back = system_client.get(previous.removeprefix("http://testserver")).json()
    assert [e["resource"]["id"] for e in back["entry"]] == [e["id"] for e in first]
    ascending = _matches(system_client, f"{query}&_sort=_lastUpdated")
    assert [e["recorded"] for e in ascending] == sorted(e["recorded"] for e in ascending)
    counted = system_client.get(f"/fhir/AuditEvent?{query}&_summary=count").json()
    assert counted["total"] == 3 and "entry" not in counted


def test_unsupported_parameters_are_refused_when_strict_and_ignored_when_lenient(
    system_client: TestClient,
) -> None:
    strict = system_client.get("/fhir/AuditEvent?site=x", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400
    assert strict.json()["resourceType"] == "OperationOutcome"
    lenient = system_client.get("/fhir/AuditEvent?site=x&_count=1").json()
    assert lenient["resourceType"] == "Bundle"
    assert any(e["search"]["mode"] == "outcome" for e in lenient["entry"])


# ------------------------------------------------------------------ migration
def test_the_migration_moves_stored_audit_events(database_url: str) -> None:
    """Upgrade from 0002 with an AuditEvent stored as a resource (body, history, index rows): it ends
    in the audit log as it was stored, found by patient, and leaves no resource or index row."""
    event = stamp_meta(_built_events()[0], "legacy-1", 1, RECORDED.replace(tzinfo=None))
    engine = create_engine(database_url)
    try:
        migrate.downgrade(engine, "0002")
        body = orjson.dumps(event).decode()
        with engine.begin() as conn:
            values = {"t": "AuditEvent", "i": "legacy-1", "u": RECORDED.replace(tzinfo=None), "b": body}
            conn.execute(
                sa.text(
                    "INSERT INTO resource (res_type, res_id, version, last_updated, deleted, body) "
                    "VALUES (:t, :i, 1, :u, false, :b)"
                ),
                values,
            )
            conn.execute(
                sa.text(
                    "INSERT INTO resource_history (res_type, res_id, version, last_updated, method, "
                    "deleted, body) VALUES (:t, :i, 1, :u, 'create', false, :b)"
                ),
                values,
            )
            pk = conn.execute(sa.text("SELECT pk FROM resource WHERE res_id = 'legacy-1'")).scalar_one()
            conn.execute(
                sa.text(
                    "INSERT INTO idx_reference (resource_pk, res_type, param, target_type, target_id) "
                    "VALUES (:pk, 'AuditEvent', 'patient', 'Patient', 'p1')"
                ),
                {"pk": pk},
            )
        migrate.upgrade(engine)
        with engine.connect() as conn:
            row = conn.execute(sa.select(AUDIT_LOG).where(AUDIT_LOG.c.id == "legacy-1")).one()
            patients = set(
                conn.execute(
                    sa.select(AUDIT_PATIENT.c.patient_id).where(AUDIT_PATIENT.c.audit_pk == row.pk)
                ).scalars()
            )
            leftovers = _count(conn, "SELECT count(*) FROM resource WHERE res_type = 'AuditEvent'")
            leftovers += _count(conn, "SELECT count(*) FROM idx_reference WHERE res_type = 'AuditEvent'")
            leftovers += _count(conn, "SELECT count(*) FROM resource_history WHERE res_type = 'AuditEvent'")
        assert orjson.loads(render_row(row)) == event
        assert patients == {"p1", "p2"}
        assert (row.user_ref, row.jti, row.kind, row.interaction) == (
            "Practitioner/doc-1",
            "jti-1",
            "rest",
            "search-type",
        )
        assert leftovers == 0
    finally:
        engine.dispose()
