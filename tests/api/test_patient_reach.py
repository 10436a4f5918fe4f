"""Issue 12, items 1, 2 and 3 (second half): what a ``patient/`` or ``user/`` token reaches (SQLite and
PostgreSQL).

1. A type outside the R4 Patient compartment is reached only where this server says how it belongs to a
   patient (Task by ``for``/``owner``, Binary by ``securityContext``); Subscription not at all.
2. A write by a restricted caller may name no patient outside its reach in any compartment reference.
3. ``_has`` (and chains) see only what the caller may search itself: no existence oracle.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.auth.compartment import SECURITY_CONTEXT, SERVER_COMPARTMENT, Reach, reach_of
from fhir_norse.config import Settings
from fhir_norse.store.resource_types import SUPPORTED_TYPES
from fhir_norse.store.search.params import default_registry
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
from tests.tokens import bearer

SECRET = "Authorization: Bearer hospital-webhook-secret"


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    application = create_app(settings)
    publish_questionnaires(application.state.service)
    yield application
    application.state.service.storage.engine.dispose()


@pytest.fixture
def world(system_client: TestClient) -> dict[str, str]:
    """Two patients of two organizations, each with an urgent response (so a Flag and a review Task),
    and a therapist whose care team holds only the first."""
    ids: dict[str, str] = {}
    for who, family in (("mine", "Nordmann"), ("other", "Hansen")):
        org = system_client.post(
            "/fhir/Organization",
            json={"resourceType": "Organization", "name": f"{family} clinic"},
            headers=FHIR,
        )
        ids[f"{who}_org"] = org.json()["id"]
        ids[who] = create_patient(
            system_client,
            family=family,
            managingOrganization={"reference": f"Organization/{ids[f'{who}_org']}"},
        )
        stored = post_response(
            system_client, response(NF21_STATIC, nf21_answers({"suicide": 6}), patient=ids[who])
        )
        assert stored.status_code == 201, stored.text
        ids[f"{who}_qr"] = stored.json()["id"]
        (task,) = search(system_client, f"Task?patient=Patient/{ids[who]}")
        ids[f"{who}_task"] = task["id"]
    system_client.put(
        "/fhir/Practitioner/therapist", json={"resourceType": "Practitioner", "id": "therapist"}, headers=FHIR
    ).raise_for_status()
    team = {
        "resourceType": "CareTeam",
        "status": "active",
        "subject": {"reference": f"Patient/{ids['mine']}"},
        "participant": [{"member": {"reference": "Practitioner/therapist"}}],
    }
    assert system_client.post("/fhir/CareTeam", json=team, headers=FHIR).status_code == 201
    return ids


def patient_token(app: FastAPI, world: dict[str, str], scope: str = "patient/*.cruds") -> dict[str, str]:
    return {**bearer(app, scope, patient=world["mine"]), **FHIR}


def therapist_token(app: FastAPI) -> dict[str, str]:
    return {**bearer(app, "user/*.cruds", practitioner="therapist"), **FHIR}


def matches(answer: httpx.Response) -> set[str]:
    assert answer.status_code == 200, answer.text
    return {e["resource"]["id"] for e in answer.json().get("entry", []) if e["search"]["mode"] == "match"}


def refused(answer: httpx.Response, status: int, code: str) -> str:
    """The diagnostics of an OperationOutcome answer with ``status`` and issue ``code``."""
    assert answer.status_code == status, answer.text
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == code, outcome
    return str(outcome["issue"][0].get("diagnostics", ""))


# --- item 1: types outside the R4 compartment -------------------------------------------------------------


def test_every_stored_type_has_a_rule() -> None:
    """The table of the README: every type the server stores says how it belongs to a patient, and a
    type with no rule (only Subscription, and any type added later until it is classified) and a cohort
    (Group, whose member list names other patients) are out of reach. The server's own parameters are
    indexed reference parameters, so searches can be limited."""
    unreachable = {t for t in SUPPORTED_TYPES if reach_of(t) is Reach.NONE}
    assert unreachable == {"Subscription", "Group"}
    assert reach_of("Task") is reach_of("Binary") is reach_of("Observation") is Reach.PATIENTS
    assert reach_of("Questionnaire") is reach_of("Organization") is Reach.SHARED
    registry = default_registry()
    for resource_type, params in SERVER_COMPARTMENT.items():
        for code in params:
            if code != SECURITY_CONTEXT:
                definition = registry.get(resource_type, code)
                assert definition is not None and definition.type == "reference", (resource_type, code)
                assert definition in registry.indexed(resource_type), (resource_type, code)


def test_a_task_is_reached_through_the_patient_it_is_for(
    app: FastAPI, system_client: TestClient, world: dict[str, str]
) -> None:
    """``Task?patient=<other>`` used to return the other patient's urgent "review suicide risk" Task."""
    for headers in (patient_token(app, world), therapist_token(app)):
        assert (
            matches(system_client.get(f"/fhir/Task?patient=Patient/{world['other']}", headers=headers))
            == set()
        )
        assert matches(system_client.get("/fhir/Task", headers=headers)) == {world["mine_task"]}
        refused(system_client.get(f"/fhir/Task/{world['other_task']}", headers=headers), 404, "not-found")
        refused(
            system_client.get(f"/fhir/Task/{world['other_task']}/_history", headers=headers), 404, "not-found"
        )
        mine = system_client.get(f"/fhir/Task/{world['mine_task']}", headers=headers)
        assert mine.status_code == 200 and mine.json()["for"]["reference"] == f"Patient/{world['mine']}"
        history = system_client.get("/fhir/Task/_history", headers=headers).json()
        assert {e["resource"]["id"] for e in history.get("entry", [])} == {world["mine_task"]}
        # Through _revinclude from the Flags the caller reaches, only its own Task comes along.
        flags = system_client.get("/fhir/Flag?_revinclude=Task:focus", headers=headers).json()
        included = {e["resource"]["id"] for e in flags["entry"] if e["search"]["mode"] == "include"}
        assert included == {world["mine_task"]}
    # The system reaches both; a patient may write a Task for itself (the rule of writes is item 2's).
    assert matches(system_client.get("/fhir/Task")) == {world["mine_task"], world["other_task"]}
    own = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "for": {"reference": f"Patient/{world['mine']}"},
    }
    assert system_client.post("/fhir/Task", json=own, headers=patient_token(app, world)).status_code == 201


def _subscription() -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Alerts to the EHR",
        # A topic of this server (Subscriptions R5 Backport, R4 form: tests/api/test_subscriptions.py).
        "criteria": "http://fhir-norse.org/fhir/SubscriptionTopic/alert",
        "channel": {
            "type": "rest-hook",
            "endpoint": "https://ehr.example/hook",
            "payload": "application/fhir+json",
            "header": [SECRET],
        },
    }


def test_subscriptions_are_out_of_reach_of_patient_and_user_tokens(
    app: FastAPI, system_client: TestClient, world: dict[str, str]
) -> None:
    """Every Subscription (with its channel secret) used to be readable with any ``patient/`` token."""
    created = system_client.post("/fhir/Subscription", json=_subscription(), headers=FHIR)
    assert created.status_code == 201, created.text
    sub = created.json()["id"]
    for headers in (patient_token(app, world), therapist_token(app)):
        for answer in (
            system_client.get("/fhir/Subscription", headers=headers),
            system_client.get(f"/fhir/Subscription/{sub}", headers=headers),
            system_client.get(f"/fhir/Subscription/{sub}/_history", headers=headers),
            system_client.post("/fhir/Subscription", json=_subscription(), headers=headers),
            system_client.delete(f"/fhir/Subscription/{sub}", headers=headers),
        ):
            assert SECRET not in answer.text
            assert "Subscription resources belong to no patient" in refused(answer, 403, "forbidden")
        everything = system_client.get("/fhir/_history?_count=1000", headers=headers).json()
        assert SECRET not in str(everything)
        kinds = {e["resource"]["resourceType"] for e in everything.get("entry", []) if "resource" in e}
        assert "Subscription" not in kinds and "Task" in kinds
    (stored,) = search(system_client, "Subscription")
    assert stored["id"] == sub and stored["meta"]["versionId"] == "1"  # nothing was written or deleted


def _binary(context: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Binary",
        "contentType": "text/plain",
        "data": base64.b64encode(b"session notes").decode(),
    }
    if context is not None:
        body["securityContext"] = {"reference": context}
    return body


def test_a_binary_is_reached_through_its_security_context(
    app: FastAPI, system_client: TestClient, world: dict[str, str]
) -> None:
    """Other patients' Binaries used to be readable; a Binary now follows the resource its
    securityContext names (the patient, or a resource in a patient's compartment)."""
    contexts = {
        "mine": f"Patient/{world['mine']}",
        "mine_qr": f"QuestionnaireResponse/{world['mine_qr']}",
        "other": f"Patient/{world['other']}",
        "other_qr": f"QuestionnaireResponse/{world['other_qr']}",
        "none": None,
    }
    binaries = {}
    for name, context in contexts.items():
        created = system_client.post("/fhir/Binary", json=_binary(context), headers=FHIR)
        assert created.status_code == 201, created.text
        binaries[name] = created.json()["id"]
    for headers in (patient_token(app, world), therapist_token(app)):
        for name in ("mine", "mine_qr"):
            assert system_client.get(f"/fhir/Binary/{binaries[name]}", headers=headers).status_code == 200
        absent = refused(system_client.get("/fhir/Binary/no-such-binary", headers=headers), 404, "not-found")
        for name in ("other", "other_qr", "none"):
            answer = system_client.get(f"/fhir/Binary/{binaries[name]}", headers=headers)
            assert refused(answer, 404, "not-found") == absent.replace("no-such-binary", binaries[name])
        # Its securityContext is no search parameter, so a restricted search cannot be limited: refused.
        assert "by id" in refused(system_client.get("/fhir/Binary", headers=headers), 403, "forbidden")
    # A patient writes Binaries of its own only.
    headers = patient_token(app, world)
    assert (
        system_client.post("/fhir/Binary", json=_binary(contexts["mine"]), headers=headers).status_code == 201
    )
    for context in (contexts["other"], contexts["other_qr"], None):
        refused(system_client.post("/fhir/Binary", json=_binary(context), headers=headers), 403, "forbidden")
    assert len(search(system_client, "Binary")) == len(contexts) + 1


def test_shared_types_stay_readable_but_not_writable_and_the_access_log_is_the_patients_own(
    app: FastAPI, system_client: TestClient, world: dict[str, str]
) -> None:
    headers = patient_token(app, world)
    assert matches(system_client.get("/fhir/Questionnaire", headers=headers))
    assert matches(system_client.get("/fhir/Practitioner", headers=headers)) == {"therapist"}
    questionnaire = {"resourceType": "Questionnaire", "status": "draft", "url": "http://example.org/q"}
    answer = system_client.post("/fhir/Questionnaire", json=questionnaire, headers=headers)
    assert "Only system access" in refused(answer, 403, "forbidden")
    # The patient's reads are in its own access log; the other patient's log stays out of reach.
    system_client.get(f"/fhir/Task/{world['mine_task']}", headers=headers).raise_for_status()
    log = system_client.get(f"/fhir/AuditEvent?patient=Patient/{world['mine']}", headers=headers)
    assert matches(log)
    assert (
        matches(system_client.get(f"/fhir/AuditEvent?patient=Patient/{world['other']}", headers=headers))
        == set()
    )


# --- item 2: writes stay within the caller's patients ------------------------------------------------------


def _observation(subject: str, performer: str, identifier: str = "x-1") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:test", "value": identifier}],
        "status": "final",
        "code": {"text": "note"},
        "subject": {"reference": subject},
        "performer": [{"reference": performer}],
    }


def _writes(world: dict[str, str]) -> dict[str, Any]:
    """Ways of writing an Observation about ``other`` that names ``mine`` as performer."""
    mine, other = f"Patient/{world['mine']}", f"Patient/{world['other']}"
    into_other = _observation(other, mine)
    return {
        "create": ("POST", "/fhir/Observation", into_other),
        "absolute reference": (
            "POST",
            "/fhir/Observation",
            _observation(f"https://elsewhere.example/fhir/{other}", mine),
        ),
        "update": ("PUT", "/fhir/Observation/planted", {**into_other, "id": "planted"}),
        "conditional create": (
            "POST",
            "/fhir/Observation",
            into_other,
            {"If-None-Exist": "identifier=urn:test|x-1"},
        ),
        "conditional update": ("PUT", "/fhir/Observation?identifier=urn:test|x-1", into_other),
        "transaction": (
            "POST",
            "/fhir",
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{"resource": into_other, "request": {"method": "POST", "url": "Observation"}}],
            },
        ),
        "task": (
            "POST",
            "/fhir/Task",
            {
                "resourceType": "Task",
                "status": "requested",
                "intent": "order",
                "for": {"reference": other},
                "owner": {"reference": mine},
            },
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "create",
        "absolute reference",
        "update",
        "conditional create",
        "conditional update",
        "transaction",
        "task",
    ],
)
def test_a_patient_cannot_write_into_another_patients_record(
    app: FastAPI, system_client: TestClient, world: dict[str, str], name: str
) -> None:
    """An Observation about another patient with the caller as performer used to be stored (201) and show
    in the victim's record; every patient a compartment reference names must be the caller's."""
    method, url, body, *extra = _writes(world)[name]
    before = {
        t: len(search(system_client, f"{t}?patient=Patient/{world['other']}"))
        for t in ("Observation", "Task")
    }
    headers = {**patient_token(app, world), **(extra[0] if extra else {})}
    answer = system_client.request(method, url, json=body, headers=headers)
    assert "and to no other" in refused(answer, 403, "forbidden")
    after = {
        t: len(search(system_client, f"{t}?patient=Patient/{world['other']}"))
        for t in ("Observation", "Task")
    }
    assert after == before
    assert search(system_client, "Observation?identifier=urn:test|x-1") == []
    # The same content about the caller alone is written.
    own = system_client.post(
        "/fhir/Observation",
        json=_observation(f"Patient/{world['mine']}", f"Patient/{world['mine']}"),
        headers=headers,
    )
    assert own.status_code in (200, 201), own.text


def test_a_patch_cannot_add_another_patient(
    app: FastAPI, system_client: TestClient, world: dict[str, str]
) -> None:
    headers = patient_token(app, world)
    mine = f"Patient/{world['mine']}"
    created = system_client.post("/fhir/Observation", json=_observation(mine, mine), headers=headers)
    assert created.status_code == 201, created.text
    patch = [{"op": "add", "path": "/performer/-", "value": {"reference": f"Patient/{world['other']}"}}]
    answer = system_client.patch(
        f"/fhir/Observation/{created.json()['id']}",
        json=patch,
        headers={**headers, "Content-Type": "application/json-patch+json"},
    )
    refused(answer, 403, "forbidden")
    stored = system_client.get(f"/fhir/Observation/{created.json()['id']}").json()
    assert stored["meta"]["versionId"] == "1" and stored["performer"] == [{"reference": mine}]


def test_a_practitioner_cannot_extend_its_reach_with_a_care_team(
    app: FastAPI, system_client: TestClient, world: dict[str, str]
) -> None:
    """A CareTeam naming a patient outside the practitioner's care next to one inside it used to be
    accepted, and so handed the practitioner the other patient's whole record."""
    headers = therapist_token(app)
    team = {
        "resourceType": "CareTeam",
        "status": "active",
        "subject": {"reference": f"Patient/{world['other']}"},
        "participant": [
            {"member": {"reference": "Practitioner/therapist"}},
            {"member": {"reference": f"Patient/{world['mine']}"}},
        ],
    }
    refused(system_client.post("/fhir/CareTeam", json=team, headers=headers), 403, "forbidden")
    refused(system_client.get(f"/fhir/Patient/{world['other']}", headers=headers), 404, "not-found")
    assert search(system_client, f"CareTeam?patient=Patient/{world['other']}") == []


# --- item 3: _has and chains ------------------------------------------------------------------------------


def test_has_is_no_existence_oracle(app: FastAPI, system_client: TestClient, world: dict[str, str]) -> None:
    """``Organization?_has:Patient:organization:name=<someone>`` used to answer with that someone's
    Organization; the Patients ``_has`` looks at are now only those the caller reaches."""
    headers = patient_token(app, world)
    probe = "/fhir/Organization?_has:Patient:organization:name="
    assert matches(system_client.get(probe + "Hansen", headers=headers)) == set()
    assert matches(system_client.get(probe + "Hansen")) == {world["other_org"]}  # the system sees it
    assert matches(system_client.get(probe + "Nordmann", headers=headers)) == {world["mine_org"]}
    # On a compartment type too: the other patient's responses do not say which of them exist.
    qr_probe = "/fhir/Patient?_has:QuestionnaireResponse:subject:status=completed"
    assert matches(system_client.get(qr_probe, headers=therapist_token(app))) == {world["mine"]}
    # Scopes that do not allow searching the _has source refuse it; a chain's targets likewise.
    narrow = patient_token(app, world, "patient/Organization.rs patient/Observation.rs")
    assert "Patient" in refused(system_client.get(probe + "Nordmann", headers=narrow), 403, "forbidden")
    answer = system_client.get("/fhir/Observation?subject:Patient.name=Hansen", headers=narrow)
    assert "Patient" in refused(answer, 403, "forbidden")
