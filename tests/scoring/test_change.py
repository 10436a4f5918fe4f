"""Reliable change, Reliable Trend Index, classification, elevation and stagnation with plain values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fhir_norse.instruments import load_mapping
from fhir_norse.scoring.change import (
    classify,
    elevated_cutoff,
    reliable_change,
    reliable_trend_index,
    scale_change,
    scale_change_for,
    standard_error_of_difference,
)

NF21 = Path(__file__).resolve().parents[2] / "mappings" / "nf21-2.1.0.yaml"

# Round numbers for hand computation: S_diff = sqrt(2) * 1.5 * sqrt(0.2) = 0.948683...
SD = 1.5
R = 0.8
# Elevated at 4.5 and above; a change is reliable when |x2 - x1| > 1.96 * 0.948683 = 1.859.
CUT = 4.5


def test_reliable_change_by_hand() -> None:
    assert standard_error_of_difference(SD, R) == pytest.approx(0.948683, abs=1e-6)
    assert reliable_change(5, 3, SD, R) == pytest.approx(-2.108185, abs=1e-6)
    assert reliable_change(3, 5, SD, R) == pytest.approx(2.108185, abs=1e-6)
    assert reliable_change(4, 4, SD, R) == 0


@pytest.mark.parametrize(("sd", "r"), [(0.0, 0.8), (-1.0, 0.8), (1.0, 1.0), (1.0, -0.1)])
def test_invalid_sd_or_reliability(sd: float, r: float) -> None:
    with pytest.raises(ValueError):
        reliable_change(1, 2, sd, r)
    with pytest.raises(ValueError):
        reliable_trend_index([1, 2], sd, r)


@pytest.mark.parametrize(
    ("x1", "x2", "sd", "r"),
    [(5, 3, 1.5, 0.8), (1, 7, 1.0, 0.5), (2.25, 2.5, 1.37, 0.9), (4, 4, 2.0, 0.0), (6.5, 1.2, 0.7, 0.95)],
)
def test_rti_equals_rc_for_two_administrations(x1: float, x2: float, sd: float, r: float) -> None:
    assert reliable_trend_index([x1, x2], sd, r) == pytest.approx(reliable_change(x1, x2, sd, r))


def test_rti_linear_series_by_hand() -> None:
    # slope -1; SE = 1.5 * sqrt(0.2) * sqrt(12 / (4 * 15)) = 0.3 -> RTI = -1 / 0.3
    assert reliable_trend_index([6, 5, 4, 3], SD, R) == pytest.approx(-10 / 3)
    assert reliable_trend_index([3, 4, 5, 6], SD, R) == pytest.approx(10 / 3)
    assert reliable_trend_index([4, 4, 4, 4], SD, R) == 0
    # The longer the same slope lasts, the more reliable the trend.
    rti5 = reliable_trend_index([7, 6, 5, 4, 3], SD, R)
    assert rti5 is not None and rti5 < -10 / 3


def test_rti_needs_two_scores() -> None:
    assert reliable_trend_index([], SD, R) is None
    assert reliable_trend_index([4.0], SD, R) is None


def test_rti_with_administration_numbers() -> None:
    # Scores at administrations 0, 2, 3: slope -1, Sxx = 42/9, SE = 1.5 * sqrt(0.2) / sqrt(42/9).
    expected = -1 / (1.5 * math.sqrt(0.2) / math.sqrt(42 / 9))
    assert reliable_trend_index([6, 4, 3], SD, R, times=[0, 2, 3]) == pytest.approx(expected)
    assert expected == pytest.approx(-3.22031, abs=1e-5)
    with pytest.raises(ValueError):
        reliable_trend_index([6, 4], SD, R, times=[1])


def test_classification_boundaries() -> None:
    assert classify(1.96) == "no-reliable-change"
    assert classify(-1.96) == "no-reliable-change"
    assert classify(0.0) == "no-reliable-change"
    assert classify(1.9601) == "reliably-deteriorated"
    assert classify(-1.9601) == "reliably-improved"
    assert classify(-1.9601, higher_is_worse=False) == "reliably-deteriorated"
    assert classify(1.9601, higher_is_worse=False) == "reliably-improved"
    assert classify(1.7, critical=1.645) == "reliably-deteriorated"


def test_change_against_first_and_previous() -> None:
    c = scale_change("sad", [6.0, 5.5, 3.5], sd=SD, r=R, cutoff=CUT)
    assert (c.first, c.previous, c.score) == (6.0, 5.5, 3.5)
    assert c.rc_first == pytest.approx(-2.5 / 0.948683, abs=1e-5)
    assert c.rc_previous == pytest.approx(-2.0 / 0.948683, abs=1e-5)
    assert c.change_first == "reliably-improved"
    assert c.change_previous == "reliably-improved"
    assert c.scored_administrations == 3
    assert c.rti is not None and c.rti < 0


def test_first_administration_has_no_comparison() -> None:
    c = scale_change("sad", [5.0], sd=SD, r=R, cutoff=CUT)
    assert c.rc_first is None and c.rc_previous is None and c.rti is None
    assert c.change_first is None and c.change_previous is None and c.trend is None
    assert c.elevated
    assert not c.crossed_into_elevated and not c.crossed_out_of_elevated and not c.stagnation


def test_deterioration_for_a_problem_scale_and_for_the_alliance() -> None:
    worse = scale_change("sad", [3.0, 5.0], sd=SD, r=R, cutoff=CUT)
    assert worse.change_previous == "reliably-deteriorated"
    alliance = scale_change("alliance", [6.5, 4.5], sd=SD, r=R, cutoff=7.0, higher_is_worse=False)
    assert alliance.change_previous == "reliably-deteriorated"


def test_crossing_into_and_out_of_elevated() -> None:
    into = scale_change("sad", [4.0, 5.0], sd=SD, r=R, cutoff=CUT)
    assert into.crossed_into_elevated and not into.crossed_out_of_elevated and into.elevated
    out = scale_change("sad", [5.0, 4.0], sd=SD, r=R, cutoff=CUT)
    assert out.crossed_out_of_elevated and not out.crossed_into_elevated and not out.elevated
    stays = scale_change("sad", [5.0, 6.0], sd=SD, r=R, cutoff=CUT)
    assert not stays.crossed_into_elevated and not stays.crossed_out_of_elevated
    # The elevated range includes its low end: exactly at the cut-off is elevated.
    at = scale_change("sad", [4.0, 4.5], sd=SD, r=R, cutoff=CUT)
    assert at.elevated and at.crossed_into_elevated
    below = scale_change("sad", [4.5, 4.49], sd=SD, r=R, cutoff=CUT)
    assert not below.elevated and below.crossed_out_of_elevated


def test_missing_administrations_are_skipped() -> None:
    c = scale_change("sad", [None, 6.0, None, 5.0, None, 4.0], sd=SD, r=R, cutoff=CUT)
    assert c.first == 6.0 and c.previous == 5.0 and c.scored_administrations == 3
    assert c.rc_first == pytest.approx(reliable_change(6.0, 4.0, SD, R))
    assert c.rc_previous == pytest.approx(reliable_change(5.0, 4.0, SD, R))
    assert c.rti == pytest.approx(reliable_trend_index([6.0, 5.0, 4.0], SD, R, times=[1, 3, 5]))
    assert c.crossed_out_of_elevated  # against the previous *scored* administration (5.0)


def test_no_score_now_claims_nothing() -> None:
    c = scale_change("sad", [6.0, 6.0, 6.0, 6.0, None], sd=SD, r=R, cutoff=CUT)
    assert c.score is None and c.previous == 6.0
    assert c.rc_first is None and c.rc_previous is None and c.rti is None
    assert not c.elevated and not c.stagnation and not c.crossed_out_of_elevated
    empty = scale_change("sad", [], sd=SD, r=R, cutoff=CUT)
    assert empty.score is None and empty.scored_administrations == 0


def test_stagnation_flat_elevated_series() -> None:
    c = scale_change("sad", [5.5, 5.6, 5.4, 5.5], sd=SD, r=R, cutoff=CUT)
    assert c.stagnation and c.elevated and c.change_first == "no-reliable-change"


def test_no_stagnation_when_improving_reliably() -> None:
    # Still elevated, but 7.0 -> 4.6 is reliable (RC = -2.53; RTI = -2.67).
    c = scale_change("sad", [7.0, 6.2, 5.4, 4.6], sd=SD, r=R, cutoff=CUT)
    assert c.elevated and not c.stagnation
    assert c.trend == "reliably-improved"


def test_no_stagnation_when_deteriorating_or_not_elevated_or_too_short() -> None:
    assert not scale_change("sad", [4.6, 5.4, 6.2, 7.0], sd=SD, r=R, cutoff=CUT).stagnation
    assert not scale_change("sad", [3.0, 3.1, 3.0, 3.1], sd=SD, r=R, cutoff=CUT).stagnation
    # One administration in the window below the cut-off breaks "persistently elevated".
    assert not scale_change("sad", [5.5, 4.4, 5.4, 5.5], sd=SD, r=R, cutoff=CUT).stagnation
    assert not scale_change("sad", [5.5, 5.6, 5.4], sd=SD, r=R, cutoff=CUT).stagnation
    assert scale_change("sad", [5.5, 5.6, 5.4], sd=SD, r=R, cutoff=CUT, stagnation_window=3).stagnation


def test_stagnation_window_is_the_last_k_scored_administrations() -> None:
    # Reliable improvement early on, then four flat elevated scores (one administration missing).
    series: list[float | None] = [7.5, 5.2, 5.3, None, 5.1, 5.2]
    c = scale_change("sad", series, sd=SD, r=R, cutoff=CUT)
    assert c.change_first == "reliably-improved"
    assert c.stagnation


def test_invalid_window() -> None:
    with pytest.raises(ValueError):
        scale_change("sad", [5.0, 5.0], sd=SD, r=R, cutoff=CUT, stagnation_window=1)


def test_from_mapping_uses_norm_sd_reliability_and_the_elevated_range() -> None:
    mapping = load_mapping(NF21)
    sad = mapping.scale("sad")
    c = scale_change_for(sad, [3.0, 6.0])
    assert c.scale == "sad"
    # No elevated_from in the mapping: the elevated range starts at the closing threshold (4.02), not
    # at the opening one (4.5).
    assert sad.elevated_from is None
    assert c.cutoff == sad.close_if_mean_last3_lt == 4.02
    assert c.rc_previous == pytest.approx(reliable_change(3.0, 6.0, sad.norms.sd, sad.reliability.value))
    assert c.crossed_into_elevated
    assert elevated_cutoff(sad) == sad.close_if_mean_last3_lt
    assert elevated_cutoff(sad.model_copy(update={"elevated_from": 5.0})) == 5.0
    assert scale_change_for(sad, [4.02]).elevated and not scale_change_for(sad, [4.01]).elevated
    assert elevated_cutoff(sad, z=0.5) == pytest.approx(sad.norms.mean + 0.5 * sad.norms.sd)
    assert scale_change_for(sad, [3.0, 6.0], cutoff=6.5).elevated is False
