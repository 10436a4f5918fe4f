"""Alert rules with plain values: each rule, and raise/keep/resolve over a series of administrations."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_norse.alerts import (
    Alert,
    AlertDecision,
    AlertRules,
    AllianceState,
    ScaleState,
    evaluate_alerts,
)
from fhir_norse.instruments import load_mapping

NF21 = Path(__file__).resolve().parents[2] / "mappings" / "nf21-2.1.0.yaml"
MAPPING = load_mapping(NF21)
SUICIDE = next(s for s in MAPPING.scales if s.code == "suicide")
RULES = AlertRules.from_mapping(MAPPING, suicide_scale=SUICIDE.code)
THRESHOLD = SUICIDE.open_if_trigger_gt
CALM = AllianceState(total_mean=6.5, total_percent=92.9, change_vs_previous="no-reliable-change")


def _suicide(trigger: float | None, score: float | None = None) -> ScaleState:
    return ScaleState(SUICIDE.code, score if score is not None else trigger, trigger, None)


def _keys(alerts: tuple[Alert, ...]) -> list[tuple[str, str | None]]:
    return [(a.code, a.scale) for a in alerts]


def _run(
    scales: list[ScaleState],
    active: list[Alert] | tuple[Alert, ...] = (),
    alliance: AllianceState | None = CALM,
    prefer_not: frozenset[str] = frozenset(),
    rules: AlertRules = RULES,
) -> AlertDecision:
    return evaluate_alerts(scales, alliance, prefer_not, active, rules)


def test_rules_come_from_the_mapping() -> None:
    assert RULES.suicide_scale == SUICIDE.code
    assert RULES.suicide_trigger_gt == SUICIDE.open_if_trigger_gt
    assert RULES.suicide_score_gt == SUICIDE.open_if_trigger_gt
    assert frozenset(SUICIDE.items) == RULES.suicide_items
    assert RULES.alliance_floor_percent == 75.0
    other = AlertRules.from_mapping(MAPPING, suicide_scale=SUICIDE.code, suicide_score_gt=2.0)
    assert other.suicide_score_gt == 2.0
    with pytest.raises(KeyError):
        AlertRules.from_mapping(MAPPING, suicide_scale="no-such-scale")
    with pytest.raises(ValueError):
        AlertRules("s", 3.5, 3.5, frozenset(), alliance_floor_percent=120)


def test_quiet_administration_raises_nothing() -> None:
    d = _run([_suicide(1.0), ScaleState("sad", 3.0, 3.0, "no-reliable-change")])
    assert d == AlertDecision((), (), ())


def test_suicide_trigger_above_threshold_is_urgent() -> None:
    d = _run([_suicide(THRESHOLD + 0.5, score=2.0)])
    assert _keys(d.raise_) == [("suicide-risk", SUICIDE.code)]
    assert d.raise_[0].urgent
    assert "trigger" in d.raise_[0].reason
    # At the threshold is not above it (the opening rule is strict too).
    assert _run([_suicide(THRESHOLD, score=THRESHOLD)]).raise_ == ()


def test_suicide_scale_score_above_threshold_is_urgent() -> None:
    d = _run([_suicide(2.0, score=THRESHOLD + 0.25)])
    assert _keys(d.raise_) == [("suicide-risk", SUICIDE.code)]
    assert d.raise_[0].urgent and "score" in d.raise_[0].reason
    # Only the score, the trigger answered "prefer not".
    assert _keys(_run([ScaleState(SUICIDE.code, 5.0, None)]).raise_) == [("suicide-risk", SUICIDE.code)]


def test_deterioration_one_per_scale() -> None:
    d = _run(
        [
            _suicide(1.0),
            ScaleState("sad", 6.0, 6.0, "reliably-deteriorated"),
            ScaleState("worry", 6.5, 6.0, "reliably-deteriorated"),
            ScaleState("trauma", 2.0, 2.0, "reliably-improved"),
        ]
    )
    assert _keys(d.raise_) == [("deterioration", "sad"), ("deterioration", "worry")]
    assert not any(a.urgent for a in d.raise_)


def test_alliance_rupture_reliable_drop() -> None:
    drop = AllianceState(total_mean=5.5, total_percent=78.6, change_vs_previous="reliably-deteriorated")
    d = _run([], alliance=drop)
    assert _keys(d.raise_) == [("alliance-rupture", None)]
    assert "reliably lower" in d.raise_[0].reason


def test_alliance_rupture_below_floor() -> None:
    low = AllianceState(total_mean=5.0, total_percent=71.4, change_vs_previous="no-reliable-change")
    d = _run([], alliance=low)
    assert _keys(d.raise_) == [("alliance-rupture", None)]
    assert "75 %" in d.raise_[0].reason
    assert _run([], alliance=AllianceState(5.25, 75.0, None)).raise_ == ()  # at the floor is fine
    strict = AlertRules.from_mapping(MAPPING, suicide_scale=SUICIDE.code, alliance_floor_percent=90.0)
    assert _keys(_run([], alliance=AllianceState(6.0, 85.7, None), rules=strict).raise_) == [
        ("alliance-rupture", None)
    ]


def test_prefer_not_on_suicidality_items() -> None:
    item = SUICIDE.items[1]
    d = _run([_suicide(1.0)], prefer_not=frozenset({item, "sad-2"}))
    assert _keys(d.raise_) == [("prefer-not-suicide", SUICIDE.code)]
    assert item in d.raise_[0].reason and "sad-2" not in d.raise_[0].reason
    assert not d.raise_[0].urgent
    # "prefer not" on other scales' items raises nothing.
    assert _run([_suicide(1.0)], prefer_not=frozenset({"sad-2"})).raise_ == ()
    urgent = AlertRules.from_mapping(MAPPING, suicide_scale=SUICIDE.code, prefer_not_urgent=True)
    assert _run([_suicide(1.0)], prefer_not=frozenset({item}), rules=urgent).raise_[0].urgent


def test_raise_keep_resolve_over_three_administrations() -> None:
    # 1: suicidality trigger high -> urgent suicide-risk.
    first = _run([_suicide(5.0), ScaleState("sad", 4.0, 4.0, None)])
    assert _keys(first.raise_) == [("suicide-risk", SUICIDE.code)]
    active = list(first.raise_)

    # 2: still high (kept, not raised again); sad reliably worse -> deterioration raised.
    second = _run([_suicide(6.0), ScaleState("sad", 6.5, 6.0, "reliably-deteriorated")], active)
    assert _keys(second.keep) == [("suicide-risk", SUICIDE.code)]
    assert second.keep[0] is active[0]  # the active instance, not a duplicate
    assert _keys(second.raise_) == [("deterioration", "sad")]
    assert second.resolve == ()
    active = [*second.keep, *second.raise_]

    # Re-scoring the same administration changes nothing.
    again = _run([_suicide(6.0), ScaleState("sad", 6.5, 6.0, "reliably-deteriorated")], active)
    assert again.raise_ == () and again.resolve == () and list(again.keep) == active

    # 3: both conditions cleared -> both resolved, nothing new.
    third = _run([_suicide(2.0), ScaleState("sad", 6.0, 6.0, "no-reliable-change")], active)
    assert third.raise_ == () and third.keep == ()
    assert sorted(_keys(third.resolve), key=str) == sorted(_keys(tuple(active)), key=str)


def test_alliance_rupture_resolves_when_restored() -> None:
    low = AllianceState(total_mean=4.0, total_percent=57.1, change_vs_previous="reliably-deteriorated")
    active = list(_run([], alliance=low).raise_)
    still_low = AllianceState(total_mean=4.25, total_percent=60.7, change_vs_previous="no-reliable-change")
    kept = _run([], active, alliance=still_low)
    assert kept.keep == tuple(active) and kept.raise_ == ()
    restored = AllianceState(total_mean=6.0, total_percent=85.7, change_vs_previous="reliably-improved")
    assert _run([], active, alliance=restored).resolve == tuple(active)


def test_prefer_not_resolves_when_answered() -> None:
    active = list(_run([_suicide(1.0)], prefer_not=frozenset({SUICIDE.items[0]})).raise_)
    d = _run([_suicide(1.0)], active)
    assert d.resolve == tuple(active) and d.raise_ == ()


def test_missing_data_keeps_alerts_active() -> None:
    active = [
        Alert("suicide-risk", SUICIDE.code, True, "earlier"),
        Alert("deterioration", "sad", False, "earlier"),
        Alert("alliance-rupture", None, False, "earlier"),
    ]
    # Nothing about these scales or the alliance was measured this time: no evidence they cleared.
    d = _run([ScaleState(SUICIDE.code, None, None, None), ScaleState("sad", None, None, None)], active, None)
    assert d.keep == tuple(active) and d.resolve == () and d.raise_ == ()
    d = _run([], active, AllianceState(None, None, None))
    assert d.keep == tuple(active)


def test_duplicate_active_alerts_are_resolved() -> None:
    one = Alert("deterioration", "sad", False, "first")
    two = Alert("deterioration", "sad", False, "second")
    d = _run([ScaleState("sad", 6.5, 6.0, "reliably-deteriorated")], [one, two])
    assert d.keep == (one,) and d.resolve == (two,) and d.raise_ == ()
