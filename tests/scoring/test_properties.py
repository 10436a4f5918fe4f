"""Property tests of the pure scoring engine: many random cases from fixed seeds (no extra dependency).

Each property loops over hundreds of cases drawn by ``random.Random(<seed>)``, so a failure is
reproducible; the failing case is in the assertion message. Oracles are written from the rules of
``../shared/domain/README.md`` (scale score = mean of the answered items, reverse-keyed items score
8 - x, "not relevant" scores 1 and "prefer not" is missing on clinical scales; RC and RTI as
published), not from the engine's code.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import pytest

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

ROOT = Path(__file__).resolve().parents[2]
CASES = 400
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


def random_answers(
    rng: random.Random, mapping: InstrumentMapping, *, as_the_form_asks: bool
) -> dict[str, str]:
    """Random answer codes: every code, non-numeric ones included, some items left out. With
    ``as_the_form_asks`` the follow-up items are answered only when the trigger opens the scale."""
    p_special = rng.choice([0.0, 0.1, 0.4])

    def code() -> str:
        return rng.choice(NON_NUMERIC) if rng.random() < p_special else rng.choice(NUMERIC)

    answers: dict[str, str] = {}
    p_missing = rng.choice([0.0, 0.2, 0.6])
    for scale in mapping.scales:
        if scale.trigger is not None and rng.random() >= p_missing:
            answers[scale.trigger] = code()
    for scale in mapping.scales:
        if as_the_form_asks:
            trigger = mapping.trigger_of(scale)
            owner = mapping.scale_of_item(trigger)
            value = item_value(owner, trigger, answers[trigger]) if trigger in answers else None
            if value is None or value <= scale.open_if_trigger_gt:
                continue
        for link_id in scale.items:
            if link_id != scale.trigger and rng.random() >= p_missing:
                answers[link_id] = code()
    for link_id in mapping.alliance.items:
        if rng.random() >= p_missing:
            answers[link_id] = code()
    return answers


# --- scale scores ----------------------------------------------------------------------------------


@pytest.mark.parametrize("as_the_form_asks", [True, False])
def test_every_scale_score_is_the_mean_of_its_items_within_1_to_7(as_the_form_asks: bool) -> None:
    mapping = nf21()
    rng = random.Random(2101 + as_the_form_asks)
    scored = 0
    for case in range(CASES):
        answers = random_answers(rng, mapping, as_the_form_asks=as_the_form_asks)
        scores = score_nf21(answers, mapping)
        for scale in mapping.scales:
            got = scores.scales[scale.code]
            values = [
                v for i in scale.items if i in answers and (v := item_value(scale, i, answers[i])) is not None
            ]
            where = f"case {case}, {scale.code}: {[(i, answers.get(i)) for i in scale.items]}"
            assert got.items_answered == len(values), where
            if not values:
                assert got.score is None and got.z is None, where
                continue
            scored += 1
            assert got.score is not None, where
            assert 1 <= got.score <= 7, where
            assert got.score == pytest.approx(sum(values) / len(values)), where
            assert got.z == pytest.approx((got.score - scale.norms.mean) / scale.norms.sd), where
    assert scored > CASES  # the loop really scored scales


def test_reverse_keyed_x_scores_as_normally_keyed_8_minus_x() -> None:
    """Item level: a scale with one answered item, reverse-keyed and answered x, scores what the same
    item, normally keyed and answered 8 - x, scores (and both lie in 1-7)."""
    base = nf21()
    rng = random.Random(2102)
    for case in range(CASES):
        scale = rng.choice(base.scales)
        link_id = rng.choice(scale.items)
        x = rng.randint(1, 7)
        reversed_ = with_reverse_keyed(base, {scale.code: [link_id]})
        normal = with_reverse_keyed(base, {scale.code: []})
        a = score_nf21({link_id: str(x)}, reversed_).scales[scale.code]
        b = score_nf21({link_id: str(8 - x)}, normal).scales[scale.code]
        where = f"case {case}: {scale.code} {link_id} x={x}"
        assert a.score == b.score == 8 - x, where
        if link_id == base.trigger_of(scale):
            assert a.trigger_problem_score == b.trigger_problem_score == 8 - x, where
            assert a.opened == b.opened, where


def test_complementing_the_reverse_keys_and_mirroring_the_numeric_answers_changes_nothing() -> None:
    """Whole instrument: reverse-key exactly the items that were not, answer 8 - x wherever a number
    was answered (non-numeric answers unchanged): every scale scores the same, opens the same way."""
    base = nf21()
    complement = with_reverse_keyed(
        base, {s.code: [i for i in s.items if i not in s.reverse_keyed] for s in base.scales}
    )
    rng = random.Random(2103)
    for case in range(CASES):
        answers = random_answers(rng, base, as_the_form_asks=False)
        mirrored = {i: str(8 - int(c)) if c in NUMERIC else c for i, c in answers.items()}
        a = score_nf21(answers, base)
        b = score_nf21(mirrored, complement)
        for code in base.display_order:
            sa, sb = a.scales[code], b.scales[code]
            where = f"case {case}, {code}"
            assert (sa.items_answered, sa.trigger_only, sa.opened) == (
                sb.items_answered,
                sb.trigger_only,
                sb.opened,
            )
            assert sa.score == pytest.approx(sb.score), where
            assert sa.trigger_problem_score == sb.trigger_problem_score, where


# --- reliable change -------------------------------------------------------------------------------


def random_sd_r(rng: random.Random) -> tuple[float, float]:
    if rng.random() < 0.5:  # a real scale of the mapping
        scale = rng.choice(nf21().scales)
        return scale.norms.sd, scale.reliability.value
    return rng.uniform(0.3, 2.5), rng.uniform(0.0, 0.95)


def random_score(rng: random.Random) -> float:
    """A possible scale score: the mean of 1-8 item scores 1-7 (ties with the previous one are likely)."""
    n = rng.randint(1, 8)
    return sum(rng.randint(1, 7) for _ in range(n)) / n


def test_reliable_change_has_the_sign_of_the_difference_and_flips_with_the_direction() -> None:
    rng = random.Random(2104)
    critical = nf21().change.critical
    ties = 0
    for case in range(CASES * 2):
        sd, r = random_sd_r(rng)
        x1, x2 = random_score(rng), random_score(rng)
        index = reliable_change(x1, x2, sd, r)
        where = f"case {case}: x1={x1} x2={x2} sd={sd} r={r}"
        assert math.copysign(1, index) == math.copysign(1, x2 - x1) or x1 == x2, where
        assert (index == 0) == (x1 == x2), where
        ties += x1 == x2
        assert index == pytest.approx((x2 - x1) / (math.sqrt(2) * sd * math.sqrt(1 - r))), where
        assert reliable_change(x2, x1, sd, r) == pytest.approx(-index), where
        # classification: reliable iff |RC| > critical; mirrored (time or direction) flips it
        cls = classify(index, critical)
        assert (cls != "no-reliable-change") == (abs(index) > critical), where
        if cls != "no-reliable-change":
            assert (cls == "reliably-deteriorated") == (x2 > x1), where
        assert classify(-index, critical) == FLIP[cls], where
        assert classify(index, critical, higher_is_worse=False) == FLIP[cls], where
    assert ties > 0


def random_series(rng: random.Random, *, gaps: bool) -> list[float | None]:
    series: list[float | None] = [random_score(rng) for _ in range(rng.randint(1, 10))]
    if gaps:
        for i in range(len(series) - 1):
            if rng.random() < 0.2:
                series[i] = None
    return series


def test_mirroring_a_series_flips_every_classification() -> None:
    """x -> 8 - x for every score: the RC and RTI change sign, improvements become deteriorations
    (and the same holds for reading the series with the other direction, higher = better)."""
    rng = random.Random(2105)
    critical = nf21().change.critical
    reliable = 0
    for case in range(CASES):
        sd, r = random_sd_r(rng)
        series = random_series(rng, gaps=True)
        mirrored = [None if x is None else 8 - x for x in series]
        a = scale_change("s", series, sd=sd, r=r, cutoff=4.0, critical=critical)
        b = scale_change("s", mirrored, sd=sd, r=r, cutoff=4.0, critical=critical)
        c = scale_change("s", series, sd=sd, r=r, cutoff=4.0, critical=critical, higher_is_worse=False)
        where = f"case {case}: {series} sd={sd} r={r}"
        for name in ("rc_first", "rc_previous", "rti"):
            va, vb = getattr(a, name), getattr(b, name)
            assert (va is None) == (vb is None), where
            if va is not None:
                assert vb == pytest.approx(-va, abs=1e-12), where
        for name in ("change_first", "change_previous", "trend"):
            ca, cb, cc = getattr(a, name), getattr(b, name), getattr(c, name)
            assert (ca is None) == (cb is None) == (cc is None), where
            if ca is not None:
                assert cb == FLIP[ca] == cc, where
                reliable += ca != "no-reliable-change"
        if a.rc_previous is not None:
            # the sign of the reliable change is the sign of the score difference
            assert a.score is not None and a.previous is not None
            assert (a.rc_previous > 0) == (a.score > a.previous), where
            assert (a.rc_previous < 0) == (a.score < a.previous), where
    assert reliable > 50  # reliable changes really occurred in both directions' checks


def test_rti_equals_rc_for_two_administrations() -> None:
    rng = random.Random(2106)
    for case in range(CASES):
        sd, r = random_sd_r(rng)
        x1, x2 = random_score(rng), random_score(rng)
        rc = reliable_change(x1, x2, sd, r)
        where = f"case {case}: x1={x1} x2={x2} sd={sd} r={r}"
        assert reliable_trend_index([x1, x2], sd, r) == pytest.approx(rc, abs=1e-12), where
        # the published formula with n = 2: slope x2 - x1, sqrt(12 / (n (n^2 - 1))) = sqrt(2)
        assert rti_published([x1, x2], sd, r) == pytest.approx(rc, abs=1e-12), where
        # two scored administrations with a gap between them: still RC, and RC since first = previous
        change = scale_change("s", [x1, None, x2], sd=sd, r=r, cutoff=4.0)
        assert change.rti == pytest.approx(rc, abs=1e-12), where
        assert change.rc_first == change.rc_previous == pytest.approx(rc), where


def rti_published(series: Sequence[float], sd: float, r: float) -> float:
    """McAleavey's formula for equally spaced administrations, as the README writes it."""
    n = len(series)
    t_mean = (n - 1) / 2
    y_mean = sum(series) / n
    b1 = sum((t - t_mean) * (y - y_mean) for t, y in enumerate(series)) / sum(
        (t - t_mean) ** 2 for t in range(n)
    )
    return b1 / (sd * math.sqrt(1 - r) * math.sqrt(12 / (n * (n * n - 1))))


def test_rti_is_the_published_formula_and_ignores_the_level() -> None:
    rng = random.Random(2107)
    for case in range(CASES):
        sd, r = random_sd_r(rng)
        series = [random_score(rng) for _ in range(rng.randint(2, 12))]
        rti = reliable_trend_index(series, sd, r)
        where = f"case {case}: {series} sd={sd} r={r}"
        assert rti == pytest.approx(rti_published(series, sd, r), abs=1e-9), where
        shift = rng.uniform(-3, 3)
        assert reliable_trend_index([x + shift for x in series], sd, r) == pytest.approx(rti, abs=1e-9), where
        assert reliable_trend_index(series[::-1], sd, r) == pytest.approx(
            -rti_published(series, sd, r), abs=1e-9
        )


def test_stagnation_is_the_documented_rule() -> None:
    """Stagnation at the last administration: the last ``window`` scores are all above the scale's
    cut-off (its opening threshold) and neither their RC (first to last) nor their RTI is reliable."""
    mapping = nf21()
    critical, window = mapping.change.critical, mapping.change.stagnation_window
    rng = random.Random(2108)
    seen = {True: 0, False: 0}
    for case in range(CASES * 2):
        scale = rng.choice(mapping.scales)
        sd, r, cut = scale.norms.sd, scale.reliability.value, scale.open_if_trigger_gt
        # around the cut-off, mostly above it, so that both outcomes are common
        series = [
            min(7.0, max(1.0, round(rng.uniform(cut - 0.5, cut + 2.5), 2))) for _ in range(rng.randint(1, 8))
        ]
        got = scale_change_for(scale, series, critical=critical, stagnation_window=window)
        last = series[-window:]
        expected = (
            len(series) >= window
            and all(x > cut for x in last)
            and abs(reliable_change(last[0], last[-1], sd, r)) <= critical
            and abs(rti_published(last, sd, r)) <= critical
        )
        assert got.stagnation == expected, f"case {case}: {scale.code} {series}"
        assert got.elevated == (series[-1] > cut)
        seen[expected] += 1
    assert min(seen.values()) > 50, seen


# --- alliance ---------------------------------------------------------------------------------------


def test_alliance_percent_is_mean_over_7_with_all_items_answered() -> None:
    mapping = nf21()
    alliance = mapping.alliance
    rng = random.Random(2109)
    for case in range(CASES):
        answers = {i: str(rng.randint(1, 7)) for i in alliance.items}
        scores = score_nf21(answers, mapping).alliance
        where = f"case {case}: {answers}"
        for dim in alliance.dimensions:
            got = scores.dimensions[dim.code]
            mean = sum(int(answers[i]) for i in dim.items) / len(dim.items)
            assert got.items_answered == len(dim.items), where
            assert got.mean == pytest.approx(mean), where
            assert got.percent == pytest.approx(mean / 7 * 100), where
        total = scores.total
        assert total.mean is not None and total.percent is not None, where
        raw = sum(int(answers[i]) for i in alliance.items)
        assert total.mean == pytest.approx(raw / len(alliance.items)), where
        assert total.percent == pytest.approx(total.mean / 7 * 100), where
        # ... which is the case study's "percent of the total possible raw score"
        assert total.percent == pytest.approx(raw / alliance.max_raw * 100), where
        assert 100 / 7 <= total.percent <= 100, where
