"""Server-written Observations are indexed off their known shape (issue 14, lever 3): the same rows as
the generic extractor, for every Observation scoring writes, and the generic path for anything else."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.server.resources import now_ms, stamp_meta
from fhir_norse.server.search import known_shape
from fhir_norse.server.search.extract import IndexExtractor
from fhir_norse.server.search.known_shape import extractor_for
from fhir_norse.store.rows import IndexRow
from fhir_norse.store.search.params import default_registry, registry_with
from tests.intake_support import (
    NF21_STATIC,
    create_patient,
    nf21_answers,
    post_response,
    publish_questionnaires,
)
from tests.intake_support import response as nf_response
from tests.intake_support import search as search_all
from tests.scoring.test_resources import build, phq9, phq9_total, sad_changes
from tests.tokens import bearer

GENERIC = IndexExtractor(default_registry())


def same_rows(direct: list[IndexRow], generic: list[IndexRow]) -> bool:
    return set(direct) == set(generic) and len(direct) == len(generic)


def scoring_observations() -> list[dict[str, Any]]:
    """Every Observation the scoring builds for a few administrations (scales, changes, sum scores)."""
    out: list[dict[str, Any]] = []
    sums = {"sums": [phq9_total()], "sum_mappings": {"phq9": phq9()}, "changes": sad_changes()}
    for kw in ({}, {"changes": sad_changes()}, sums):
        built = build(**kw)
        for obs in [*built.members, built.panel]:
            out.append(stamp_meta(copy.deepcopy(obs), obs.get("id", "o"), 1, now_ms()))
    return out


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    application = create_app(settings)
    publish_questionnaires(application.state.service)
    yield application
    application.state.service.storage.engine.dispose()


def test_every_observation_of_a_real_ingest_is_read_off_its_shape(app: FastAPI) -> None:
    """Two NF responses of one patient (the second with change statistics): each Observation scoring
    stored is of the known shape and gives exactly the generic extractor's rows."""
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers.update(bearer(app))
        patient = create_patient(client)
        for i, level in enumerate((2, 6)):
            body = nf_response(
                NF21_STATIC,
                nf21_answers(default=level),
                patient=patient,
                authored=f"2026-03-0{i + 2}T09:00:00+01:00",
            )
            answer = post_response(client, body)
            assert answer.status_code == 201, answer.text
        stored = search_all(client, f"Observation?subject=Patient/{patient}&_count=200")
    assert len(stored) >= 20
    for obs in stored:
        direct = known_shape.observation_rows(obs)
        assert direct is not None, sorted(obs)
        assert same_rows(direct, GENERIC.extract(obs)), obs.get("code")


def test_the_server_extractor_uses_the_known_shape() -> None:
    generic = IndexExtractor(default_registry())
    generic.prepare(["Observation"])
    assert "Observation" not in generic._direct  # the generic extractor knows no shapes
    extractor = extractor_for(default_registry())
    extractor.prepare(["Observation"])
    calls: list[bool] = []
    original = extractor._direct["Observation"]

    def counting(resource: Any) -> list[IndexRow] | None:
        found = original(resource)
        calls.append(found is not None)
        return found

    extractor._direct["Observation"] = counting
    obs = scoring_observations()[0]
    assert same_rows(extractor.extract(obs), GENERIC.extract(obs))
    assert calls == [True]


def test_a_site_that_indexes_more_gets_the_generic_path() -> None:
    registry = registry_with([], [("Observation", "combo-code")])
    extractor = extractor_for(registry)
    extractor.prepare(["Observation"])
    assert "Observation" not in extractor._direct
    obs = scoring_observations()[0]
    assert any(r.param == "combo-code" for r in extractor.extract(obs))


@pytest.mark.parametrize(
    "change",
    [
        {"method": {"text": "a method"}},
        {"encounter": {"reference": "Encounter/e1"}},
        {"valueString": "x"},
        {"subject": {"reference": "Patient/p1", "identifier": {"value": "1"}}},
        {"category": {"text": "not a list"}},
    ],
)
def test_any_other_shape_is_left_to_the_generic_extractor(change: dict[str, Any]) -> None:
    obs = {**scoring_observations()[0], **change}
    assert known_shape.observation_rows(obs) is None
    extractor = IndexExtractor(default_registry())
    assert same_rows(extractor.extract(obs), GENERIC.extract(obs))


_EDITS = st.sampled_from(["drop", "empty", "string", "number", "nested-drop"])


@settings(max_examples=150, deadline=None)
@given(
    index=st.integers(min_value=0, max_value=1000),
    edits=st.lists(st.tuples(_EDITS, st.integers(min_value=0, max_value=1000)), max_size=3),
)
def test_variations_give_the_generic_rows_or_fall_back(index: int, edits: list[tuple[str, int]]) -> None:
    """Scoring Observations with elements dropped, emptied or replaced: the known-shape reader either
    declines or gives exactly the generic rows."""
    observations = scoring_observations()
    obs = copy.deepcopy(observations[index % len(observations)])
    for edit, pick in edits:
        keys = sorted(k for k in obs if k != "resourceType")
        if not keys:
            break
        key = keys[pick % len(keys)]
        if edit == "drop":
            del obs[key]
        elif edit == "empty":
            obs[key] = type(obs[key])()
        elif edit == "string":
            obs[key] = "x"
        elif edit == "number":
            obs[key] = 3
        elif isinstance(obs[key], dict) and obs[key]:
            inner = sorted(obs[key])
            del obs[key][inner[pick % len(inner)]]
        elif isinstance(obs[key], list) and obs[key] and isinstance(obs[key][0], dict) and obs[key][0]:
            inner = sorted(obs[key][0])
            del obs[key][0][inner[pick % len(inner)]]
    direct = known_shape.observation_rows(obs)
    if direct is not None:
        assert same_rows(direct, GENERIC.extract(obs))
