"""Hand-computed golden cases and property tests for the Norse Feedback scoring engine."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_norse.instruments.schema import InstrumentMapping, load_mapping
from fhir_norse.scoring import answers_from_response, score_nf21
from tests.property_support import picks

ROOT = Path(__file__).resolve().parents[2]
CODES = ["1", "2", "3", "4", "5", "6", "7", "not-relevant", "prefer-not"]


@cache
def nf21() -> InstrumentMapping:
    return load_mapping(ROOT / "mappings" / "nf21-2.1.0.yaml")


# --- answers_from_response ------------------------------------------------------------------------


def _coded(link_id: str, code: str, **extra: Any) -> dict[str, Any]:
    return {"linkId": link_id, "answer": [{"valueCoding": {"system": "urn:x", "code": code}}], **extra}


def test_answers_from_nested_response() -> None:
    qr = {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "item": [
            {"linkId": "group-triggers", "item": [_coded("sad-1", "5"), {"linkId": "somAnx-1"}]},
            {
                "linkId": "outer",
                "answer": [
                    {"valueCoding": {"code": "not-relevant"}, "item": [_coded("nested-under-answer", "2")]}
                ],
            },
            {"linkId": "free-text", "answer": [{"valueString": "hello"}]},
            _coded("pref-feelings", "more"),
        ],
    }
    assert answers_from_response(qr) == {
        "sad-1": "5",
        "outer": "not-relevant",
        "nested-under-answer": "2",
        "pref-feelings": "more",
    }


def test_answers_from_response_without_items() -> None:
    assert answers_from_response({"resourceType": "QuestionnaireResponse"}) == {}


def _response_from_static_questionnaire(answer: str) -> dict[str, Any]:
    q = json.loads((ROOT / "questionnaires/nf21/Questionnaire-nf21-static.json").read_text("utf-8"))

    def fill(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for item in items:
            if item.get("type") == "group":
                out.append({"linkId": item["linkId"], "item": fill(item.get("item", []))})
            elif item.get("type") == "choice":
                codes = [o["valueCoding"]["code"] for o in item.get("answerOption", [])]
                code = answer if answer in codes else "as-now"
                out.append(_coded(item["linkId"], code))
        return out

    return {"resourceType": "QuestionnaireResponse", "status": "completed", "item": fill(q["item"])}


def test_static_questionnaire_all_fours_end_to_end() -> None:
    answers = answers_from_response(_response_from_static_questionnaire("4"))
    assert set(nf21().all_link_ids()) <= set(answers)
    scores = score_nf21(answers, nf21())
    assert list(scores.scales) == nf21().display_order
    for s in scores.scales.values():
        assert s.score == 4.0  # 8 - 4 = 4, so reversal leaves a four a four
        assert s.items_answered == s.items_total
        assert not s.trigger_only
    assert scores.alliance.total.mean == 4.0
    assert scores.alliance.total.percent == pytest.approx(16 / 28 * 100)
    assert set(scores.preferences.values()) == {"as-now"}
    assert scores.warnings == ()


# --- clinical scales ------------------------------------------------------------------------------


def test_reverse_keyed_not_relevant_and_prefer_not() -> None:
    # hopeless: hopeless-2 is reverse keyed; norms mean 3.70, sd 1.44; opens when trigger > 4.5.
    answers = {
        "hopeless-1": "6",
        "hopeless-2": "2",  # reverse keyed: 8 - 2 = 6
        "hopeless-3": "5",
        "hopeless-4": "not-relevant",  # 1: no problem
        "hopeless-5": "prefer-not",  # missing
    }
    s = score_nf21(answers, nf21()).scales["hopeless"]
    assert s.score == pytest.approx((6 + 6 + 5 + 1) / 4)  # 4.5
    assert s.items_answered == 4
    assert s.items_total == 5
    assert s.trigger_problem_score == 6
    assert s.opened
    assert not s.trigger_only
    assert s.z == pytest.approx((4.5 - 3.70) / 1.44)
    assert s.t == pytest.approx(50 + 10 * (4.5 - 3.70) / 1.44)


def test_z_and_t_against_sad_norms() -> None:
    # Sad Affect norms (Helse Førde 2019): mean 3.94, sd 1.68.
    s = score_nf21({"sad-1": "7", "sad-2": "5", "sad-3": "6"}, nf21()).scales["sad"]
    assert s.score == 6.0
    assert s.z == pytest.approx(1.2261904761904763)
    assert s.t == pytest.approx(62.26190476190476)


def test_not_relevant_on_a_reverse_keyed_item_is_not_reversed() -> None:
    s = score_nf21({"ready-1": "not-relevant"}, nf21()).scales["ready"]
    assert s.score == 1.0
    assert s.trigger_problem_score == 1.0
    assert not s.opened


def test_trigger_only_scale_scores_from_its_trigger() -> None:
    # ready-1 is reverse keyed: answer 2 scores 6 in the problem direction, above the opening 4.5.
    s = score_nf21({"ready-1": "2"}, nf21()).scales["ready"]
    assert s.trigger_only
    assert s.score == 6.0
    assert s.items_answered == 1
    assert s.opened


def test_prefer_not_trigger_is_missing() -> None:
    s = score_nf21({"worry-1": "prefer-not"}, nf21()).scales["worry"]
    assert s.score is None and s.z is None and s.t is None
    assert s.trigger_problem_score is None
    assert not s.opened and not s.trigger_only
    assert s.items_answered == 0


def test_threshold_is_strict() -> None:
    # eating opens when its trigger is strictly above 3.5, worry above 5.5.
    assert not score_nf21({"eating-1": "3"}, nf21()).scales["eating"].opened  # 3 vs 3.5
    assert score_nf21({"eating-1": "4"}, nf21()).scales["eating"].opened
    assert not score_nf21({"worry-1": "5"}, nf21()).scales["worry"].opened
    assert score_nf21({"worry-1": "6"}, nf21()).scales["worry"].opened


def test_substance_recovery_opens_on_the_substance_use_trigger() -> None:
    scores = score_nf21({"subUse-1": "4"}, nf21())
    rec = scores.scales["subRecov"]
    assert rec.trigger_problem_score == 4.0
    assert rec.opened  # 4 > 2.5
    assert rec.score is None
    assert not rec.trigger_only  # the opening item is not one of its own
    # its own items are all reverse keyed: 7 -> 1, 3 -> 5; the subUse trigger is not averaged in
    rec = score_nf21({"subUse-1": "2", "subRecov-1": "7", "subRecov-2": "3"}, nf21()).scales["subRecov"]
    assert rec.score == 3.0
    assert rec.items_answered == 2
    assert not rec.opened  # 2 is not above 2.5


def test_unknown_answer_code_is_missing_with_a_warning() -> None:
    scores = score_nf21({"sad-1": "9", "sad-2": "4", "alliance-goal": "x"}, nf21())
    assert scores.scales["sad"].score == 4.0
    assert scores.scales["sad"].items_answered == 1
    assert len(scores.warnings) == 2
    assert scores.warnings[0].startswith("sad-1:")
    assert scores.warnings[1].startswith("alliance-goal:")


def test_empty_response() -> None:
    scores = score_nf21({}, nf21())
    assert all(s.score is None and not s.opened for s in scores.scales.values())
    assert scores.alliance.total.mean is None and scores.alliance.total.percent is None
    assert set(scores.preferences.values()) == {None}
    assert scores.instrument == "nf21" and scores.version == "2.1.0"


# --- alliance, preferences, single items ----------------------------------------------------------


def test_alliance_means_and_percent_of_possible_raw_score() -> None:
    answers = {"alliance-goal": "7", "alliance-bond-1": "6", "alliance-bond-2": "7", "alliance-task": "7"}
    a = score_nf21(answers, nf21()).alliance
    assert a.dimensions["goal"].mean == 7 and a.dimensions["goal"].percent == 100
    assert a.dimensions["bond"].mean == 6.5
    assert a.dimensions["bond"].percent == pytest.approx(13 / 14 * 100)
    assert a.total.mean == pytest.approx(27 / 4)
    assert a.total.percent == pytest.approx(27 / 28 * 100)  # 96.4 %


def test_alliance_non_numeric_answers_are_missing() -> None:
    answers = {
        "alliance-goal": "5",
        "alliance-bond-1": "7",
        "alliance-bond-2": "not-relevant",  # missing on the alliance, not 1
        "alliance-task": "prefer-not",
    }
    a = score_nf21(answers, nf21()).alliance
    assert a.dimensions["goal"].percent == pytest.approx(5 / 7 * 100)
    assert a.dimensions["bond"].mean == 7 and a.dimensions["bond"].items_answered == 1
    assert a.dimensions["task"].mean is None and a.dimensions["task"].percent is None
    assert a.total.mean == 6
    assert a.total.percent == pytest.approx(12 / 14 * 100)  # answered items only
    assert (a.total.items_answered, a.total.items_total) == (2, 4)


def test_preferences() -> None:
    answers = {
        "pref-feelings": "more",
        "pref-style": "less",
        "pref-techniques": "as-now",
        "pref-relationship": "not-relevant",
    }
    assert score_nf21(answers, nf21()).preferences == {
        "pref-techniques": "as-now",
        "pref-style": "less",
        "pref-feelings": "more",
        "pref-feelings-thoughts": None,
        "pref-relationship": None,
    }


def test_single_and_medication_items() -> None:
    answers = {
        "single-sleep": "6",  # problem direction: 6
        "single-physical-health": "6",  # resource: 8 - 6 = 2 in the problem direction
        "single-sexuality": "not-relevant",  # missing on single items per the mapping
        "medication-helps": "2",
        "medication-worries": "prefer-not",
    }
    scores = score_nf21(answers, nf21())
    sleep = scores.single["single-sleep"]
    assert (sleep.raw, sleep.problem_score, sleep.direction, sleep.construct) == (6, 6, "problem", "sleep")
    health = scores.single["single-physical-health"]
    assert (health.raw, health.problem_score) == (6, 2)
    assert scores.single["single-sexuality"].problem_score is None
    assert scores.single["single-impulsivity"].raw is None
    assert (
        scores.medication["medication-helps"].raw,
        scores.medication["medication-helps"].problem_score,
    ) == (
        2,
        6,
    )
    assert scores.medication["medication-worries"].problem_score is None


# --- properties over generated answer sets (Hypothesis) ------------------------------------------


@st.composite
def answer_sets(draw: st.DrawFn, codes: list[str]) -> dict[str, str]:
    """Any NF 2.1 item answered with one of ``codes`` or left out; shrinks towards fewer items."""
    link_ids = nf21().all_link_ids()
    picked = picks(draw, [None, *codes], len(link_ids))
    return {i: code for i, code in zip(link_ids, picked, strict=True) if code is not None}


@settings(max_examples=100, deadline=None, derandomize=True)
@given(answers=answer_sets(CODES))
def test_scores_stay_within_range(answers: dict[str, str]) -> None:
    scores = score_nf21(answers, nf21())
    for scale in nf21().scales:
        s = scores.scales[scale.code]
        assert 0 <= s.items_answered <= s.items_total == len(scale.items)
        if s.score is None:
            assert s.items_answered == 0 and s.z is None
        else:
            assert 1 <= s.score <= 7
            assert s.z is not None and s.t is not None
            assert s.score == pytest.approx(scale.norms.mean + s.z * scale.norms.sd)
            assert s.t == pytest.approx(50 + 10 * s.z)
        if s.trigger_problem_score is not None:
            assert 1 <= s.trigger_problem_score <= 7
            assert s.opened == (s.trigger_problem_score > scale.open_if_trigger_gt)
    for a in [*scores.alliance.dimensions.values(), scores.alliance.total]:
        if a.mean is not None:
            assert 1 <= a.mean <= 7
            # the percent is of the raw answers; the mean is at the instrument's 2 decimals
            assert a.percent is not None and a.mean == pytest.approx(a.percent * 7 / 100, abs=0.005)
    for item in [*scores.single.values(), *scores.medication.values()]:
        if item.problem_score is not None:
            assert 1 <= item.problem_score <= 7


@settings(max_examples=100, deadline=None, derandomize=True)
@given(answers=answer_sets(CODES[:7]))
def test_reversing_reverse_keyed_answers(answers: dict[str, str]) -> None:
    before = score_nf21(answers, nf21())
    flipped_reverse = {
        i: (str(8 - int(c)) if any(i in s.reverse_keyed for s in nf21().scales) else c)
        for i, c in answers.items()
    }
    flipped_all = {i: str(8 - int(c)) for i, c in answers.items()}
    after_reverse = score_nf21(flipped_reverse, nf21())
    after_all = score_nf21(flipped_all, nf21())
    for scale in nf21().scales:
        old = before.scales[scale.code]
        if old.score is None:
            assert after_reverse.scales[scale.code].score is None
            continue
        n = old.items_answered
        # each answered reverse-keyed item moves from 8 - x to x: the mean moves by sum(2x - 8) / n
        shift = sum(2 * int(answers[i]) - 8 for i in scale.items if i in answers and i in scale.reverse_keyed)
        # (up to the rounding of both scores to the instrument's 2 decimals)
        assert after_reverse.scales[scale.code].score == pytest.approx(old.score + shift / n, abs=0.01)
        # flipping every answer mirrors the score around the midpoint 4
        assert after_all.scales[scale.code].score == pytest.approx(8 - old.score, abs=0.01)
