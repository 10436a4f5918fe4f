"""Issue 12, item 26: scores are stored at the precision their instrument reports (the mapping's
``decimals``, rounded half up), and everything derived is computed from the stored score."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.instruments.schema import ContentError, load_mapping, load_sum_score_mapping
from fhir_norse.scoring import score_nf21
from fhir_norse.scoring.precision import at_precision
from fhir_norse.scoring.sums import score_sum
from tests.intake_support import (
    NF21_STATIC,
    PHQ9,
    PHQ9_ITEMS,
    ROOT,
    create_patient,
    nf21,
    nf21_answers,
    post_response,
    publish_questionnaires,
    response,
    search,
)

SCALES = "http://fhir-norse.org/fhir/CodeSystem/nf21-scales"
# The sad scale (3 items) answered 6, 6, 5: a mean of 17 / 3.
UNEVEN = {"sad-1": "6", "sad-2": "6", "sad-3": "5"}


@pytest.mark.parametrize(
    ("value", "decimals", "expected"),
    [(17 / 3, 2, 5.67), (5.665, 2, 5.67), (4.625, 2, 4.63), (4.615, 2, 4.62), (2.5, 0, 3), (12.0, 0, 12)],
)
def test_scores_are_rounded_half_up_on_their_decimal_digits(
    value: float, decimals: int, expected: float
) -> None:
    assert at_precision(value, decimals) == expected
    assert isinstance(at_precision(value, decimals), int) == (decimals == 0)


def test_the_scale_score_is_the_rounded_mean_and_z_follows_it() -> None:
    mapping = nf21()
    assert mapping.decimals == 2
    sad = score_nf21(UNEVEN, mapping).scales["sad"]
    norms = mapping.scale("sad").norms
    assert sad.score == 5.67
    assert sad.z == pytest.approx((5.67 - norms.mean) / norms.sd, abs=1e-12)
    assert sad.t == pytest.approx(50 + 10 * (5.67 - norms.mean) / norms.sd, abs=1e-12)
    alliance = score_nf21(
        {"alliance-bond-1": "6", "alliance-bond-2": "5", "alliance-task": "5"}, mapping
    ).alliance
    assert alliance.total.mean == 5.33  # 16 / 3
    assert alliance.total.percent == pytest.approx(16 / 21 * 100)  # of the raw answers, not rounded


def _nf21_with(tmp_path: Path, **changes: Any) -> Path:
    data = yaml.safe_load((ROOT / "mappings" / "nf21-2.1.0.yaml").read_text(encoding="utf-8"))
    data.update(changes)
    out = tmp_path / "mappings" / "nf21-2.1.0.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


def test_the_mapping_sets_the_precision(tmp_path: Path) -> None:
    one = load_mapping(_nf21_with(tmp_path, decimals=1))
    assert score_nf21(UNEVEN, one).scales["sad"].score == 5.7
    for bad in (-1, 7, "two"):
        with pytest.raises(ContentError, match=r"nf21-2.1.0.yaml: decimals"):
            load_mapping(_nf21_with(tmp_path, decimals=bad))


def test_a_sum_score_total_is_a_whole_number() -> None:
    phq9 = load_sum_score_mapping(ROOT / "mappings" / "phq9-1.0.0.yaml")
    assert phq9.decimals == 0
    total = score_sum(dict.fromkeys(PHQ9_ITEMS, "LA6570-1"), phq9).total  # 9 x 2
    assert total == 18 and isinstance(total, int)


# --- stored on SQLite and PostgreSQL -------------------------------------------------------------------


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    application = create_app(settings)
    publish_questionnaires(application.state.service)
    yield application
    application.state.service.storage.engine.dispose()


def _sad(system_client: TestClient, patient: str) -> list[dict[str, Any]]:
    found = search(system_client, f"Observation?subject=Patient/{patient}&code={SCALES}|sad")
    return sorted(found, key=lambda o: str(o["effectiveDateTime"]))


def _component(obs: dict[str, Any], code: str) -> float:
    return float(
        next(c for c in obs["component"] if c["code"]["coding"][0]["code"] == code)["valueQuantity"]["value"]
    )


def test_the_stored_score_is_rounded_and_change_is_computed_from_it(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    first = response(
        NF21_STATIC, nf21_answers(overrides=UNEVEN), patient=patient, authored="2026-03-02T09:00:00Z"
    )
    assert post_response(system_client, first).status_code == 201
    [stored] = _sad(system_client, patient)
    assert stored["valueQuantity"]["value"] == 5.67  # not 5.666666666666667
    sad = nf21().scale("sad")
    assert _component(stored, "z-score") == pytest.approx((5.67 - sad.norms.mean) / sad.norms.sd, abs=1e-9)

    second = response(NF21_STATIC, nf21_answers({"sad": 7}), patient=patient, authored="2026-03-09T09:00:00Z")
    assert post_response(system_client, second).status_code == 201
    latest = _sad(system_client, patient)[-1]
    s_diff = math.sqrt(2) * sad.norms.sd * math.sqrt(1 - sad.reliability.value)
    # The same number at both administrations: the stored 5.67, read back as the history.
    assert _component(latest, "rc-previous") == pytest.approx((7 - 5.67) / s_diff, abs=1e-9)


def test_a_stored_sum_score_is_a_whole_number(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    body = response(PHQ9, dict.fromkeys(PHQ9_ITEMS, "LA6569-3"), patient=patient)
    assert post_response(system_client, body).status_code == 201
    [total] = search(system_client, f"Observation?subject=Patient/{patient}&code=http://loinc.org|44261-6")
    assert total["valueQuantity"]["value"] == 9 and isinstance(total["valueQuantity"]["value"], int)
