"""Only the advertised search parameters are indexed, listed and answered (issue 14, lever 3); a site
enables more with ``FHIR_NORSE_SEARCH_EXTRA_PARAMETERS`` and fills their rows with ``reindex``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.server.content import ContentConflict, search_registry
from fhir_norse.server.reindex import reindex
from fhir_norse.server.search.extract import IndexExtractor, default_extractor
from fhir_norse.store.resource_types import SUPPORTED_TYPES
from fhir_norse.store.rows import TokenRow
from fhir_norse.store.search.advertised import (
    ADVERTISED,
    COMMON,
    ExtraParameterError,
    parse_extra,
)
from fhir_norse.store.search.params import default_registry, full_registry, registry_with
from tests.tokens import bearer

LOINC = "http://loinc.org"
FHIR = {"Content-Type": "application/fhir+json"}


def blood_pressure(patient: str = "p1") -> dict[str, Any]:
    def component(code: str, value: float) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "valueQuantity": {
                "value": value,
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        }

    return {
        "resourceType": "Observation",
        "id": "bp",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2026-03-02T09:00:00Z",
        "component": [component("8480-6", 120), component("8462-4", 80)],
    }


def test_every_advertised_code_is_an_r4_parameter_of_its_type() -> None:
    """A typo in the curated table would silently advertise nothing."""
    full = full_registry()
    assert set(ADVERTISED) == set(SUPPORTED_TYPES)
    for res_type, codes in ADVERTISED.items():
        for code in codes:
            assert full.get(res_type, code) is not None, (res_type, code)


def test_the_registry_knows_only_advertised_parameters() -> None:
    registry, full = default_registry(), full_registry()
    assert registry.get("Observation", "combo-code") is None
    assert full.get("Observation", "combo-code") is not None
    assert registry.defined("Observation", "combo-code") == full.get("Observation", "combo-code")
    assert registry.get("Observation", "code") is not None
    for res_type in SUPPORTED_TYPES:
        indexed = {d.code for d in registry.indexed(res_type)}
        assert indexed <= ADVERTISED[res_type] | COMMON, res_type
        assert {d.code for d in full.indexed(res_type)} >= indexed
        # _tag, _profile, _security and _source stay indexed on every type.
        assert {"_tag", "_profile", "_security", "_source"} <= indexed, res_type
    assert len(registry.indexed("Observation")) < len(full.indexed("Observation"))


def test_an_advertised_composite_finds_its_unadvertised_components() -> None:
    rows = default_extractor().extract(blood_pressure())
    params = {row.param for row in rows}
    assert "component-code-value-quantity" in params
    assert not {p for p in params if p.startswith(("combo-", "component-code", "component-value"))} - {
        "component-code-value-quantity"
    }
    assert {"code", "subject", "patient", "date", "status", "_profile"} - params == {"_profile"}
    full_params = {row.param for row in IndexExtractor(full_registry()).extract(blood_pressure())}
    assert {"combo-code", "component-code", "component-value-quantity"} <= full_params


def test_a_site_enables_more_parameters() -> None:
    registry = registry_with([], parse_extra(" Observation.combo-code, Patient.phonetic ,"))
    assert registry.get("Observation", "combo-code") is not None
    assert registry.get("Patient", "phonetic") is not None
    assert registry.get("Observation", "component-code") is None
    rows = IndexExtractor(registry).extract(blood_pressure())
    assert {r.code for r in rows if isinstance(r, TokenRow) and r.param == "combo-code"} == {
        "85354-9",
        "8480-6",
        "8462-4",
    }


@pytest.mark.parametrize("raw", ["Observation", "Observation.", ".code", "combo-code"])
def test_an_extra_parameter_must_be_type_dot_code(raw: str) -> None:
    with pytest.raises(ExtraParameterError, match=r"Type\.code"):
        parse_extra(raw)


def test_an_extra_parameter_must_exist(settings: Settings) -> None:
    with pytest.raises(ExtraParameterError, match=r"Observation\.nope"):
        registry_with([], [("Observation", "nope")])
    with pytest.raises(ExtraParameterError, match=r"Account\.name"):
        registry_with([], [("Account", "name")])
    with pytest.raises(ContentConflict, match=r"Observation\.nope"):
        search_registry(settings.content_dir, (("Observation", "nope"),))


def _client(app: FastAPI) -> TestClient:
    client = TestClient(app, raise_server_exceptions=False)
    client.headers.update(bearer(app))
    return client


@pytest.fixture
def extra_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"search_extra_parameters": "Observation.combo-code"})


def _ids(answer: Any) -> list[str]:
    assert answer.status_code == 200, answer.text
    return [e["resource"]["id"] for e in answer.json().get("entry", []) if e["search"]["mode"] == "match"]


def _observation_params(client: TestClient) -> set[str]:
    statement = client.get("/fhir/metadata").json()
    (observation,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Observation"]
    return {p["name"] for p in observation["searchParam"]}


@pytest.fixture
def default_app(settings: Settings) -> Iterator[FastAPI]:
    application = create_app(settings)
    yield application
    application.state.service.storage.engine.dispose()


def test_an_unadvertised_parameter_is_unknown_until_enabled_and_reindexed(
    default_app: FastAPI, extra_settings: Settings
) -> None:
    with _client(default_app) as client:
        patient = client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR).json()["id"]
        body = blood_pressure(patient)
        del body["id"]
        created = client.post("/fhir/Observation", json=body, headers=FHIR)
        assert created.status_code == 201, created.text
        obs_id = created.json()["id"]
        params = _observation_params(client)
        assert "code" in params and "component-code-value-quantity" in params
        assert "combo-code" not in params and "component-code" not in params
        query = f"/fhir/Observation?combo-code={LOINC}|8480-6"
        strict = client.get(query, headers={"Prefer": "handling=strict"})
        assert strict.status_code == 400
        assert "combo-code" in strict.json()["issue"][0]["diagnostics"]
        # Lenient (the default): ignored, so every Observation matches, and the bundle says so.
        lenient = client.get(query)
        assert _ids(lenient) == [obs_id]
        assert "combo-code" in str(lenient.json())
        # The advertised composite finds it.
        assert _ids(client.get(f"/fhir/Observation?component-code-value-quantity={LOINC}|8480-6$gt100")) == [
            obs_id
        ]

    enabled = create_app(extra_settings)
    try:
        with _client(enabled) as client:
            assert "combo-code" in _observation_params(client)
            strict = {"Prefer": "handling=strict"}
            # Stored before the parameter was enabled: no rows yet, so not found ...
            assert _ids(client.get(f"/fhir/Observation?combo-code={LOINC}|8480-6", headers=strict)) == []
            assert reindex(enabled.state.service.kernel, ["Observation"]) == {"Observation": 1}
            # ... until reindexed.
            assert _ids(client.get(f"/fhir/Observation?combo-code={LOINC}|8480-6", headers=strict)) == [
                obs_id
            ]
            assert _ids(client.get(f"/fhir/Observation?combo-code={LOINC}|0000-0", headers=strict)) == []
    finally:
        enabled.state.service.storage.engine.dispose()
