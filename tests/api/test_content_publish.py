"""The content pack is published at start-up: idempotent, version-aware, read-only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.server.content import ContentConflict
from tests.tokens import bearer

FHIR = {"Content-Type": "application/fhir+json"}


def questionnaire(version: str, title: str = "Check-in") -> dict[str, Any]:
    return {
        "resourceType": "Questionnaire",
        "id": "check-in",
        "url": "http://fhir-norse.org/fhir/Questionnaire/check-in",
        "version": version,
        "name": "CheckIn",
        "title": title,
        "status": "active",
        "item": [{"linkId": "q1", "text": "Hvordan har du det?", "type": "string"}],
    }


def write_pack(root: Path, *resources: dict[str, Any]) -> Path:
    folder = root / "questionnaires" / "pack"
    folder.mkdir(parents=True, exist_ok=True)
    for resource in resources:
        (folder / f"{resource['resourceType']}-{resource['id']}-{resource['version']}.json").write_text(
            json.dumps(resource)
        )
    source = root / "questionnaires" / "source"
    source.mkdir(exist_ok=True)
    (source / "ignored.json").write_text(json.dumps({"resourceType": "Questionnaire", "status": "draft"}))
    return root


def started(settings: Settings, root: Path) -> Any:
    return create_app(settings.model_copy(update={"publish_content": True, "content_dir": root}))


def test_content_is_published_once_and_searchable(settings: Settings, tmp_path: Path) -> None:
    root = write_pack(tmp_path, questionnaire("1.0.0"))
    app = started(settings, root)
    with TestClient(app, headers=bearer(app)) as client:
        found = client.get(
            "/fhir/Questionnaire?url=http://fhir-norse.org/fhir/Questionnaire/check-in&version=1.0.0"
        )
        entries = found.json()["entry"]
        assert [e["resource"]["id"] for e in entries] == ["check-in-1.0.0"]
        assert client.get("/fhir/Questionnaire?name=CheckIn&status=active").json()["entry"]
    app.state.service.storage.engine.dispose()
    again = started(settings, root)  # idempotent: nothing new
    with TestClient(again, headers=bearer(again)) as client:
        history = client.get("/fhir/Questionnaire/check-in-1.0.0/_history").json()
        assert len(history["entry"]) == 1
    again.state.service.storage.engine.dispose()


def test_changed_content_with_the_same_version_is_refused(settings: Settings, tmp_path: Path) -> None:
    app = started(settings, write_pack(tmp_path, questionnaire("1.0.0")))
    app.state.service.storage.engine.dispose()
    write_pack(tmp_path, questionnaire("1.0.0", title="Changed"))
    with pytest.raises(ContentConflict, match="give the changed file a new version"):
        started(settings, tmp_path)


def test_a_new_version_is_published_beside_the_old(settings: Settings, tmp_path: Path) -> None:
    app = started(settings, write_pack(tmp_path, questionnaire("1.0.0")))
    app.state.service.storage.engine.dispose()
    app = started(settings, write_pack(tmp_path, questionnaire("1.1.0", title="Check-in, revised")))
    with TestClient(app, headers=bearer(app)) as client:
        found = client.get("/fhir/Questionnaire?url=http://fhir-norse.org/fhir/Questionnaire/check-in").json()
        assert sorted(e["resource"]["version"] for e in found["entry"]) == ["1.0.0", "1.1.0"]
    app.state.service.storage.engine.dispose()


def test_published_content_is_read_only(settings: Settings, tmp_path: Path) -> None:
    app = started(settings, write_pack(tmp_path, questionnaire("1.0.0")))
    with TestClient(app, headers=bearer(app)) as client:
        stored = client.get("/fhir/Questionnaire/check-in-1.0.0").json()
        assert client.put("/fhir/Questionnaire/check-in-1.0.0", json=stored, headers=FHIR).status_code == 405
        assert client.delete("/fhir/Questionnaire/check-in-1.0.0").status_code == 405
        patch = [{"op": "replace", "path": "/title", "value": "x"}]
        response = client.patch(
            "/fhir/Questionnaire/check-in-1.0.0",
            json=patch,
            headers={"Content-Type": "application/json-patch+json"},
        )
        assert response.status_code == 405
        # Unpublished Questionnaires stay writable (under a url of their own: the pack's url is the server's).
        draft = {**questionnaire("0.1.0"), "id": "draft", "url": "http://example.org/Questionnaire/draft"}
        assert client.put("/fhir/Questionnaire/draft", json=draft, headers=FHIR).status_code == 201
        assert client.delete("/fhir/Questionnaire/draft").status_code == 204
    app.state.service.storage.engine.dispose()
