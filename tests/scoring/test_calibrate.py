"""Cronbach's alpha, reliability estimates per scale and the calibrated mapping version."""

from __future__ import annotations

import random
from datetime import date
from fractions import Fraction
from functools import cache
from itertools import permutations
from pathlib import Path
from statistics import covariance, variance

import pytest
import yaml

from fhir_norse.instruments.schema import InstrumentMapping, load_mapping
from fhir_norse.scoring.calibrate import (
    Estimate,
    calibrated_mapping,
    cronbach_alpha,
    estimate_reliabilities,
    scale_matrix,
    score_clinical_item,
    usable_alpha,
    write_mapping,
)

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "mappings" / "nf21-2.1.0.yaml"


@cache
def nf21() -> InstrumentMapping:
    return load_mapping(SOURCE)


# --- cronbach_alpha -------------------------------------------------------------------------------


def test_alpha_hand_computed() -> None:
    # Item variances 5/3, 5/3, 4/3 (sum 14/3); totals 4, 7, 9, 12 -> variance 34/3.
    # alpha = 3/2 * (1 - 14/34) = 15/17.
    matrix = [[1, 1, 2], [2, 3, 2], [3, 2, 4], [4, 4, 4]]
    alpha = cronbach_alpha(matrix, min_rows=2)
    assert alpha == pytest.approx(float(Fraction(15, 17)), abs=1e-12)


def test_alpha_parallel_items_equals_spearman_brown() -> None:
    # Textbook identity: for items with equal variances and equal covariances, alpha equals the
    # Spearman-Brown formula k r / (1 + (k - 1) r), r the inter-item correlation. The row set is closed
    # under permuting columns, so the three items are parallel by construction.
    rows = [[v + shift for v in p] for shift in (0, 3, 5) for p in permutations((1, 2, 4))]
    cols = list(zip(*rows, strict=True))
    r = covariance(cols[0], cols[1]) / variance(cols[0])
    assert covariance(cols[0], cols[2]) == pytest.approx(covariance(cols[1], cols[2]))
    expected = 3 * r / (1 + 2 * r)
    assert cronbach_alpha(rows, min_rows=2) == pytest.approx(expected, abs=1e-12)


def test_alpha_identical_items_is_one() -> None:
    rows = [[x, x, x] for x in (1, 2, 3, 5, 7)]
    assert cronbach_alpha(rows, min_rows=2) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("matrix", "min_rows"),
    [
        ([[1], [2], [3], [4]], 2),  # a single item
        ([[1, 2], [2, 3], [4, 4]], 4),  # fewer complete rows than required
        ([[1, 2]], 1),  # one row never gives a sample variance
        ([], 0),
        ([[1, 3], [2, 2], [3, 1]], 2),  # total variance zero
    ],
)
def test_alpha_none_cases(matrix: list[list[float]], min_rows: int) -> None:
    assert cronbach_alpha(matrix, min_rows=min_rows) is None


def test_alpha_default_minimum_is_30_rows() -> None:
    rows = [[x, x + (i % 2)] for i, x in enumerate([1, 2, 3, 4, 5, 6, 7] * 5)]
    assert cronbach_alpha(rows[:29]) is None
    assert cronbach_alpha(rows[:30]) is not None


def test_alpha_ragged_rows_refused() -> None:
    with pytest.raises(ValueError):
        cronbach_alpha([[1, 2], [3]], min_rows=2)


# --- item scoring and listwise deletion -----------------------------------------------------------


def test_item_scoring_rules() -> None:
    h = nf21().answer_handling
    assert score_clinical_item("2", h, reverse=False) == 2
    assert score_clinical_item("2", h, reverse=True) == 6
    assert score_clinical_item("not-relevant", h, reverse=True) == 1  # never reversed
    assert score_clinical_item("prefer-not", h, reverse=False) is None
    assert score_clinical_item("9", h, reverse=False) is None
    assert score_clinical_item(None, h, reverse=False) is None


def test_listwise_deletion_and_non_numeric_answers() -> None:
    m = nf21()
    hopeless = m.scale("hopeless")
    assert hopeless.reverse_keyed == ["hopeless-2"]
    full = {f"hopeless-{i}": "5" for i in range(1, 6)}
    sets = [
        full,  # complete: 5, 3 (reversed), 5, 5, 5
        {**full, "hopeless-2": "not-relevant"},  # complete: not-relevant = 1, not reversed
        {**full, "hopeless-1": "2", "hopeless-3": "4"},  # complete
        {**full, "hopeless-4": "prefer-not"},  # dropped
        {k: v for k, v in full.items() if k != "hopeless-5"},  # dropped (item missing)
        {"hopeless-1": "3"},  # trigger only (closed scale): dropped
        {**full, "hopeless-3": "x"},  # unknown code: dropped
    ]
    rows = scale_matrix(sets, hopeless, m.answer_handling)
    assert rows == [[5, 3, 5, 5, 5], [5, 1, 5, 5, 5], [2, 3, 4, 5, 5]]

    estimates = estimate_reliabilities(sets, m, min_complete=3)
    assert list(estimates) == [s.code for s in m.scales]
    assert estimates["hopeless"] == Estimate(alpha=cronbach_alpha(rows, min_rows=3), n_complete=3, n_items=5)
    assert estimates["sad"] == Estimate(alpha=None, n_complete=0, n_items=3)
    assert estimate_reliabilities(sets, m)["hopeless"].alpha is None  # default minimum 30


def _simulated_hopeless(n: int, seed: int = 7) -> list[dict[str, str]]:
    """Respondents with a latent problem level; the reverse-keyed item is answered consistently with it
    (a positively worded item: high agreement = few problems)."""
    rnd = random.Random(seed)
    sets = []
    for _ in range(n):
        level = rnd.randint(1, 7)
        answers = {}
        for i in range(1, 6):
            base = 8 - level if i == 2 else level
            answers[f"hopeless-{i}"] = str(min(7, max(1, base + rnd.choice((-1, 0, 0, 1)))))
        sets.append(answers)
    return sets


def test_reversal_respected() -> None:
    m = nf21()
    sets = _simulated_hopeless(60)
    with_reversal = estimate_reliabilities(sets, m)["hopeless"]
    assert with_reversal.n_complete == 60
    assert with_reversal.alpha is not None and with_reversal.alpha > 0.9

    unreversed = m.scale("hopeless").model_copy(update={"reverse_keyed": []})
    without = cronbach_alpha(scale_matrix(sets, unreversed, m.answer_handling))
    assert without is not None and without < 0.6


# --- calibrated mapping ---------------------------------------------------------------------------


def test_calibrated_mapping_round_trip(tmp_path: Path) -> None:
    m = nf21()
    estimates = estimate_reliabilities(_simulated_hopeless(45), m)
    source = yaml.safe_load(SOURCE.read_text(encoding="utf-8"))
    content = calibrated_mapping(source, estimates, new_version="2.1.1", when=date(2025, 3, 4))
    assert source["version"] == "2.1.0"  # the input is not modified

    path = tmp_path / "nf21-2.1.1.yaml"
    write_mapping(path, content)
    loaded = load_mapping(path)
    assert loaded.version == "2.1.1"
    rel = loaded.scale("hopeless").reliability
    assert rel.assumed is False
    assert rel.value == usable_alpha(estimates["hopeless"])
    assert rel.source == "Cronbach's alpha over 45 complete administrations on this server, 2025-03-04"
    # Scales without an estimate keep the assumed value; everything else is unchanged.
    assert loaded.scale("sad").reliability == m.scale("sad").reliability
    assert loaded.model_copy(update={"version": m.version, "scales": m.scales}) == m
    assert [s.model_copy(update={"reliability": None}) for s in loaded.scales] == [
        s.model_copy(update={"reliability": None}) for s in m.scales
    ]
    assert list(content) == list(source)  # same layout (key order)

    with pytest.raises(FileExistsError):
        write_mapping(path, content)


def test_calibrated_mapping_from_loaded_model(tmp_path: Path) -> None:
    m = nf21()
    estimates = {"sad": Estimate(alpha=0.8567, n_complete=31, n_items=3)}
    content = calibrated_mapping(m, estimates, new_version="2.2.0", when=date(2025, 1, 2))
    write_mapping(tmp_path / "m.yaml", content)
    loaded = load_mapping(tmp_path / "m.yaml")
    assert loaded.version == "2.2.0"
    assert loaded.scale("sad").reliability.value == 0.857
    assert not loaded.scale("sad").reliability.assumed


@pytest.mark.parametrize("alpha", [None, -0.2, 0.0, 0.0004, 0.9996, 1.0])
def test_unusable_alpha_keeps_previous_reliability(alpha: float | None) -> None:
    m = nf21()
    estimates = {"sad": Estimate(alpha=alpha, n_complete=50, n_items=3)}
    content = calibrated_mapping(m, estimates, new_version="2.1.1", when=date(2025, 1, 2))
    sad = next(s for s in content["scales"] if s["code"] == "sad")
    assert sad["reliability"]["assumed"] is True


@pytest.mark.parametrize("version", ["2.1.0", "2.1", "v2.1.1"])
def test_bad_new_version_refused(version: str) -> None:
    with pytest.raises(ValueError):
        calibrated_mapping(nf21(), {}, new_version=version, when=date(2025, 1, 2))
