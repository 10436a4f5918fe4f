"""Issue 13 through the scoring pipeline: the elevated range (one definition for the interpretation, the
typed referenceRange, crossing and stagnation), "not relevant" on the single items, and the closing rule
written on each scale Observation (``closed``, ``mean-last3``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache, partial
from pathlib import Path
from typing import Any

import pytest

from fhir_norse.adaptive.state import Measured
from fhir_norse.canonicals import CS_COMPONENTS, CS_INTERPRETATION
from fhir_norse.instruments.registry import Instrument, InstrumentRegistry
from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.scoring.pipeline import PriorAdministration, ScoredAdministration, score_administration

ROOT = Path(__file__).resolve().parents[2]
BASE = "http://fhir-norse.org/fhir"


@cache
def registry() -> InstrumentRegistry:
    return InstrumentRegistry.from_content_dir(ROOT)


def instrument(version: str) -> Instrument:
    found = registry().for_questionnaire(f"{BASE}/Questionnaire/nf21-static", version)
    assert found is not None and isinstance(found.mapping, InstrumentMapping)
    assert found.mapping.version == version
    return found


def mapping(version: str) -> InstrumentMapping:
    m = instrument(version).mapping
    assert isinstance(m, InstrumentMapping)
    return m


def response(answers: Mapping[str, str], version: str, week: int) -> dict[str, Any]:
    return {
        "resourceType": "QuestionnaireResponse",
        "id": f"r{week}",
        "questionnaire": f"{BASE}/Questionnaire/nf21-static|{version}",
        "status": "completed",
        "subject": {"reference": "Patient/p"},
        "authored": f"2026-02-{week + 1:02d}T09:00:00+01:00",
        "item": [
            {"linkId": link_id, "answer": [{"valueCoding": {"code": code}}]}
            for link_id, code in answers.items()
        ],
    }


def _derived_id(week: int, key: str) -> str:
    return f"{week}-{key.replace(':', '-')}"


def administer(
    version: str, series: Sequence[Mapping[str, str]]
) -> tuple[ScoredAdministration, list[PriorAdministration]]:
    """Score each answer set in turn against the ones before it, as the server does; return the last
    scored administration and the history it was scored against."""
    history: list[PriorAdministration] = []
    scored = None
    for week, answers in enumerate(series):
        scored = score_administration(
            response(answers, version, week),
            instrument(version),
            response_ref=f"QuestionnaireResponse/r{week}/_history/1",
            patient_ref="Patient/p",
            history=history,
            id_for=partial(_derived_id, week),
        )
        assert scored.scores is not None
        history.append(
            PriorAdministration(
                f"QuestionnaireResponse/r{week}",
                f"2026-02-{week + 1:02d}T09:00:00+01:00",
                {c: s.score for c, s in scored.scores.scales.items() if s.score is not None},
                {},
                {
                    c: Measured(s.trigger_problem_score, None if s.trigger_only else s.score)
                    for c, s in scored.scores.scales.items()
                    if s.score is not None
                },
            )
        )
    assert scored is not None
    return scored, history[:-1]


def scale_obs(scored: ScoredAdministration, code: str) -> dict[str, Any]:
    for obs in scored.resources.scale_scores:
        if obs["code"]["coding"][0]["code"] == code:
            return obs
    raise KeyError(code)


def interpretations(obs: Mapping[str, Any]) -> list[str]:
    return [
        c["code"]
        for concept in obs.get("interpretation") or []
        for c in concept.get("coding") or []
        if c.get("system") == CS_INTERPRETATION
    ]


def component(obs: Mapping[str, Any], code: str) -> float | None:
    for comp in obs.get("component") or []:
        if comp["code"]["coding"][0] == {"system": CS_COMPONENTS, "code": code}:
            return float(comp["valueQuantity"]["value"])
    return None


def worry_week(items: tuple[int, int, int], **more: str) -> dict[str, str]:
    """Worry at the given item levels (its trigger first), every other scale's items at level 1 (no
    problem: below every elevated range)."""
    out = {i: "1" for s in mapping("2.2.0").scales for i in s.items}
    for s in mapping("2.2.0").scales:
        for i in s.reverse_keyed:
            out[i] = "7"
    out.update({"worry-1": str(items[0]), "worry-2": str(items[1]), "worry-3": str(items[2])})
    return {**out, **more}


# --- the elevated range (item 4) ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.1.0", "2.2.0"])
def test_between_the_closing_and_opening_thresholds_for_four_weeks_is_elevated_and_stagnating(
    version: str,
) -> None:
    """Worry closes below 5.04 and opens above 5.5. A patient at 5.33 for four administrations (the case
    study's worry 5.1-5.5) is in the elevated range every time and, without reliable change, stagnates;
    "elevated" used to mean above the opening threshold, so this patient was neither."""
    worry = mapping(version).scale("worry")
    assert (worry.close_if_mean_last3_lt, worry.open_if_trigger_gt, worry.elevated_from) == (5.04, 5.5, None)
    weeks = [worry_week((6, 5, 5)), worry_week((5, 5, 6)), worry_week((6, 6, 4)), worry_week((6, 5, 5))]
    scored, _ = administer(version, weeks)
    change = scored.changes["worry"]
    assert change.score == 5.33 and change.cutoff == 5.04
    assert change.elevated and change.change_first == "no-reliable-change" and change.stagnation
    obs = scale_obs(scored, "worry")
    assert {"elevated", "stagnation"} <= set(interpretations(obs)) and "within-range" not in interpretations(
        obs
    )
    # The elevated range is written on the Observation, typed, next to the possible scores.
    possible, elevated = obs["referenceRange"]
    assert possible["low"]["value"] == 1 and possible["high"]["value"] == 7 and "type" not in possible
    assert elevated["type"]["coding"] == [
        {"system": CS_INTERPRETATION, "code": "elevated-range", "display": "Forhøyet område"}
    ]
    assert (elevated["low"]["value"], elevated["high"]["value"]) == (5.04, 7)
    assert elevated["low"]["code"] == "{score}"
    report = scored.resources.report
    assert report["conclusion"] == "Elevated: Worry (5.3). Stagnation: Worry."
    # A scale below its elevated range is within range.
    assert interpretations(scale_obs(scored, "sad"))[0] == "within-range"


def test_crossing_out_of_the_elevated_range_is_below_the_closing_threshold() -> None:
    scored, _ = administer("2.2.0", [worry_week((6, 5, 5)), worry_week((5, 5, 5))])
    change = scored.changes["worry"]
    assert change.score == 5.0 and not change.elevated and change.crossed_out_of_elevated
    assert interpretations(scale_obs(scored, "worry"))[0] == "within-range"


def test_elevated_from_in_the_mapping_moves_the_range() -> None:
    m = mapping("2.2.0")
    moved = m.model_copy(
        update={
            "scales": [
                s.model_copy(update={"elevated_from": 5.5}) if s.code == "worry" else s for s in m.scales
            ]
        }
    )
    assert moved.scale("worry").elevated_low == 5.5 and m.scale("worry").elevated_low == 5.04
    with pytest.raises(ValueError, match="within 1-7"):
        InstrumentMapping.model_validate(
            {
                **m.model_dump(by_alias=True),
                "scales": [
                    {**s.model_dump(by_alias=True), "elevated_from": 8}
                    if s.code == "worry"
                    else s.model_dump(by_alias=True)
                    for s in m.scales
                ],
            }
        )


# --- "not relevant" on the single items (item 5) --------------------------------------------------------


def test_not_relevant_on_single_items_scores_1_under_2_2_0_and_missing_under_2_1_0() -> None:
    assert mapping("2.2.0").answer_handling.not_relevant.single_items == 1
    assert mapping("2.1.0").answer_handling.not_relevant.single_items == "missing"
    answers = worry_week(
        (2, 2, 2), **{"single-sleep": "not-relevant", "single-physical-health": "not-relevant"}
    )
    new, _ = administer("2.2.0", [answers])
    assert new.scores is not None
    sleep, health = new.scores.single["single-sleep"], new.scores.single["single-physical-health"]
    assert (sleep.raw, sleep.problem_score) == (None, 1.0)  # the lowest: no problem
    assert (health.raw, health.problem_score) == (None, 1.0)  # resource-worded: no problem either
    by_code = {o["code"]["coding"][0]["code"]: o for o in new.resources.single_items}
    # The value reads as the item's wording: "no sleep problem" is 1, "good physical health" is 7.
    assert by_code["single-sleep"]["valueQuantity"]["value"] == 1
    assert by_code["single-physical-health"]["valueQuantity"]["value"] == 7
    assert component(by_code["single-physical-health"], "scale-score") == 1
    old, _ = administer("2.1.0", [answers])
    assert old.scores is not None and old.scores.single["single-sleep"].problem_score is None
    assert "single-sleep" not in {o["code"]["coding"][0]["code"] for o in old.resources.single_items}


# --- the closing rule on the Observation (item 6) -------------------------------------------------------


def gen_func_week(levels: tuple[int, int, int]) -> dict[str, str]:
    """General functioning at the given problem levels (genFunc-1 and -2 are reverse keyed)."""
    out = worry_week((2, 2, 2))
    out.update(
        {"genFunc-1": str(8 - levels[0]), "genFunc-2": str(8 - levels[1]), "genFunc-3": str(levels[2])}
    )
    return out


@pytest.mark.parametrize(("version", "closes"), [("2.2.0", True), ("2.1.0", False)])
def test_the_scale_observation_says_closed_and_carries_the_moving_average(version: str, closes: bool) -> None:
    """General functioning 2.33, 1.0, 6.33 (the last with trigger 6): mean 3.22 < 4.49. The published
    rule (2.2.0) closes the scale, 2.1.0 keeps it open while the trigger is high; either way the
    Observation carries the moving average the rule compared."""
    weeks = [gen_func_week((5, 1, 1)), gen_func_week((1, 1, 1)), gen_func_week((6, 6, 7))]
    scored, _ = administer(version, weeks)
    obs = scale_obs(scored, "genFunc")
    assert obs["valueQuantity"]["value"] == 6.33
    assert component(obs, "mean-last3") == 3.22
    assert ("closed" in interpretations(obs)) is closes
    assert "trigger-only" not in interpretations(obs)  # asked in full


def test_a_trigger_only_score_is_closed_and_fewer_scores_than_the_window_have_no_moving_average() -> None:
    first, _ = administer("2.2.0", [gen_func_week((5, 1, 1))])
    obs = scale_obs(first, "genFunc")
    assert component(obs, "mean-last3") is None  # one full score: no moving average of three yet
    assert "closed" not in interpretations(obs)  # opened by its trigger, fewer than 3 scores: open
    # A scale whose trigger never opened it is closed after the intake (only its trigger next time).
    assert "closed" in interpretations(scale_obs(first, "sad"))
    # A closed scale answered by its trigger alone: trigger-only and still closed; the moving average is
    # that of its last three full scores.
    weeks = [gen_func_week((5, 1, 1)), gen_func_week((1, 1, 1)), gen_func_week((6, 6, 7))]
    trigger_only = {k: v for k, v in gen_func_week((2, 2, 2)).items() if k not in ("genFunc-2", "genFunc-3")}
    scored, _ = administer("2.2.0", [*weeks, trigger_only])
    obs = scale_obs(scored, "genFunc")
    assert {"trigger-only", "closed"} <= set(interpretations(obs))
    assert component(obs, "mean-last3") == 3.22
