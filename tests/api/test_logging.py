"""Logs carry the request id and never resource content."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from fhir_norse.api.app import RequestIdFilter, create_app
from fhir_norse.config import Settings
from tests.tokens import bearer


def test_request_id_is_echoed_and_generated(system_client: TestClient) -> None:
    given = system_client.get("/fhir/metadata", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    generated = system_client.get("/fhir/metadata").headers["X-Request-ID"]
    assert len(generated) == 32


def test_error_log_has_request_id_but_no_resource_content(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom")

    app.state.service.perform = broken
    caplog.handler.addFilter(RequestIdFilter())
    with (
        caplog.at_level(logging.INFO, logger="fhir_norse"),
        TestClient(app, raise_server_exceptions=False, headers=bearer(app)) as system_client,
    ):
        response = system_client.post(
            "/fhir/Patient",
            json={"resourceType": "Patient", "name": [{"family": "Confidential-Surname"}]},
            headers={"Content-Type": "application/fhir+json", "X-Request-ID": "req-42"},
        )
    app.state.service.storage.engine.dispose()
    assert response.status_code == 500
    records = [r for r in caplog.records if r.name.startswith("fhir_norse") and r.levelno >= logging.ERROR]
    assert records, "the failure was not logged"
    assert all(getattr(r, "request_id", None) == "req-42" for r in records)
    logged = "\n".join(r.getMessage() + (caplog.text or "") for r in records)
    assert "Confidential-Surname" not in logged
