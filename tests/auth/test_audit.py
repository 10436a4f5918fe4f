"""AuditEvents after IHE BALP (https://profiles.ihe.net/ITI/BALP/content.html) and the recorder."""

from __future__ import annotations

import base64
import inspect
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from fhir_norse.auth.audit import (
    FAILED,
    INTERACTIONS,
    REFUSED,
    SUCCESS,
    AuditRecorder,
    build_audit_event,
    build_token_grant_event,
)
from fhir_norse.auth.caller import Caller
from fhir_norse.server.search.extract import default_extractor
from fhir_norse.server.validation import validate_resource
from fhir_norse.store.rows import ReferenceRow, UriRow

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/"
OAUTH_MINIMAL = BALP + "IHE.BasicAudit.OAUTHaccessTokenUse.Minimal"
WHEN = datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)
SERVER = "https://fhir.example.org/fhir"
JWT = "eyJhbGciOiJSUzM4NCJ9.eyJzdWIiOiJlaHIifQ.c2lnbmF0dXJl"

SYSTEM = Caller(client_id="ehr-backend", scopes=frozenset({"system/*.rs"}), token_id="jti-sys-1")
PATIENT = Caller(
    client_id="patient-app", scopes=frozenset({"patient/*.rs"}), patient="p1", token_id="jti-p-1"
)
PRACTITIONER = Caller(
    client_id="clinic-app", scopes=frozenset({"user/*.cruds"}), practitioner="dr7", user="Practitioner/dr7"
)

DCM = "http://dicom.nema.org/resources/ontology/DCM"
APPLICATION = {"system": DCM, "code": "110150", "display": "Application"}
DESTINATION = {"system": DCM, "code": "110152", "display": "Destination Role ID"}
SOURCE = {"system": DCM, "code": "110153", "display": "Source Role ID"}
OAUTH_USER = {
    "system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/UserAgentTypes",
    "code": "UserOauthAgent",
    "display": "User OAuth Agent participant",
}
SYSTEM_OBJECT = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
    "code": "2",
    "display": "System Object",
}
PERSON = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
    "code": "1",
    "display": "Person",
}
PATIENT_ROLE = {
    "system": "http://terminology.hl7.org/CodeSystem/object-role",
    "code": "1",
    "display": "Patient",
}
QUERY_ROLE = {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"}
APPLICATION_SERVER = {
    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
    "code": "4",
    "display": "Application Server",
}


def build(**kwargs: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "outcome": SUCCESS,
        "caller": SYSTEM,
        "resource_type": None,
        "source_address": "10.1.2.3",
        "server_address": SERVER,
        "recorded": WHEN,
    }
    event = build_audit_event(**{**defaults, **kwargs})
    validate_resource(event)
    return event


def agents_of(event: dict[str, Any], code: str) -> list[dict[str, Any]]:
    return [a for a in event["agent"] if any(c["code"] == code for c in a["type"]["coding"])]


def entities_with_role(event: dict[str, Any], code: str) -> list[dict[str, Any]]:
    return [e for e in event.get("entity", []) if e.get("role", {}).get("code") == code]


def test_read_by_system_client_has_the_balp_read_shape() -> None:
    event = build(interaction="read", resource_type="Questionnaire", resource_id="phq9", request_id="req-42")

    assert event == {
        "resourceType": "AuditEvent",
        "meta": {"profile": [BALP + "IHE.BasicAudit.Read", OAUTH_MINIMAL]},
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "Restful Operation",
        },
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read", "display": "read"}],
        "action": "R",
        "recorded": "2024-05-01T12:30:15.250Z",
        "outcome": "0",
        "agent": [
            {
                # BALP Read: the client receives the data, so it is the Destination Role ID.
                "type": {"coding": [DESTINATION, APPLICATION]},
                "who": {"identifier": {"system": "urn:fhir-norse:client", "value": "ehr-backend"}},
                "requestor": True,
                "network": {"address": "10.1.2.3", "type": "2"},
            },
            {
                "type": {"coding": [SOURCE]},
                "who": {"display": "fhir-norse"},
                "requestor": False,
                "network": {"address": SERVER, "type": "5"},
            },
            {
                "type": {"coding": [OAUTH_USER]},
                "requestor": True,
                "policy": ["urn:ietf:params:oauth:jti:jti-sys-1"],
            },
        ],
        "source": {"observer": {"display": "fhir-norse"}, "type": [APPLICATION_SERVER]},
        "entity": [
            {
                "what": {"reference": "Questionnaire/phq9"},
                "type": SYSTEM_OBJECT,
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "4",
                    "display": "Domain Resource",
                },
            },
            {
                "what": {"identifier": {"value": "req-42"}},
                "type": {
                    "system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
                    "code": "XrequestId",
                    "display": "transport specific unique identifier where http X-Request-Id is used",
                },
            },
        ],
    }


def test_patient_context_search_records_query_patient_entity_and_patient_agent() -> None:
    query = "Observation?patient=p1&code=http://loinc.org|44261-6&_sort=-date"
    event = build(
        interaction="search-type",
        caller=PATIENT,
        resource_type="Observation",
        query=query,
        patients=["p1"],
        source_address="2001:db8::7",
    )

    assert event["meta"]["profile"] == [BALP + "IHE.BasicAudit.PatientQuery", OAUTH_MINIMAL]
    assert event["action"] == "E"
    assert event["subtype"][0]["code"] == "search-type"
    # BALP Query: the client sends the query, so it is the Source Role ID; the patient is the user.
    (client,) = agents_of(event, "110150")
    assert client["type"]["coding"][0] == SOURCE
    assert client["requestor"] is False
    assert client["network"] == {"address": "2001:db8::7", "type": "2"}
    (user,) = agents_of(event, "IRCP")
    assert user == {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "code": "IRCP",
                    "display": "information recipient",
                }
            ]
        },
        "who": {"reference": "Patient/p1"},
        "requestor": True,
    }
    (server,) = agents_of(event, "110152")
    assert server["requestor"] is False
    (query_entity,) = entities_with_role(event, "24")
    assert query_entity["type"] == SYSTEM_OBJECT
    assert "what" not in query_entity
    assert base64.b64decode(query_entity["query"]).decode() == query
    assert entities_with_role(event, "1") == [
        {"what": {"reference": "Patient/p1"}, "type": PERSON, "role": PATIENT_ROLE}
    ]


def test_practitioner_update_names_the_practitioner_as_author_and_the_new_version() -> None:
    event = build(
        interaction="update",
        caller=PRACTITIONER,
        resource_type="QuestionnaireResponse",
        resource_id="qr1",
        version="3",
        patients=["p1"],
    )

    assert event["meta"]["profile"] == [BALP + "IHE.BasicAudit.PatientUpdate"]  # no token jti known
    assert event["action"] == "U"
    (client,) = agents_of(event, "110150")
    assert client["requestor"] is False
    (user,) = agents_of(event, "AUT")
    assert user["who"] == {"reference": "Practitioner/dr7"}
    assert user["requestor"] is True
    assert user["type"]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
    assert not agents_of(event, "UserOauthAgent")
    (data,) = entities_with_role(event, "4")
    assert data["what"] == {"reference": "QuestionnaireResponse/qr1/_history/3"}
    assert entities_with_role(event, "1")[0]["what"] == {"reference": "Patient/p1"}


def test_refused_read_is_a_minor_failure_with_its_reason_and_claims_no_rest_profile() -> None:
    event = build(
        interaction="read",
        outcome=REFUSED,
        caller=PATIENT,
        resource_type="Observation",
        resource_id="o9",
        patients=["p2"],
        failure_reason="outside the patient compartment of the token",
    )

    assert event["outcome"] == "4"
    assert event["outcomeDesc"] == "outside the patient compartment of the token"
    # BALP Read fixes outcome 0 ("failures are recorded differently"); the token profile still holds.
    assert event["meta"]["profile"] == [OAUTH_MINIMAL]
    assert [e["what"]["reference"] for e in event["entity"]] == ["Observation/o9", "Patient/p2"]


def test_server_failure_is_a_serious_failure() -> None:
    event = build(
        interaction="create",
        outcome=FAILED,
        caller=PRACTITIONER,
        resource_type="QuestionnaireResponse",
        failure_reason="database unavailable",
    )

    assert event["outcome"] == "8"
    assert event["outcomeDesc"] == "database unavailable"
    assert event["action"] == "C"
    assert "meta" not in event
    assert "entity" not in event  # nothing was created, so there is no id to name


def test_delete_uses_the_balp_delete_agents() -> None:
    event = build(interaction="delete", resource_type="Observation", resource_id="o1", patients=["p1"])

    assert event["action"] == "D"
    assert event["meta"]["profile"] == [BALP + "IHE.BasicAudit.PatientDelete", OAUTH_MINIMAL]
    (client,) = agents_of(event, "110150")
    assert client["type"]["coding"] == [APPLICATION]
    (server,) = agents_of(event, "custodian")
    assert server["type"]["coding"][0]["system"] == (
        "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
    )
    assert "policy" not in client  # BALP Delete: agent[client].policy 0..0; the jti is on its own agent


def test_operation_names_the_operation() -> None:
    event = build(interaction="operation:validate", resource_type="QuestionnaireResponse")

    assert event["action"] == "E"
    assert [c["code"] for c in event["subtype"]] == ["operation", "validate"]
    assert event["subtype"][1]["display"] == "$validate"
    assert event["meta"]["profile"] == [OAUTH_MINIMAL]  # BALP has no profile for operations


def test_reading_a_patient_concerns_that_patient() -> None:
    event = build(
        interaction="vread", caller=PRACTITIONER, resource_type="Patient", resource_id="p1", version="2"
    )

    assert [e["what"]["reference"] for e in event["entity"]] == ["Patient/p1/_history/2", "Patient/p1"]
    assert event["meta"]["profile"] == [BALP + "IHE.BasicAudit.PatientRead"]


def test_many_patients_get_one_entity_each_and_no_patient_profile() -> None:
    event = build(
        interaction="search-type",
        caller=PRACTITIONER,
        resource_type="Observation",
        query="Observation?code=x",
        patients=["p1", "Patient/p2", "p1"],
    )

    assert [e["what"]["reference"] for e in entities_with_role(event, "1")] == ["Patient/p1", "Patient/p2"]
    # BALP PatientQuery wants one event per patient; one event listing all claims no REST profile.
    assert "meta" not in event


def test_profiles_are_claimed_only_when_the_network_addresses_are_known() -> None:
    event = build(interaction="read", resource_type="Questionnaire", resource_id="phq9", source_address=None)

    assert event["meta"]["profile"] == [OAUTH_MINIMAL]
    assert "network" not in agents_of(event, "110150")[0]


def test_the_search_index_finds_the_event_by_patient_agent_and_policy() -> None:
    by_patient_token = build(
        interaction="search-type", caller=PATIENT, resource_type="Observation", query="Observation?x=1"
    )
    rows = default_extractor().extract(by_patient_token)
    assert ReferenceRow("patient", "Patient", "p1") in rows  # AuditEvent?patient=p1 (agent.who)
    assert ReferenceRow("agent", "Patient", "p1") in rows
    assert UriRow("policy", "urn:ietf:params:oauth:jti:jti-p-1") in rows

    about_patient = build(
        interaction="read",
        caller=PRACTITIONER,
        resource_type="Observation",
        resource_id="o1",
        patients=["p3"],
    )
    rows = default_extractor().extract(about_patient)
    assert ReferenceRow("patient", "Patient", "p3") in rows  # AuditEvent?patient=p3 (entity.what)
    assert ReferenceRow("agent", "Practitioner", "dr7") in rows
    assert ReferenceRow("entity", "Observation", "o1") in rows


CALLERS = {
    "system": SYSTEM,
    "patient": PATIENT,
    "practitioner": PRACTITIONER,
    "operator": Caller.operator(),
    "oidc-user": Caller(client_id="idp-app", user="opaque-subject-42", source="oidc", token_id="x"),
}
TARGETS: dict[str, dict[str, Any]] = {
    "read": {"resource_type": "Observation", "resource_id": "o1"},
    "vread": {"resource_type": "Observation", "resource_id": "o1", "version": "1"},
    "search-type": {"resource_type": "Observation", "query": "Observation?patient=p1"},
    "search-system": {"resource_type": None, "query": "?_lastUpdated=gt2024-01-01"},
    "history-instance": {"resource_type": "Observation", "resource_id": "o1"},
    "history-type": {"resource_type": "Observation", "query": "Observation/_history?_count=10"},
    "history-system": {"resource_type": None},
    "create": {"resource_type": "Observation", "resource_id": "o2", "version": "1"},
    "update": {"resource_type": "Observation", "resource_id": "o1", "version": "2"},
    "patch": {"resource_type": "Observation", "resource_id": "o1", "version": "3"},
    "delete": {"resource_type": "Observation", "resource_id": "o1"},
    "operation:validate": {"resource_type": "Observation"},
    "operation:$everything": {"resource_type": "Patient", "resource_id": "p1"},
    "transaction": {"resource_type": None},
    "batch": {"resource_type": None},
    "token-grant": {"resource_type": None},
}


def test_every_interaction_is_covered() -> None:
    assert {name.partition(":")[0] for name in TARGETS} == INTERACTIONS | {"operation"}


@pytest.mark.parametrize("caller", CALLERS.values(), ids=CALLERS.keys())
@pytest.mark.parametrize("outcome", [SUCCESS, REFUSED, FAILED])
@pytest.mark.parametrize("interaction", TARGETS)
def test_every_event_is_valid_r4(interaction: str, outcome: str, caller: Caller) -> None:
    about: dict[str, Any] = {} if interaction == "token-grant" else {"patients": ["p1"], "request_id": "r-1"}
    event = build(
        interaction=interaction,
        outcome=outcome,
        caller=caller,
        failure_reason=None if outcome == SUCCESS else "refused\tby\nthe seam",
        **about,
        **TARGETS[interaction],
    )
    assert event["resourceType"] == "AuditEvent"
    assert sum(agent["requestor"] for agent in event["agent"]) >= 1


def test_token_grant_success_follows_iua_71() -> None:
    sink: list[dict[str, Any]] = []
    recorder = AuditRecorder(sink.append, server_address=SERVER, site="hospital-a", clock=lambda: WHEN)

    recorder.record_token_grant(
        "ehr-backend", SUCCESS, None, "10.1.2.3", "system/Observation.rs", token_id="j9"
    )

    (event,) = sink
    validate_resource(event)
    assert event["meta"] == {"profile": [BALP + "IHE.IUA.71"]}
    assert event["type"] == {"system": DCM, "code": "110114", "display": "User Authentication"}
    assert event["subtype"] == [
        {"system": "urn:ihe:event-type-code", "code": "ITI-71", "display": "Get Access Token"}
    ]
    assert event["action"] == "E"
    assert event["outcome"] == "0"
    assert event["recorded"] == "2024-05-01T12:30:15.250Z"
    assert event["source"]["site"] == "hospital-a"
    client, server = event["agent"]
    assert client == {
        "type": {"coding": [APPLICATION]},
        "who": {"identifier": {"system": "urn:fhir-norse:client", "value": "ehr-backend"}},
        "requestor": True,
        "policy": ["urn:ietf:params:oauth:jti:j9"],
        "network": {"address": "10.1.2.3", "type": "2"},
    }
    assert server["type"]["coding"][0]["code"] == "AuthzOauthService"
    assert server["network"] == {"address": SERVER, "type": "5"}
    (request,) = event["entity"]
    assert request["role"] == QUERY_ROLE
    assert (
        base64.b64decode(request["query"]).decode()
        == "grant_type=client_credentials&scope=system%2FObservation.rs"
    )


def test_token_grant_refusal_records_the_reason_and_the_unknown_client() -> None:
    sink: list[dict[str, Any]] = []
    recorder = AuditRecorder(sink.append, clock=lambda: WHEN)

    recorder.record_token_grant(None, REFUSED, "client assertion signature invalid", "192.0.2.9", None)

    (event,) = sink
    validate_resource(event)
    assert event["outcome"] == "4"
    assert event["outcomeDesc"] == "client assertion signature invalid"
    assert "meta" not in event
    client = event["agent"][0]
    assert "who" not in client
    assert "policy" not in client
    assert base64.b64decode(event["entity"][0]["query"]).decode() == "grant_type=client_credentials"


def test_no_parameter_can_carry_a_token_or_an_assertion() -> None:
    for function in (build_audit_event, build_token_grant_event, AuditRecorder.record_token_grant):
        names = set(inspect.signature(function).parameters)
        assert not names & {"token", "access_token", "assertion", "client_assertion", "jwt", "authorization"}


def test_token_shaped_text_is_redacted_wherever_it_slips_in() -> None:
    event = build(
        interaction="search-type",
        outcome=REFUSED,
        resource_type="Observation",
        query=f"Observation?access_token={JWT}&code=x",
        failure_reason=f"bad token {JWT}",
    )
    grant = build_token_grant_event(
        outcome=REFUSED,
        client_id="c1",
        scopes=f"system/*.rs client_assertion={JWT}",
        source_address=None,
        recorded=WHEN,
        failure_reason=f"invalid assertion {JWT}",
    )

    for built in (event, grant):
        text = json.dumps(built)
        decoded = [base64.b64decode(e["query"]).decode() for e in built["entity"] if "query" in e]
        assert JWT not in text
        assert all(JWT not in part and "eyJ" not in part for part in decoded)
    assert base64.b64decode(entities_with_role(event, "24")[0]["query"]).decode() == (
        "Observation?access_token=redacted&code=x"
    )
    assert event["outcomeDesc"] == "bad token redacted"


def test_events_share_no_mutable_state() -> None:
    first = build(interaction="read", resource_type="Observation", resource_id="o1")
    first["type"]["code"] = "changed"
    first["agent"][0]["type"]["coding"][1]["code"] = "changed"

    second = build(interaction="read", resource_type="Observation", resource_id="o1")
    assert second["type"]["code"] == "rest"
    assert second["agent"][0]["type"]["coding"][1]["code"] == "110150"


def test_recorder_event_uses_server_defaults_and_the_clock() -> None:
    tick = WHEN.astimezone(timezone(timedelta(hours=2)))
    recorder = AuditRecorder(server_name="norse-a", server_address=SERVER, site="ward-3", clock=lambda: tick)

    event = recorder.event(
        interaction="read",
        outcome=SUCCESS,
        caller=SYSTEM,
        resource_type="Observation",
        resource_id="o1",
        source_address="10.0.0.1",
    )

    validate_resource(event)
    assert event["recorded"] == "2024-05-01T12:30:15.250Z"
    assert event["source"] == {
        "site": "ward-3",
        "observer": {"display": "norse-a"},
        "type": [APPLICATION_SERVER],
    }
    assert agents_of(event, "110153")[0]["who"] == {"display": "norse-a"}


def test_recorder_without_sink_refuses_to_drop_events() -> None:
    with pytest.raises(RuntimeError, match="no sink"):
        AuditRecorder().record_token_grant("c1", SUCCESS, None, None, None)


def test_a_failing_sink_fails_the_caller() -> None:
    def broken(event: dict[str, Any]) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        AuditRecorder(broken).record_token_grant("c1", SUCCESS, None, None, None)


def test_recorder_is_safe_to_share_between_threads() -> None:
    lock = threading.Lock()
    seen: list[str] = []

    def sink(event: dict[str, Any]) -> None:
        with lock:
            seen.append(event["agent"][0]["who"]["identifier"]["value"])

    recorder = AuditRecorder(sink)

    def record(i: int) -> None:
        recorder.record_token_grant(f"client-{i}", SUCCESS, None, "10.0.0.1", "system/*.rs")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(record, range(200)))

    assert sorted(seen) == sorted(f"client-{i}" for i in range(200))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"interaction": "search"}, "unknown interaction"),
        ({"interaction": "operation:"}, "operation:<name>"),
        ({"interaction": "read:x"}, "unknown interaction"),
        ({"outcome": "ok"}, "unknown outcome"),
        ({"failure_reason": "but it worked"}, "no failure reason"),
        ({"recorded": datetime(2024, 5, 1, 12, 0)}, "timezone-aware"),
        ({"resource_id": "bad id"}, "not a FHIR id"),
        ({"resource_type": "observation"}, "not a resource type"),
        ({"resource_type": None}, "needs its resource type"),
        ({"resource_id": None}, "needs its resource id"),
        ({"patients": ["Group/1"]}, "not a FHIR id"),
    ],
)
def test_misuse_is_rejected(changes: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "interaction": "vread",
        "outcome": SUCCESS,
        "caller": SYSTEM,
        "resource_type": "Observation",
        "resource_id": "o1",
        "version": "1",
        "recorded": WHEN,
    }
    with pytest.raises(ValueError, match=message):
        build_audit_event(**{**arguments, **changes})


def test_token_grant_through_the_generic_builder_takes_the_caller() -> None:
    caller = Caller(client_id="ehr", scopes=frozenset({"system/b.rs", "system/a.rs"}), token_id="j1")
    event = build(interaction="token-grant", caller=caller)

    assert event["meta"] == {"profile": [BALP + "IHE.IUA.71"]}
    assert event["agent"][0]["policy"] == ["urn:ietf:params:oauth:jti:j1"]
    query = base64.b64decode(event["entity"][0]["query"]).decode()
    assert query == "grant_type=client_credentials&scope=system%2Fa.rs+system%2Fb.rs"
    with pytest.raises(ValueError, match="token grant"):
        build(interaction="token-grant", caller=caller, patients=["p1"])


def test_a_malformed_token_claim_is_kept_as_an_identifier() -> None:
    caller = Caller(client_id="app", practitioner="dr 7/x")
    event = build(interaction="read", caller=caller, resource_type="Observation", resource_id="o1")

    assert agents_of(event, "IRCP")[0]["who"] == {"identifier": {"value": "dr 7/x"}}


def test_a_single_string_is_not_a_list_of_patients() -> None:
    with pytest.raises(TypeError):
        build_audit_event(
            interaction="search-type",
            outcome=SUCCESS,
            caller=SYSTEM,
            resource_type="Observation",
            patients="p1",
            recorded=WHEN,
        )
