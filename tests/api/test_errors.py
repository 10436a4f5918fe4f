"""Every error is an OperationOutcome with the right status: https://hl7.org/fhir/R4/http.html."""

from __future__ import annotations

from fastapi.testclient import TestClient

from fhir_norse.config import Settings
from tests.tokens import bearer

FHIR = {"Content-Type": "application/fhir+json"}


def outcome(response: object) -> dict[str, object]:
    body = response.json()  # type: ignore[attr-defined]
    assert body["resourceType"] == "OperationOutcome"
    return body  # type: ignore[no-any-return]


def test_malformed_json_is_400(system_client: TestClient) -> None:
    response = system_client.post("/fhir/Patient", content=b'{"resourceType": "Patient",', headers=FHIR)
    assert response.status_code == 400
    assert outcome(response)["issue"][0]["code"] == "structure"  # type: ignore[index]


def test_non_object_body_is_400(system_client: TestClient) -> None:
    assert system_client.post("/fhir/Patient", content=b"[1, 2]", headers=FHIR).status_code == 400
    assert system_client.post("/fhir/Patient", content=b"", headers=FHIR).status_code == 400


def test_invalid_resource_points_at_element(system_client: TestClient) -> None:
    response = system_client.post(
        "/fhir/Observation",
        json={"resourceType": "Observation", "status": "bogus", "code": {"text": "x"}},
        headers=FHIR,
    )
    assert response.status_code == 400
    expressions = [e for i in outcome(response)["issue"] for e in i.get("expression", [])]  # type: ignore[attr-defined]
    assert "Observation.status" in expressions
    response = system_client.post(
        "/fhir/Patient", json={"resourceType": "Patient", "birthDate": 1970}, headers=FHIR
    )
    assert response.status_code == 400
    response = system_client.post(
        "/fhir/Patient", json={"resourceType": "Patient", "unknownThing": True}, headers=FHIR
    )
    assert response.status_code == 400


def test_type_mismatch_between_url_and_body_is_400(system_client: TestClient) -> None:
    response = system_client.post(
        "/fhir/Patient",
        json={"resourceType": "Observation", "status": "final", "code": {"text": "x"}},
        headers=FHIR,
    )
    assert response.status_code == 400


def test_unsupported_content_type_is_415(system_client: TestClient) -> None:
    response = system_client.post(
        "/fhir/Patient", content=b"<Patient/>", headers={"Content-Type": "application/xml"}
    )
    assert response.status_code == 415
    outcome(response)


def test_body_over_limit_is_413(settings: Settings) -> None:
    from fhir_norse.api.app import create_app

    small = settings.model_copy(update={"max_body_bytes": 200})
    app = create_app(small)
    with TestClient(app, headers=bearer(app)) as system_client:
        big = {"resourceType": "Patient", "name": [{"text": "x" * 500}]}
        response = system_client.post("/fhir/Patient", json=big, headers=FHIR)
        assert response.status_code == 413
        outcome(response)
        assert system_client.get("/fhir/Patient?_total=accurate").json()["total"] == 0
    app.state.service.storage.engine.dispose()


def test_method_not_allowed_is_405(system_client: TestClient) -> None:
    response = system_client.post("/fhir/Patient/123", json={"resourceType": "Patient"}, headers=FHIR)
    assert response.status_code == 405
    outcome(response)
    assert (
        system_client.put("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR).status_code == 405
    )


def test_unknown_path_is_404_outcome(system_client: TestClient) -> None:
    response = system_client.get("/fhir/Patient/1/2/3/4/5")
    assert response.status_code == 404
    outcome(response)


def test_internal_error_is_500_without_internals(settings: Settings) -> None:
    from fhir_norse.api.app import create_app

    app = create_app(settings)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("secret database password in message")

    app.state.service.perform = broken
    with TestClient(app, raise_server_exceptions=False, headers=bearer(app)) as system_client:
        response = system_client.get("/fhir/Patient/1")
    assert response.status_code == 500
    text = response.text
    assert "secret" not in text and "RuntimeError" not in text
    assert outcome(response)["issue"][0]["code"] == "exception"  # type: ignore[index]
    assert response.headers["X-Request-ID"]
    app.state.service.storage.engine.dispose()
