"""``/metadata`` lists adaptive administration (issue 6): the SDC operations on Questionnaire, this
server's operations on Patient, and the ``rom-scale-override`` profile of ServiceRequest; every
operation it lists answers at its address (https://hl7.org/fhir/R4/capabilitystatement.html)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.compose import build_service
from fhir_norse.config import Settings
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.operations.registry import OperationRegistry
from fhir_norse.server.operations.validate import VALIDATE
from tests.intake_support import create_patient, publish_questionnaires
from tests.tokens import bearer

ROOT = Path(__file__).resolve().parents[2]
SDC = "http://hl7.org/fhir/uv/sdc/OperationDefinition/"
OURS = "http://fhir-norse.org/fhir/OperationDefinition/"
OVERRIDE = "http://fhir-norse.org/fhir/StructureDefinition/rom-scale-override"
ADAPTIVE = "http://fhir-norse.org/fhir/Questionnaire/nf21-adaptive|2.1.0"
FHIR = {"Content-Type": "application/fhir+json"}

EXPECTED = {
    "Questionnaire": {
        "next-question": SDC + "Questionnaire-next-question",
        "populate": SDC + "Questionnaire-populate",
    },
    "Patient": {
        "tailored-form": OURS + "Patient-tailored-form",
        "adaptive-state": OURS + "Patient-adaptive-state",
    },
}
ADAPTIVE_NAMES = {name for by_name in EXPECTED.values() for name in by_name}


def by_type(system_client: TestClient) -> dict[str, dict[str, Any]]:
    response = system_client.get("/fhir/metadata")
    assert response.status_code == 200, response.text
    return {r["type"]: r for r in response.json()["rest"][0]["resource"]}


def operations(resource: dict[str, Any]) -> dict[str, str]:
    names = [op["name"] for op in resource["operation"]]
    assert len(names) == len(set(names)), names
    return {op["name"]: op["definition"] for op in resource["operation"]}


def test_adaptive_operations_are_listed_on_their_types(system_client: TestClient) -> None:
    resources = by_type(system_client)
    for res_type, expected in EXPECTED.items():
        listed = operations(resources[res_type])
        assert {name: listed.get(name) for name in expected} == expected
        assert listed["validate"] == "http://hl7.org/fhir/OperationDefinition/Resource-validate"
        for op in resources[res_type]["operation"]:
            if op["name"] in expected:
                assert op["documentation"].strip()
    # Nowhere else: the operations are type- or instance-level on Questionnaire and Patient only.
    for res_type, resource in resources.items():
        if res_type not in EXPECTED:
            assert not ADAPTIVE_NAMES & set(operations(resource)), res_type
    # $extract stays where it was.
    assert "extract" in operations(resources["QuestionnaireResponse"])


def test_service_request_supports_the_scale_override_profile(system_client: TestClient) -> None:
    service_request = by_type(system_client)["ServiceRequest"]
    assert service_request["supportedProfile"] == [OVERRIDE]
    assert service_request["profile"] == "http://hl7.org/fhir/StructureDefinition/ServiceRequest"
    assert {"create", "update", "read", "search-type"} <= {i["code"] for i in service_request["interaction"]}
    params = {p["name"] for p in service_request["searchParam"]}
    assert {"subject", "patient", "status", "code", "category"} <= params


def test_the_supported_profile_is_enforced_by_validate(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    body: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "meta": {"profile": [OVERRIDE]},
        "status": "active",
        "intent": "order",
        "doNotPerform": False,
        "category": [
            {
                "coding": [
                    {"system": "http://fhir-norse.org/fhir/CodeSystem/rom-codes", "code": "scale-override"}
                ]
            }
        ],
        "code": {"coding": [{"system": "http://fhir-norse.org/fhir/CodeSystem/nf21-scales", "code": "sad"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "authoredOn": "2026-03-01T10:00:00+01:00",
        "requester": {"reference": "Practitioner/dr-hansen"},
        "reasonCode": [{"text": "Sadness is the focus of treatment"}],
    }
    ok = system_client.post("/fhir/ServiceRequest/$validate", json=body, headers=FHIR)
    assert ok.status_code == 200
    assert [i["severity"] for i in ok.json()["issue"]] == ["information"]
    del body["requester"]
    bad = system_client.post("/fhir/ServiceRequest/$validate", json=body, headers=FHIR)
    errors = [i for i in bad.json()["issue"] if i["severity"] == "error"]
    assert [i["expression"] for i in errors] == [["ServiceRequest.requester"]]
    assert "rom-scale-override" in errors[0]["diagnostics"]


def test_every_listed_adaptive_operation_answers(app: FastAPI, system_client: TestClient) -> None:
    publish_questionnaires(app.state.service)
    patient = create_patient(system_client)
    state = system_client.get(f"/fhir/Patient/{patient}/$adaptive-state")
    assert state.status_code == 200, state.text
    assert state.json()["resourceType"] == "Parameters"
    form = system_client.post(f"/fhir/Patient/{patient}/$tailored-form", json={"resourceType": "Parameters"})
    assert form.status_code == 200, form.text
    assert form.json()["resourceType"] == "Questionnaire"
    populated = system_client.get(f"/fhir/Questionnaire/$populate?subject=Patient/{patient}")
    assert populated.status_code == 200, populated.text
    assert populated.json()["parameter"][0]["name"] == "response"
    first = system_client.post(
        "/fhir/Questionnaire/$next-question",
        json={
            "resourceType": "QuestionnaireResponse",
            "status": "in-progress",
            "subject": {"reference": f"Patient/{patient}"},
            "questionnaire": ADAPTIVE,
        },
    )
    assert first.status_code == 200, first.text
    assert first.json()["contained"][0]["item"][0]["linkId"] == "page-triggers"


def _app_with(settings: Settings, service: FhirService) -> Iterator[TestClient]:
    app = create_app(settings, service)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.headers.update(bearer(app))
        yield test_client
    service.storage.engine.dispose()


def test_without_an_adaptive_instrument_nothing_adaptive_is_listed(
    settings: Settings, tmp_path: Path
) -> None:
    """A server whose content pack scores only PHQ-9 runs no adaptive administration, so the
    composition root registers none of its operations and the CapabilityStatement lists none."""
    pack = tmp_path / "pack"
    for folder in ("questionnaires", "profiles"):
        shutil.copytree(ROOT / folder, pack / folder)
    (pack / "mappings").mkdir()
    shutil.copy(ROOT / "mappings" / "phq9-1.0.0.yaml", pack / "mappings")
    local = settings.model_copy(update={"content_dir": pack})
    for system_client in _app_with(local, build_service(local)):
        resources = by_type(system_client)
        for res_type in EXPECTED:
            assert not ADAPTIVE_NAMES & set(operations(resources[res_type])), res_type
        assert "extract" in operations(resources["QuestionnaireResponse"])
        # The profile is the content pack's, not the instrument's: still listed.
        assert resources["ServiceRequest"]["supportedProfile"] == [OVERRIDE]
        # And what is not listed does not answer.
        answer = system_client.get("/fhir/Patient/p/$adaptive-state")
        assert answer.status_code == 400 and "not supported" in answer.text


def test_without_scoring_nothing_adaptive_is_listed(settings: Settings) -> None:
    """The CapabilityStatement is the operation registry: a server built without the scoring layer
    (only the generic ``$validate``) lists neither ``$extract`` nor the adaptive operations."""
    full = build_service(settings)
    bare = FhirService(replace(full.kernel, hooks={}), OperationRegistry([VALIDATE]))
    for system_client in _app_with(settings, bare):
        resources = by_type(system_client)
        for resource in resources.values():
            assert not ADAPTIVE_NAMES & set(operations(resource))
            assert "extract" not in operations(resource)
            assert set(operations(resource)) == {"validate"}
