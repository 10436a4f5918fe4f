"""Derived writes pass the storage seam's checks (issue 11): a scale-score Observation that a broken
builder makes non-conformant, to its profile or to R4, is refused with a 422 naming it, and nothing of
the write is stored, neither the response nor any score (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_norse.scoring.resources import AdministrationResources
from tests.intake_support import NF21_STATIC, create_patient, nf21_answers, post_response, response, search

SCALE_SCORE = "http://fhir-norse.org/fhir/StructureDefinition/rom-scale-score"


def _break_first_scale_score(
    monkeypatch: pytest.MonkeyPatch, damage: Callable[[dict[str, Any]], None]
) -> None:
    """Make the builder return its first scale score damaged (the rest as built)."""
    built = AdministrationResources.resources

    def broken(self: AdministrationResources) -> list[dict[str, Any]]:
        resources = built(self)
        first = next(r for r in resources if SCALE_SCORE in r.get("meta", {}).get("profile", []))
        damage(first)
        return resources

    monkeypatch.setattr(AdministrationResources, "resources", broken)


def _nothing_stored(system_client: TestClient, patient: str) -> None:
    assert search(system_client, f"QuestionnaireResponse?subject=Patient/{patient}") == []
    assert search(system_client, f"Observation?subject=Patient/{patient}") == []
    assert search(system_client, f"DiagnosticReport?subject=Patient/{patient}") == []


def _warm(system_client: TestClient) -> None:
    """One good ingest first, so that every shape the unbroken builder makes is known as conformant:
    the broken ones must still be checked (:mod:`fhir_norse.server.conformance_memo`)."""
    warm = create_patient(system_client, "Warm")
    assert (
        post_response(system_client, response(NF21_STATIC, nf21_answers(), patient=warm)).status_code == 201
    )


def test_a_builder_that_breaks_the_profile_is_refused(
    system_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _warm(system_client)
    patient = create_patient(system_client)
    # R4 allows an Observation without a subject; the rom-scale-score profile requires one.
    _break_first_scale_score(monkeypatch, lambda obs: obs.pop("subject"))
    refused = post_response(system_client, response(NF21_STATIC, nf21_answers(), patient=patient))
    assert refused.status_code == 422, refused.text
    outcome = refused.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "rom-scale-score" in outcome["issue"][0]["diagnostics"]
    assert any("subject" in e for i in outcome["issue"] for e in i.get("expression", []))
    _nothing_stored(system_client, patient)


def test_a_builder_that_breaks_r4_structure_is_refused(
    system_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _warm(system_client)
    patient = create_patient(system_client)
    _break_first_scale_score(monkeypatch, lambda obs: obs["valueQuantity"].update(value="high"))
    refused = post_response(system_client, response(NF21_STATIC, nf21_answers(), patient=patient))
    assert refused.status_code == 422, refused.text
    assert refused.json()["issue"][0]["expression"] == ["Observation.valueQuantity.value"]
    _nothing_stored(system_client, patient)


def test_the_unbroken_builder_is_accepted(system_client: TestClient) -> None:
    """The control: the same response with the real builder is stored and scored."""
    patient = create_patient(system_client)
    stored = post_response(system_client, response(NF21_STATIC, nf21_answers(), patient=patient))
    assert stored.status_code == 201, stored.text
    assert search(system_client, f"Observation?subject=Patient/{patient}&_count=200")
