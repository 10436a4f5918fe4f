"""One administration from response to resources (pure): score, compare with the history, decide alerts.

Input: a QuestionnaireResponse (JSON), the :class:`~fhir_norse.instruments.registry.Instrument` that
scores its Questionnaire, the patient's earlier administrations of that instrument (oldest first) and
the alerts active for the patient. Output: a :class:`ScoredAdministration` with the Observations, panel
and DiagnosticReport (:mod:`fhir_norse.scoring.resources`), the change statistics and the alert
decision. The server (``fhir_norse.rom.intake``) stores the result; ``$extract`` and
``fhir-norse score`` show it without storing.

Change is computed per scale over the series *earlier administrations + this one* with the mapping's SD,
reliability, critical value and stagnation window, from the scores at the instrument's precision, the ones
stored and read back as the history (:mod:`fhir_norse.scoring.precision`); the alliance uses
``alliance.change`` of the mapping (no change is computed without it). Sum-score instruments (PHQ-9,
GAD-7) get totals, bands and their mapping's item alerts, but no change statistics (their mappings carry
no norms or reliability).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from fhir_norse.adaptive.state import Measured, ScaleState, scale_states
from fhir_norse.alerts.rules import (
    Alert,
    AlertCode,
    AlertDecision,
    AlertRules,
    AllianceState,
    RecoveryState,
    evaluate_alerts,
)
from fhir_norse.alerts.rules import (
    ScaleState as AlertScaleState,
)
from fhir_norse.instruments.registry import Instrument
from fhir_norse.instruments.schema import InstrumentMapping, SumScoreMapping
from fhir_norse.scoring.change import ScaleChange, scale_change, scale_change_for
from fhir_norse.scoring.engine import Nf21Scores, answers_from_response, score_nf21
from fhir_norse.scoring.recovery import RecoveryCheck, check, model_of
from fhir_norse.scoring.resources import AdministrationResources, build_administration
from fhir_norse.scoring.sums import SumScore, score_sum, submitted_total

__all__ = ["PriorAdministration", "ScoredAdministration", "score_administration"]


@dataclass(frozen=True)
class PriorAdministration:
    """The scores of one earlier administration of the same instrument."""

    response: str  # "QuestionnaireResponse/<id>"
    authored: str
    scales: Mapping[str, float] = field(default_factory=dict)  # scale code -> score (scored ones only)
    alliance: Mapping[str, float] = field(default_factory=dict)  # dimension or total code -> mean
    # scale code -> trigger and full score (adaptive instruments), for the closing rule
    measured: Mapping[str, Measured] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoredAdministration:
    """What scoring one response yields (nothing stored yet)."""

    instrument: Instrument
    scores: Nf21Scores | None
    sums: tuple[SumScore, ...]
    changes: Mapping[str, ScaleChange]
    alliance_changes: Mapping[str, ScaleChange]
    resources: AdministrationResources
    alerts: AlertDecision
    warnings: tuple[str, ...]
    # Scale code (and ``alliance:<total>``) -> the score against its expected-recovery band, where the
    # mapping switches the not-on-track signal on (issue 19).
    recovery: Mapping[str, RecoveryCheck] = field(default_factory=dict)


def _recovery_checks(
    mapping: InstrumentMapping, scores: Nf21Scores, history: Sequence[PriorAdministration]
) -> dict[str, RecoveryCheck]:
    """The current administration against each expected-recovery curve whose signal is switched on;
    the series is the episode's administrations so far (intake first), as the curve was fitted on."""
    out: dict[str, RecoveryCheck] = {}
    for scale in mapping.scales:
        if not scale.not_on_track_signal or scale.expected_recovery is None:
            continue
        current = scores.scales.get(scale.code)
        series = [p.scales.get(scale.code) for p in history] + [None if current is None else current.score]
        found = check(model_of(scale.expected_recovery), series)
        if found is not None:
            out[scale.code] = found
    alliance = mapping.alliance
    if alliance.not_on_track_signal and alliance.expected_recovery is not None:
        series = [p.alliance.get(alliance.total) for p in history] + [scores.alliance.total.mean]
        found = check(model_of(alliance.expected_recovery), series)
        if found is not None:
            out[f"alliance:{alliance.total}"] = found
    return out


def _recovery_state(name: str, found: RecoveryCheck | None, higher_is_worse: bool) -> RecoveryState | None:
    if found is None:
        return None
    side = "above" if higher_is_worse else "below"
    detail = (
        f"{name}: {side} the expected-recovery band ({found.low:.2f}-{found.high:.2f} at administration "
        f"{found.k}, intake {found.intake:g}) at two administrations in a row"
    )
    return RecoveryState(found.outside, found.outside_previous, detail)


def _alliance_changes(
    mapping: InstrumentMapping, scores: Nf21Scores, history: Sequence[PriorAdministration]
) -> dict[str, ScaleChange]:
    basis = mapping.alliance.change
    if basis is None:
        return {}
    out: dict[str, ScaleChange] = {}
    for a in [*scores.alliance.dimensions.values(), scores.alliance.total]:
        series = [p.alliance.get(a.code) for p in history] + [a.mean]
        out[a.code] = scale_change(
            a.code,
            series,
            sd=basis.sd,
            r=basis.reliability.value,
            # The alliance has no elevated range: no score reaches an infinite cut-off.
            cutoff=math.inf,
            critical=mapping.change.critical,
            higher_is_worse=False,
            stagnation_window=mapping.change.stagnation_window,
        )
    return out


def _closing_states(
    mapping: InstrumentMapping, scores: Nf21Scores, history: Sequence[PriorAdministration]
) -> dict[str, ScaleState]:
    """Where the closing rule leaves each scale after this administration (the rules alone, without a
    clinician's override), from the earlier administrations' triggers and full scores and this one's."""
    now = {
        code: Measured(s.trigger_problem_score, None if s.trigger_only else s.score)
        for code, s in scores.scales.items()
        if s.score is not None  # as the history reads it back: only scored scales have an Observation
    }
    return scale_states(mapping, [*(p.measured for p in history), now])


def _nf21_alerts(
    mapping: InstrumentMapping,
    scores: Nf21Scores,
    answers: Mapping[str, str],
    changes: Mapping[str, ScaleChange],
    alliance_changes: Mapping[str, ScaleChange],
    active: Sequence[Alert],
    recovery: Mapping[str, RecoveryCheck] | None = None,
) -> AlertDecision:
    if mapping.alerts is None:
        return AlertDecision((), tuple(active), ())
    rules = AlertRules.from_mapping(
        mapping,
        suicide_scale=mapping.alerts.suicide_scale,
        alliance_floor_percent=mapping.alerts.alliance_floor_percent,
        prefer_not_urgent=mapping.alerts.prefer_not_urgent,
    )
    recovery = recovery or {}
    states = [
        AlertScaleState(
            scale=code,
            score=s.score,
            trigger_score=s.trigger_problem_score,
            change_vs_previous=changes[code].change_previous if code in changes else None,
            recovery=_recovery_state(mapping.scale(code).name.en, recovery.get(code), True),
        )
        for code, s in scores.scales.items()
    ]
    total = scores.alliance.total
    total_change = alliance_changes.get(total.code)
    total_key = f"alliance:{mapping.alliance.total}"
    alliance = AllianceState(
        total_mean=total.mean,
        total_percent=total.percent,
        change_vs_previous=None if total_change is None else total_change.change_previous,
        recovery=_recovery_state("alliance total", recovery.get(total_key), False),
        total_code=mapping.alliance.total,
    )
    prefer_not = [
        link_id for link_id, code in answers.items() if code == mapping.answer_handling.prefer_not.code
    ]
    return evaluate_alerts(states, alliance, prefer_not, active, rules)


def _sum_alerts(mapping: SumScoreMapping, score: SumScore, active: Sequence[Alert]) -> AlertDecision:
    """Item alerts of a sum-score instrument (PHQ-9 item 9); one alert identity per flag code, keyed
    by the instrument. Evaluated only when the alert's item was answered."""
    holding = {a.flag: a for a in score.alerts}
    evaluated = {
        str(rule.get("flag")) for rule in mapping.alerts if str(rule.get("item")) in score.item_scores
    }
    raise_: list[Alert] = []
    keep: list[Alert] = []
    resolve: list[Alert] = []
    seen: set[str] = set()
    for alert in active:
        code = str(alert.code)
        if alert.scale != mapping.instrument:
            keep.append(alert)
        elif code in seen or (code in evaluated and code not in holding):
            resolve.append(alert)
        else:
            keep.append(alert)
        if alert.scale == mapping.instrument:
            seen.add(code)
    for code, fired in holding.items():
        if code not in seen:
            raise_.append(Alert(cast(AlertCode, fired.flag), mapping.instrument, True, fired.display))
    return AlertDecision(tuple(raise_), tuple(keep), tuple(resolve))


_ALERT_NAMES = {
    "suicide-risk": "suicide risk",
    "deterioration": "reliable deterioration since last time",
    "alliance-rupture": "alliance rupture",
    "prefer-not-suicide": "suicidality items not answered",
    "not-on-track": "not on track (a worse course than expected for the starting point)",
}


def _conclude_alerts(resources: AdministrationResources, decision: AlertDecision) -> None:
    """Lead the report's conclusion with the alerts that hold after this administration."""
    holding = [*decision.raise_, *decision.keep]
    if not holding:
        return
    urgent = [a for a in holding if a.urgent]
    text = "; ".join(
        f"{_ALERT_NAMES.get(a.code, a.code)} ({a.reason})"
        for a in [*urgent, *(a for a in holding if not a.urgent)]
    )
    lead = "URGENT alert" if urgent else "Alert"
    plural = "s" if len(holding) > 1 else ""
    report = resources.report
    report["conclusion"] = f"{lead}{plural}: {text}. {report.get('conclusion', '')}".strip()


def score_administration(
    response: Mapping[str, Any],
    instrument: Instrument,
    *,
    response_ref: str,
    patient_ref: str,
    history: Sequence[PriorAdministration] = (),
    active_alerts: Sequence[Alert] = (),
    id_for: Callable[[str], str],
    issued: str | None = None,
    authored: str | None = None,
) -> ScoredAdministration:
    """Score ``response`` (``completed`` or ``amended``) against ``history`` (oldest first).

    ``response_ref`` is the versioned reference the Observations derive from; ``id_for`` gives the id
    of each built resource from its key (``scale:<code>``, ``panel``, ``report`` ...), so that scoring
    the same response again addresses the same resources. ``authored`` is when the answers were given
    (default the response's own ``authored``; the server dates a response without one). Raises
    :class:`ValueError` when nothing in the response can be scored.
    """
    answers = answers_from_response(response)
    authored = authored or str(response.get("authored", ""))
    mapping = instrument.mapping
    if isinstance(mapping, InstrumentMapping):
        scores = score_nf21(answers, mapping)
        changes = {
            code: scale_change_for(
                mapping.scale(code),
                [p.scales.get(code) for p in history] + [s.score],
                critical=mapping.change.critical,
                stagnation_window=mapping.change.stagnation_window,
            )
            for code, s in scores.scales.items()
        }
        alliance_changes = _alliance_changes(mapping, scores, history)
        recovery = _recovery_checks(mapping, scores, history)
        resources = build_administration(
            closing=_closing_states(mapping, scores, history),
            response_ref=response_ref,
            patient_ref=patient_ref,
            authored=authored,
            scores=scores,
            changes=changes,
            alliance_changes=alliance_changes,
            id_for=id_for,
            mapping=mapping,
            issued=issued,
            terminology=instrument.terminology,
            recovery=recovery,
        )
        decision = _nf21_alerts(mapping, scores, answers, changes, alliance_changes, active_alerts, recovery)
        _conclude_alerts(resources, decision)
        return ScoredAdministration(
            instrument, scores, (), changes, alliance_changes, resources, decision, scores.warnings, recovery
        )
    score = score_sum(answers, mapping, submitted_total(response, mapping))
    resources = build_administration(
        response_ref=response_ref,
        patient_ref=patient_ref,
        authored=authored,
        scores=None,
        sums=[score],
        id_for=id_for,
        sum_mappings={mapping.instrument: mapping},
        issued=issued,
        terminology=instrument.terminology,
    )
    decision = _sum_alerts(mapping, score, active_alerts)
    _conclude_alerts(resources, decision)
    return ScoredAdministration(instrument, None, (score,), {}, {}, resources, decision, score.warnings)
