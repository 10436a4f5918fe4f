"""PHQ-9 and GAD-7 totals, bands, warnings and alerts, computed by hand."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from fhir_norse.instruments.schema import SumScoreMapping, load_sum_score_mapping
from fhir_norse.scoring import answers_from_response, score_sum, submitted_total

ROOT = Path(__file__).resolve().parents[2]
PHQ9_ITEMS = [
    "44250-9",
    "44255-8",
    "44259-0",
    "44254-1",
    "44251-7",
    "44258-2",
    "44252-5",
    "44253-3",
    "44260-8",
]
GAD7_ITEMS = ["69725-0", "68509-9", "69733-4", "69734-2", "69735-9", "69689-8", "69736-7"]
LA = ["LA6568-5", "LA6569-3", "LA6570-1", "LA6571-9"]  # 0, 1, 2, 3


@cache
def phq9() -> SumScoreMapping:
    return load_sum_score_mapping(ROOT / "mappings" / "phq9-1.0.0.yaml")


@cache
def gad7() -> SumScoreMapping:
    return load_sum_score_mapping(ROOT / "mappings" / "gad7-1.0.0.yaml")


def answers_for_total(items: list[str], total: int, *, last_first: bool = False) -> dict[str, str]:
    """Fill items with 3s until the total is reached (item order reversed if ``last_first``)."""
    order = list(reversed(items)) if last_first else items
    out: dict[str, str] = {}
    left = total
    for item in order:
        value = min(3, left)
        out[item] = LA[value]
        left -= value
    assert left == 0
    return out


PHQ9_EXPECTED = {
    **dict.fromkeys(range(0, 5), "minimal"),
    **dict.fromkeys(range(5, 10), "mild"),
    **dict.fromkeys(range(10, 15), "moderate"),
    **dict.fromkeys(range(15, 20), "moderately-severe"),
    **dict.fromkeys(range(20, 28), "severe"),
}


@pytest.mark.parametrize("total", range(28))
def test_phq9_total_and_band(total: int) -> None:
    s = score_sum(answers_for_total(PHQ9_ITEMS, total), phq9(), float(total))
    assert s.total == total
    assert s.band_code == PHQ9_EXPECTED[total]
    assert s.complete and s.items_answered == s.items_total == 9
    assert s.warnings == ()


def test_phq9_band_display() -> None:
    s = score_sum(answers_for_total(PHQ9_ITEMS, 12), phq9(), None)
    assert (s.band_code, s.band_display) == ("moderate", "Moderate depression")


def test_phq9_submitted_total_that_disagrees_is_a_warning() -> None:
    s = score_sum(answers_for_total(PHQ9_ITEMS, 7), phq9(), 3)
    assert s.total == 7  # the client's 3 is never used
    assert s.band_code == "mild"
    assert len(s.warnings) == 1
    assert "submitted total 3 disagrees with the computed total 7" in s.warnings[0]


def test_phq9_incomplete_has_no_total() -> None:
    answers = answers_for_total(PHQ9_ITEMS, 6)
    del answers["44250-9"]
    s = score_sum(answers, phq9(), None)
    assert s.total is None and s.band_code is None
    assert not s.complete and s.items_answered == 8
    assert any("44250-9" in w for w in s.warnings)


def test_phq9_unknown_answer_code() -> None:
    answers = answers_for_total(PHQ9_ITEMS, 0)
    answers["44253-3"] = "LA9999-9"
    s = score_sum(answers, phq9(), None)
    assert not s.complete
    assert s.warnings[0].startswith("44253-3: answer code 'LA9999-9'")


@pytest.mark.parametrize(("item9", "alerted"), [(0, False), (1, True), (2, True), (3, True)])
def test_phq9_item9_alert(item9: int, alerted: bool) -> None:
    answers = answers_for_total(PHQ9_ITEMS, 0)
    answers["44260-8"] = LA[item9]
    s = score_sum(answers, phq9(), None)
    assert s.total == item9 and s.band_code == "minimal"  # low total, still an alert
    assert bool(s.alerts) is alerted
    if alerted:
        (alert,) = s.alerts
        assert (alert.flag, alert.link_id, alert.item_score) == ("suicide-risk", "44260-8", item9)
        assert "suicide" in alert.display


def test_phq9_item9_alert_fires_on_an_incomplete_response() -> None:
    s = score_sum({"44260-8": LA[2]}, phq9(), None)
    assert not s.complete and [a.flag for a in s.alerts] == ["suicide-risk"]


GAD7_EXPECTED = {
    **dict.fromkeys(range(0, 5), "minimal"),
    **dict.fromkeys(range(5, 10), "mild"),
    **dict.fromkeys(range(10, 15), "moderate"),
    **dict.fromkeys(range(15, 22), "severe"),
}


@pytest.mark.parametrize("total", range(22))
def test_gad7_total_and_band(total: int) -> None:
    s = score_sum(answers_for_total(GAD7_ITEMS, total, last_first=True), gad7(), None)
    assert s.total == total
    assert s.band_code == GAD7_EXPECTED[total]
    assert s.alerts == ()


def test_submitted_total_and_answers_from_a_response() -> None:
    items = [
        {"linkId": i, "answer": [{"valueCoding": {"system": "http://loinc.org", "code": c}}]}
        for i, c in answers_for_total(PHQ9_ITEMS, 11).items()
    ]
    qr = {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "item": [*items, {"linkId": "44261-6", "answer": [{"valueInteger": 27}]}],
    }
    sent = submitted_total(qr, phq9())
    assert sent == 27
    s = score_sum(answers_from_response(qr), phq9(), sent)
    assert s.total == 11 and s.band_code == "moderate"
    assert "disagrees" in s.warnings[0]
    assert submitted_total({"item": items}, phq9()) is None
