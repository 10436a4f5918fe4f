"""Property tests of the pure scoring engine, with Hypothesis.

Each property runs on 100 generated cases. ``derandomize=True`` makes them the same cases on
every run (CI is reproducible and bounded in time); a failing case is shrunk to a small one and printed.
Oracles are written from the rules of ``../shared/domain/README.md`` (scale score = mean of the answered
items, reverse-keyed items score 8 - x, "not relevant" scores 1 and "prefer not" is missing on clinical
scales; RC and RTI as published), not from the engine's code.

A property that also checks that the generated cases reach the interesting branches (ties, reliable
changes, both stagnation outcomes) counts them in a nested ``@given`` function and asserts the counts
after Hypothesis has run it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_norse.instruments.schema import InstrumentMapping, Scale, load_mapping
from fhir_norse.scoring import score_nf21
from fhir_norse.scoring.change import (
    ChangeClass,
    classify,
    reliable_change,
    reliable_trend_index,
    scale_change,
    scale_change_for,
)
from fhir_norse.scoring.precision import at_precision
from tests.property_support import picks

ROOT = Path(__file__).resolve().parents[2]
CASES = 100  # generated cases per property
NUMERIC = [str(v) for v in range(1, 8)]
NON_NUMERIC = ["not-relevant", "prefer-not"]
FLIP: dict[ChangeClass, ChangeClass] = {
    "reliably-deteriorated": "reliably-improved",
    "reliably-improved": "reliably-deteriorated",
    "no-reliable-change": "no-reliable-change",
}


@cache
def nf21() -> InstrumentMapping:
    return load_mapping(ROOT / "mappings" / "nf21-2.1.0.yaml")


def with_reverse_keyed(mapping: InstrumentMapping, reverse: dict[str, list[str]]) -> InstrumentMapping:
    """``mapping`` with the reverse-keyed items of the scales in ``reverse`` replaced."""
    scales = [
        s.model_copy(update={"reverse_keyed": reverse[s.code]}) if s.code in reverse else s
        for s in mapping.scales
    ]
    return mapping.model_copy(update={"scales": scales})


def item_value(scale: Scale, link_id: str, code: str) -> float | None:
    """The README's item rule on a clinical scale (problem direction); None = missing."""
    if code == "not-relevant":
        return 1.0
    if code == "prefer-not":
        return None
    x = int(code)
    return float(8 - x if link_id in scale.reverse_keyed else x)


# --- strategies -------------------------------------------------------------------------------------


@st.composite
def answer_sets(draw: st.DrawFn, *, as_the_form_asks: bool) -> dict[str, str]:
    """NF 2.1 answer codes: every code, non-numeric ones included (unless the case is all numeric), some
    items left out. With ``as_the_form_asks`` the follow-up items are answered only when the trigger
    opens the scale. Shrinks towards fewer answered items."""
    mapping = nf21()
    numeric_only = draw(st.booleans())
    options = [None, *NUMERIC, *([] if numeric_only else NON_NUMERIC)]  # None: left out
    answers: dict[str, str] = {}

    def answer(link_ids: list[str]) -> None:
        for link_id, code in zip(link_ids, picks(draw, options, len(link_ids)), strict=True):
            if code is not None:
                answers[link_id] = code

    answer([scale.trigger for scale in mapping.scales if scale.trigger is not None])
    for scale in mapping.scales:
        if as_the_form_asks:
            trigger = mapping.trigger_of(scale)
            owner = mapping.scale_of_item(trigger)
            value = item_value(owner, trigger, answers[trigger]) if trigger in answers else None
            if value is None or value <= scale.open_if_trigger_gt:
                continue
        answer([i for i in scale.items if i != scale.trigger])
    answer(mapping.alliance.items)
    return answers


@st.composite
def scale_codes(draw: st.DrawFn) -> str:
    return draw(st.sampled_from([s.code for s in nf21().scales]))


@st.composite
def scale_items(draw: st.DrawFn) -> tuple[str, str]:
    """A scale code and one of the scale's items."""
    code = draw(scale_codes())
    return code, draw(st.sampled_from(nf21().scale(code).items))


@st.composite
def sds_and_reliabilities(draw: st.DrawFn) -> tuple[float, float]:
    """The norm SD and reliability of a real scale of the mapping, or any plausible pair."""
    if draw(st.booleans()):
        scale = nf21().scale(draw(scale_codes()))
        return scale.norms.sd, scale.reliability.value
    return draw(st.floats(0.3, 2.5)), draw(st.floats(0.0, 0.95))


@st.composite
def scale_scores(draw: st.DrawFn) -> float:
    """A possible scale score: the mean of 1-8 item scores 1-7 (equal scores are likely)."""
    items = picks(draw, range(1, 8), draw(st.integers(1, 8)))
    return sum(items) / len(items)


SCALE_SCORES = scale_scores()


@st.composite
def series_with_gaps(draw: st.DrawFn) -> list[float | None]:
    """1-10 scale scores, oldest first; any but the last may be missing (None)."""
    return [*draw(st.lists(SCALE_SCORES | st.none(), max_size=9)), draw(SCALE_SCORES)]


@st.composite
def stagnation_cases(draw: st.DrawFn) -> tuple[str, list[float]]:
    """A scale and 1-8 scores in hundredths around its cut-off, mostly at or above it, so that both
    outcomes (stagnating or not) are common; one score in ten right at the cut-off (elevated) and one just
    below it (not elevated)."""
    code = draw(scale_codes())
    cut = round(nf21().scale(code).elevated_low * 100)
    offset = st.integers(0, 9).flatmap(
        lambda k: st.just(0) if k == 0 else st.just(-1) if k == 1 else st.integers(-50, 250)
    )
    score = offset.map(lambda h: min(7.0, max(1.0, (cut + h) / 100)))
    return code, draw(st.lists(score, min_size=1, max_size=8))


@st.composite
def alliance_answers(draw: st.DrawFn) -> dict[str, str]:
    """Every alliance item answered 1-7."""
    return {i: draw(st.sampled_from(NUMERIC)) for i in nf21().alliance.items}


# --- scale scores ----------------------------------------------------------------------------------


@pytest.mark.parametrize("as_the_form_asks", [True, False])
def test_every_scale_score_is_the_mean_of_its_items_within_1_to_7(as_the_form_asks: bool) -> None:
    mapping = nf21()
    scored = 0

    @settings(max_examples=CASES, deadline=None, derandomize=True)
    @given(answers=answer_sets(as_the_form_asks=as_the_form_asks))
    def holds(answers: dict[str, str]) -> None:
        nonlocal scored
        scores = score_nf21(answers, mapping)
        for scale in mapping.scales:
            got = scores.scales[scale.code]
            values = [
                v for i in scale.items if i in answers and (v := item_value(scale, i, answers[i])) is not None
            ]
            where = f"{scale.code}: {[(i, answers.get(i)) for i in scale.items]}"
            assert got.items_answered == len(values), where
            if not values:
                assert got.score is None and got.z is None, where
                continue
            scored += 1
            assert got.score is not None, where
            assert 1 <= got.score <= 7, where
            assert got.score == at_precision(sum(values) / len(values), mapping.decimals), where
            assert got.z == pytest.approx((got.score - scale.norms.mean) / scale.norms.sd), where

    holds()
    assert scored > CASES  # the cases really scored scales


@settings(max_examples=CASES, deadline=None, derandomize=True)
@given(scale_item=scale_items(), x=st.integers(1, 7))
def test_reverse_keyed_x_scores_as_normally_keyed_8_minus_x(scale_item: tuple[str, str], x: int) -> None:
    """Item level: a scale with one answered item, reverse-keyed and answered x, scores what the same
    item, normally keyed and answered 8 - x, scores (and both lie in 1-7)."""
    base = nf21()
    code, link_id = scale_item
    reversed_ = with_reverse_keyed(base, {code: [link_id]})
    normal = with_reverse_keyed(base, {code: []})
    a = score_nf21({link_id: str(x)}, reversed_).scales[code]
    b = score_nf21({link_id: str(8 - x)}, normal).scales[code]
    assert a.score == b.score == 8 - x
    if link_id == base.trigger_of(base.scale(code)):
        assert a.trigger_problem_score == b.trigger_problem_score == 8 - x
        assert a.opened == b.opened


@settings(max_examples=CASES, deadline=None, derandomize=True)
@given(answers=answer_sets(as_the_form_asks=False))
def test_complementing_the_reverse_keys_and_mirroring_the_numeric_answers_changes_nothing(
    answers: dict[str, str],
) -> None:
    """Whole instrument: reverse-key exactly the items that were not, answer 8 - x wherever a number
    was answered (non-numeric answers unchanged): every scale scores the same, opens the same way."""
    base = nf21()
    complement = with_reverse_keyed(
        base, {s.code: [i for i in s.items if i not in s.reverse_keyed] for s in base.scales}
    )
    mirrored = {i: str(8 - int(c)) if c in NUMERIC else c for i, c in answers.items()}
    a = score_nf21(answers, base)
    b = score_nf21(mirrored, complement)
    for code in base.display_order:
        sa, sb = a.scales[code], b.scales[code]
        assert (sa.items_answered, sa.trigger_only, sa.opened) == (
            sb.items_answered,
            sb.trigger_only,
            sb.opened,
        ), code
        assert sa.score == pytest.approx(sb.score), code
        assert sa.trigger_problem_score == sb.trigger_problem_score, code


# --- reliable change -------------------------------------------------------------------------------


def test_reliable_change_has_the_sign_of_the_difference_and_flips_with_the_direction() -> None:
    critical = nf21().change.critical
    ties = 0

    @settings(max_examples=CASES, deadline=None, derandomize=True)
    @given(sd_r=sds_and_reliabilities(), x1=SCALE_SCORES, x2=SCALE_SCORES)
    def holds(sd_r: tuple[float, float], x1: float, x2: float) -> None:
        nonlocal ties
        sd, r = sd_r
        index = reliable_change(x1, x2, sd, r)
        assert math.copysign(1, index) == math.copysign(1, x2 - x1) or x1 == x2
        assert (index == 0) == (x1 == x2)
        ties += x1 == x2
        assert index == pytest.approx((x2 - x1) / (math.sqrt(2) * sd * math.sqrt(1 - r)))
        assert reliable_change(x2, x1, sd, r) == pytest.approx(-index)
        # classification: reliable iff |RC| > critical; mirrored (time or direction) flips it
        cls = classify(index, critical)
        assert (cls != "no-reliable-change") == (abs(index) > critical)
        if cls != "no-reliable-change":
            assert (cls == "reliably-deteriorated") == (x2 > x1)
        assert classify(-index, critical) == FLIP[cls]
        assert classify(index, critical, higher_is_worse=False) == FLIP[cls]

    holds()
    assert ties > 0


def test_mirroring_a_series_flips_every_classification() -> None:
    """x -> 8 - x for every score: the RC and RTI change sign, improvements become deteriorations
    (and the same holds for reading the series with the other direction, higher = better)."""
    critical = nf21().change.critical
    reliable = 0

    @settings(max_examples=CASES, deadline=None, derandomize=True)
    @given(sd_r=sds_and_reliabilities(), series=series_with_gaps())
    def holds(sd_r: tuple[float, float], series: list[float | None]) -> None:
        nonlocal reliable
        sd, r = sd_r
        mirrored = [None if x is None else 8 - x for x in series]
        a = scale_change("s", series, sd=sd, r=r, cutoff=4.0, critical=critical)
        b = scale_change("s", mirrored, sd=sd, r=r, cutoff=4.0, critical=critical)
        c = scale_change("s", series, sd=sd, r=r, cutoff=4.0, critical=critical, higher_is_worse=False)
        for name in ("rc_first", "rc_previous", "rti"):
            va, vb = getattr(a, name), getattr(b, name)
            assert (va is None) == (vb is None), name
            if va is not None:
                assert vb == pytest.approx(-va, abs=1e-12), name
        for name in ("change_first", "change_previous", "trend"):
            ca, cb, cc = getattr(a, name), getattr(b, name), getattr(c, name)
            assert (ca is None) == (cb is None) == (cc is None), name
            if ca is not None:
                assert cb == FLIP[ca] == cc, name
                reliable += ca != "no-reliable-change"
        if a.rc_previous is not None:
            # the sign of the reliable change is the sign of the score difference
            assert a.score is not None and a.previous is not None
            assert (a.rc_previous > 0) == (a.score > a.previous)
            assert (a.rc_previous < 0) == (a.score < a.previous)

    holds()
    assert reliable > CASES // 8  # reliable changes really occurred in both directions' checks


@settings(max_examples=CASES, deadline=None, derandomize=True)
@given(sd_r=sds_and_reliabilities(), x1=SCALE_SCORES, x2=SCALE_SCORES)
def test_rti_equals_rc_for_two_administrations(sd_r: tuple[float, float], x1: float, x2: float) -> None:
    sd, r = sd_r
    rc = reliable_change(x1, x2, sd, r)
    assert reliable_trend_index([x1, x2], sd, r) == pytest.approx(rc, abs=1e-12)
    # the published formula with n = 2: slope x2 - x1, sqrt(12 / (n (n^2 - 1))) = sqrt(2)
    assert rti_published([x1, x2], sd, r) == pytest.approx(rc, abs=1e-12)
    # two scored administrations with a gap between them: still RC, and RC since first = previous
    change = scale_change("s", [x1, None, x2], sd=sd, r=r, cutoff=4.0)
    assert change.rti == pytest.approx(rc, abs=1e-12)
    assert change.rc_first == change.rc_previous == pytest.approx(rc)


def rti_published(series: Sequence[float], sd: float, r: float) -> float:
    """McAleavey's formula for equally spaced administrations, as the README writes it."""
    n = len(series)
    t_mean = (n - 1) / 2
    y_mean = sum(series) / n
    b1 = sum((t - t_mean) * (y - y_mean) for t, y in enumerate(series)) / sum(
        (t - t_mean) ** 2 for t in range(n)
    )
    return b1 / (sd * math.sqrt(1 - r) * math.sqrt(12 / (n * (n * n - 1))))


@settings(max_examples=CASES, deadline=None, derandomize=True)
@given(
    sd_r=sds_and_reliabilities(),
    series=st.lists(SCALE_SCORES, min_size=2, max_size=12),
    shift=st.floats(-3, 3),
)
def test_rti_is_the_published_formula_and_ignores_the_level(
    sd_r: tuple[float, float], series: list[float], shift: float
) -> None:
    sd, r = sd_r
    rti = reliable_trend_index(series, sd, r)
    assert rti == pytest.approx(rti_published(series, sd, r), abs=1e-9)
    assert reliable_trend_index([x + shift for x in series], sd, r) == pytest.approx(rti, abs=1e-9)
    assert reliable_trend_index(series[::-1], sd, r) == pytest.approx(-rti_published(series, sd, r), abs=1e-9)


def test_stagnation_is_the_documented_rule() -> None:
    """Stagnation at the last administration: the last ``window`` scores are all in the scale's elevated
    range (at or above elevated_from, by default its closing threshold) and neither their RC (first to
    last) nor their RTI is reliable."""
    mapping = nf21()
    critical, window = mapping.change.critical, mapping.change.stagnation_window
    seen = {True: 0, False: 0}

    @settings(max_examples=CASES, deadline=None, derandomize=True)
    @given(case=stagnation_cases())
    def holds(case: tuple[str, list[float]]) -> None:
        code, series = case
        scale = mapping.scale(code)
        sd, r, cut = scale.norms.sd, scale.reliability.value, scale.close_if_mean_last3_lt
        got = scale_change_for(scale, series, critical=critical, stagnation_window=window)
        last = series[-window:]
        expected = (
            len(series) >= window
            and all(x >= cut for x in last)
            and abs(reliable_change(last[0], last[-1], sd, r)) <= critical
            and abs(rti_published(last, sd, r)) <= critical
        )
        assert got.stagnation == expected
        assert got.elevated == (series[-1] >= cut)
        seen[expected] += 1

    holds()
    assert min(seen.values()) > CASES // 16, seen  # both outcomes are common


# --- alliance ---------------------------------------------------------------------------------------


@settings(max_examples=CASES, deadline=None, derandomize=True)
@given(answers=alliance_answers())
def test_alliance_percent_is_mean_over_7_with_all_items_answered(answers: dict[str, str]) -> None:
    mapping = nf21()
    alliance = mapping.alliance
    scores = score_nf21(answers, mapping).alliance
    for dim in alliance.dimensions:
        got = scores.dimensions[dim.code]
        mean = sum(int(answers[i]) for i in dim.items) / len(dim.items)
        assert got.items_answered == len(dim.items), dim.code
        assert got.mean == pytest.approx(mean), dim.code
        assert got.percent == pytest.approx(mean / 7 * 100), dim.code
    total = scores.total
    assert total.mean is not None and total.percent is not None
    raw = sum(int(answers[i]) for i in alliance.items)
    assert total.mean == pytest.approx(raw / len(alliance.items))
    assert total.percent == pytest.approx(total.mean / 7 * 100)
    # ... which is the case study's "percent of the total possible raw score"
    assert total.percent == pytest.approx(raw / alliance.max_raw * 100)
    # within 1/7 and 7/7 of the maximum, up to rounding (1 / 7 * 100 lies one ulp below 100 / 7)
    assert 100 / 7 - 1e-9 <= total.percent <= 100
