"""One rule for what a restricted caller cannot reach (issue 11): every interaction and every operation
answers 404 for a resource, or a patient, outside the caller's compartments, exactly as it answers for
one that does not exist. Scopes that do not allow an interaction at all answer 403. (SQLite and
PostgreSQL.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from tests.intake_support import (
    FHIR,
    NF21_STATIC,
    create_patient,
    nf21_answers,
    post_response,
    publish_questionnaires,
    response,
)
from tests.tokens import bearer

ADAPTIVE = "http://fhir-norse.org/fhir/Questionnaire/nf21-adaptive|2.1.0"


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    application = create_app(settings)
    publish_questionnaires(application.state.service)
    yield application
    application.state.service.storage.engine.dispose()


@pytest.fixture
def world(app: FastAPI, system_client: TestClient) -> dict[str, str]:
    """Two patients, each with a scored response (and so Observations) stored by the system."""
    mine = create_patient(system_client)
    other = create_patient(system_client, family="Hansen")
    ids = {"mine": mine, "other": other}
    for who in ("mine", "other"):
        stored = post_response(system_client, response(NF21_STATIC, nf21_answers(), patient=ids[who]))
        assert stored.status_code == 201, stored.text
        ids[f"{who}_qr"] = stored.json()["id"]
    return ids


def _qr_for(patient: str) -> dict[str, Any]:
    return response(NF21_STATIC, nf21_answers(), patient=patient)


# Each entry: a name and how to call it on a patient's resources, given ids of "a patient" and of
# "that patient's response" (the same call is made for the other patient and for ids that do not exist).
INTERACTIONS: dict[str, Callable[[TestClient, str, str, dict[str, str]], httpx.Response]] = {
    "read": lambda c, p, qr, h: c.get(f"/fhir/Patient/{p}", headers=h),
    "vread": lambda c, p, qr, h: c.get(f"/fhir/Patient/{p}/_history/1", headers=h),
    "history-instance": lambda c, p, qr, h: c.get(f"/fhir/Patient/{p}/_history", headers=h),
    "read (response)": lambda c, p, qr, h: c.get(f"/fhir/QuestionnaireResponse/{qr}", headers=h),
    "patch": lambda c, p, qr, h: c.patch(
        f"/fhir/Patient/{p}",
        json=[{"op": "add", "path": "/gender", "value": "other"}],
        headers={**h, "Content-Type": "application/json-patch+json"},
    ),
    "delete": lambda c, p, qr, h: c.delete(f"/fhir/QuestionnaireResponse/{qr}", headers=h),
}
OPERATIONS: dict[str, Callable[[TestClient, str, str, dict[str, str]], httpx.Response]] = {
    "validate": lambda c, p, qr, h: c.post(
        f"/fhir/Patient/{p}/$validate", json={"resourceType": "Patient", "id": p}, headers={**h, **FHIR}
    ),
    "extract": lambda c, p, qr, h: c.get(f"/fhir/QuestionnaireResponse/{qr}/$extract", headers=h),
    "extract (type level)": lambda c, p, qr, h: c.post(
        "/fhir/QuestionnaireResponse/$extract", json=_qr_for(p), headers={**h, **FHIR}
    ),
    "next-question": lambda c, p, qr, h: c.post(
        "/fhir/Questionnaire/$next-question",
        json={
            "resourceType": "QuestionnaireResponse",
            "status": "in-progress",
            "subject": {"reference": f"Patient/{p}"},
            "questionnaire": ADAPTIVE,
        },
        headers={**h, **FHIR},
    ),
    "populate": lambda c, p, qr, h: c.get(f"/fhir/Questionnaire/$populate?subject=Patient/{p}", headers=h),
    "tailored-form": lambda c, p, qr, h: c.get(f"/fhir/Patient/{p}/$tailored-form", headers=h),
    "adaptive-state": lambda c, p, qr, h: c.get(f"/fhir/Patient/{p}/$adaptive-state", headers=h),
    "everything": lambda c, p, qr, h: c.get(f"/fhir/Patient/{p}/$everything", headers=h),
}


# Operations for backend services only (system scopes) or on types no patient's compartment holds
# (Subscription): a patient or practitioner token gets 403 there, whatever patient it names.
SYSTEM_ONLY_OPERATIONS: dict[str, Callable[[TestClient, dict[str, str]], httpx.Response]] = {
    "export": lambda c, h: c.get(
        "/fhir/$export", headers={**h, "Prefer": "respond-async", "Accept": "application/fhir+json"}
    ),
    "status": lambda c, h: c.get("/fhir/Subscription/$status", headers=h),
    "events": lambda c, h: c.get("/fhir/Subscription/any/$events", headers=h),
}


def test_every_registered_operation_is_covered(app: FastAPI) -> None:
    registered = {o.name for o in app.state.service.operations}
    covered = {name.split(" ")[0] for name in [*OPERATIONS, *SYSTEM_ONLY_OPERATIONS]}
    assert registered == covered


@pytest.mark.parametrize("name", SYSTEM_ONLY_OPERATIONS)
def test_system_only_operations_refuse_restricted_tokens(
    app: FastAPI, system_client: TestClient, world: dict[str, str], name: str
) -> None:
    for token in (
        bearer(app, "patient/*.cruds", patient=world["mine"]),
        bearer(app, "user/*.cruds", practitioner="someone"),
    ):
        answer = SYSTEM_ONLY_OPERATIONS[name](system_client, token)
        assert answer.status_code == 403, (name, answer.text)
        assert answer.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("name", [*INTERACTIONS, *OPERATIONS])
def test_out_of_reach_answers_as_absent(
    app: FastAPI, system_client: TestClient, world: dict[str, str], name: str
) -> None:
    call = INTERACTIONS.get(name) or OPERATIONS[name]
    token = bearer(app, "patient/*.cruds", patient=world["mine"])
    mine = call(system_client, world["mine"], world["mine_qr"], token)
    assert mine.status_code < 400, (name, mine.status_code, mine.text)
    other = call(system_client, world["other"], world["other_qr"], token)
    absent = call(system_client, "no-such-patient", "no-such-response", token)
    assert other.status_code == 404, (name, other.status_code, other.text)
    assert absent.status_code == 404, (name, absent.status_code, absent.text)
    assert other.json()["resourceType"] == absent.json()["resourceType"] == "OperationOutcome"
    assert other.json()["issue"][0]["code"] == absent.json()["issue"][0]["code"]
    # The system can reach both: the 404 was the compartment, not the resource.
    assert call(system_client, world["other"], world["other_qr"], {}).status_code < 400


def test_scopes_that_do_not_allow_an_interaction_answer_403(
    app: FastAPI, system_client: TestClient, world: dict[str, str]
) -> None:
    reader = bearer(app, "patient/Observation.rs", patient=world["mine"])
    assert system_client.get(f"/fhir/Patient/{world['mine']}", headers=reader).status_code == 403
    assert (
        system_client.get(f"/fhir/Patient/{world['mine']}/$adaptive-state", headers=reader).status_code == 403
    )


def test_a_write_placed_out_of_reach_is_403_whether_or_not_its_target_exists(
    app: FastAPI, system_client: TestClient, world: dict[str, str]
) -> None:
    """New content naming another patient is refused before any hook looks at it, so the answer for an
    existing patient equals the answer for one that does not exist (intake would otherwise answer 422
    'not known' for the second and tell them apart)."""
    token = {**bearer(app, "patient/*.cruds", patient=world["mine"]), **FHIR}
    other = system_client.post("/fhir/QuestionnaireResponse", json=_qr_for(world["other"]), headers=token)
    absent = system_client.post("/fhir/QuestionnaireResponse", json=_qr_for("no-such-patient"), headers=token)
    assert other.status_code == absent.status_code == 403, (other.text, absent.text)
    assert other.json()["issue"][0]["diagnostics"] == absent.json()["issue"][0]["diagnostics"]


def test_conditional_matches_in_a_transaction_see_only_what_is_in_reach(
    app: FastAPI, system_client: TestClient, world: dict[str, str]
) -> None:
    """A conditional reference (``Patient?identifier=...``) in a patient's transaction resolves only
    within reach: another patient's identifier matches nothing, exactly like an unknown one."""
    system_client.put(
        f"/fhir/Patient/{world['other']}",
        json={
            "resourceType": "Patient",
            "id": world["other"],
            "identifier": [{"system": "urn:mrn", "value": "other-1"}],
        },
        headers=FHIR,
    ).raise_for_status()
    token = {**bearer(app, "patient/*.cruds", patient=world["mine"]), **FHIR}

    def transaction(identifier: str) -> dict[str, Any]:
        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "note"},
            "subject": {"reference": f"Patient?identifier=urn:mrn|{identifier}"},
        }
        return {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": observation, "request": {"method": "POST", "url": "Observation"}}],
        }

    other = system_client.post("/fhir", json=transaction("other-1"), headers=token)
    absent = system_client.post("/fhir", json=transaction("no-such-identifier"), headers=token)
    assert other.status_code == absent.status_code == 412, (other.text, absent.text)
    # The system reaches that patient: the same reference resolves.
    resolved = system_client.post("/fhir", json=transaction("other-1"), headers=FHIR)
    assert resolved.status_code == 200, resolved.text
