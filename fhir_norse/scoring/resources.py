"""Computed scores of one administration -> FHIR R4 resource dicts (pure: no database, no HTTP).

Builds, per the profiles in ``profiles/``:

* one ``rom-scale-score`` Observation per scored clinical scale (score, z, T, items answered, trigger
  score; with a :class:`~fhir_norse.scoring.change.ScaleChange` also RC against the first and the
  previous administration and the RTI, and the change interpretations);
* one ``rom-alliance`` Observation per scored alliance dimension and the total;
* one ``rom-preference`` Observation per answered therapy-preference item;
* one ``rom-scale-score`` Observation per complete sum score (PHQ-9, GAD-7) with its LOINC total code;
* one ``rom-panel`` Observation whose ``hasMember`` lists all of the above;
* one ``rom-report`` DiagnosticReport whose ``result`` lists the panel and all of the above, with a short
  English ``conclusion``.

Ids come from ``id_factory`` (UUIDs, so each resource also has a ``urn:uuid:`` fullUrl); references
between the built resources are ``Observation/<id>``, which stay valid when the caller writes them in one
transaction with ``PUT Observation/<id>`` (:meth:`AdministrationResources.transaction_entries`).

Decisions:

* Values are the engine's: scores at the precision the instrument reports (the mapping's ``decimals``,
  :mod:`fhir_norse.scoring.precision`), statistics (z, T, percent of the maximum, reliable change, RTI)
  unrounded; rounding them is presentation (the conclusion rounds scores to 1 decimal).
* "Elevated" comes from the ScaleChange when given (its cut-off), else from the mapping's
  :func:`~fhir_norse.scoring.change.elevated_cutoff` when a mapping is given, else it is not claimed.
  With a mapping each scale Observation carries two ``referenceRange`` entries: the possible scores, and
  the elevated range (``type`` ``rom-interpretation#elevated-range``, ``low`` = the scale's
  ``elevated_from``, by default its closing threshold): a score at or above ``low`` is ``elevated``.
* The closing rule (with ``closing``, the state the rules leave each scale in after this administration,
  :func:`fhir_norse.adaptive.state.scale_states`): interpretation ``trigger-only`` says the scale was
  closed here and asked by its trigger alone (without it, it was asked in full); ``closed`` says the rule
  leaves the scale closed after this administration (only its trigger is asked next time); component
  ``mean-last3`` is the moving average the rule compares with the closing threshold, the mean of the last
  ``close_window`` full scores, written once the scale has that many.
* A single item answered with a non-numeric answer the mapping scores as a number (2.2.0: "not relevant"
  = 1, the lowest, in the problem direction) is written as that score read in the item's own wording
  (``min + max - score`` for an item worded as a resource), so ``value`` always reads as the wording.
* Change interpretations carry a ``text`` naming the baseline ("since the first administration" /
  "since the previous administration"), so the two classifications can both be recorded.
* Expected recovery (issue 19, where the mapping switches the not-on-track signal on and the score can
  be judged: an intake and a later administration): a ``referenceRange`` of type
  ``rom-interpretation#expected-range`` (the tolerance band around the expected score for this
  administration and intake) and, when the score is outside it at this administration and the previous
  scored one, the interpretation ``not-on-track``.
* Codes and displays of scales and alliance dimensions come from the mapping when given (``name.nb``
  is the CodeSystem display, ``name.en`` the text); without it only the code is written.

See https://hl7.org/fhir/R4/observation.html, https://hl7.org/fhir/R4/diagnosticreport.html and
https://hl7.org/fhir/R4/http.html#trules (references inside a transaction).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fhir_norse.adaptive.state import ScaleState
from fhir_norse.canonicals import (
    CS_ALLIANCE,
    CS_COMPONENTS,
    CS_INTERPRETATION,
    CS_ITEMS,
    CS_PREFERENCE,
    CS_ROM,
    CS_SCALES,
    LOINC,
    OBSERVATION_CATEGORY,
    PROFILE_ALLIANCE,
    PROFILE_PANEL,
    PROFILE_PREFERENCE,
    PROFILE_REPORT,
    PROFILE_SCALE_SCORE,
    UCUM,
)
from fhir_norse.instruments.schema import InstrumentMapping, SumScoreMapping
from fhir_norse.instruments.terminology import Terminology
from fhir_norse.scoring.change import ScaleChange, elevated_cutoff
from fhir_norse.scoring.engine import AllianceScore, Nf21Scores, ScaleScore, SingleItemScore
from fhir_norse.scoring.precision import at_precision
from fhir_norse.scoring.recovery import RecoveryCheck
from fhir_norse.scoring.sums import SumScore

# LOINC is re-exported for fhir_norse.rom.intake, which imports it from here (canonicals is its home).
__all__ = ["LOINC", "AdministrationResources", "build_administration"]

Resource = dict[str, Any]

_CHANGE_CODES = {
    "reliably-improved": ("reliable-improvement", "Reliable improvement"),
    "reliably-deteriorated": ("reliable-deterioration", "Reliable deterioration"),
    "no-reliable-change": ("no-reliable-change", "No reliable change"),
}


@dataclass(frozen=True)
class AdministrationResources:
    """Everything scoring writes for one administration (resource dicts, each with an ``id``)."""

    scale_scores: tuple[Resource, ...]
    alliance: tuple[Resource, ...]
    preferences: tuple[Resource, ...]
    sum_scores: tuple[Resource, ...]
    panel: Resource
    report: Resource
    single_items: tuple[Resource, ...] = ()

    @property
    def members(self) -> tuple[Resource, ...]:
        """The Observations the panel groups (everything but the panel and the report)."""
        return self.scale_scores + self.alliance + self.preferences + self.single_items + self.sum_scores

    def resources(self) -> list[Resource]:
        """Members, then the panel, then the report."""
        return [*self.members, self.panel, self.report]

    def transaction_entries(self) -> list[dict[str, Any]]:
        """Bundle entries (``urn:uuid:`` fullUrl, ``PUT Type/id``) for one transaction."""
        return [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in self.resources()
        ]


def _no_factory() -> str:
    raise AssertionError("ids come from id_for")


# --- small builders -------------------------------------------------------------------------------


def _quantity(value: float, code: str, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


def _score(value: float) -> dict[str, Any]:
    return _quantity(value, "{score}", "score")


def _component(code: str, value: dict[str, Any], display: str) -> dict[str, Any]:
    return {"code": {"coding": [{"system": CS_COMPONENTS, "code": code}], "text": display}, **value}


def _ratio_component(code: str, value: float, display: str) -> dict[str, Any]:
    return _component(code, {"valueQuantity": _quantity(value, "1", "1")}, display)


def _interpretation(code: str, text: str) -> dict[str, Any]:
    return {"coding": [{"system": CS_INTERPRETATION, "code": code}], "text": text}


def _fmt(value: float) -> str:
    return f"{value:.1f}"


@dataclass(frozen=True)
class _Context:
    patient_ref: str
    response_ref: str
    authored: str
    id_factory: Callable[[], str]
    id_for: Callable[[str], str] | None = None

    def id(self, key: str) -> str:
        return self.id_for(key) if self.id_for is not None else self.id_factory()

    def observation(self, profile: str, code: dict[str, Any], key: str) -> Resource:
        return {
            "resourceType": "Observation",
            "id": self.id(key),
            "meta": {"profile": [profile]},
            "status": "final",
            "category": [
                {"coding": [{"system": OBSERVATION_CATEGORY, "code": "survey", "display": "Survey"}]}
            ],
            "code": code,
            "subject": {"reference": self.patient_ref},
            "effectiveDateTime": self.authored,
            "performer": [{"reference": self.patient_ref}],
            "derivedFrom": [{"reference": self.response_ref}],
        }


def _ref(resource: Resource) -> dict[str, str]:
    return {"reference": f"{resource['resourceType']}/{resource['id']}"}


# --- scales ---------------------------------------------------------------------------------------


def _scale_name(code: str, mapping: InstrumentMapping | None) -> str:
    if mapping is None:
        return code
    try:
        return mapping.scale(code).name.en
    except KeyError:
        return code


def _scale_code(code: str, mapping: InstrumentMapping | None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": CS_SCALES, "code": code}
    out: dict[str, Any] = {"coding": [coding]}
    if mapping is not None:
        try:
            name = mapping.scale(code).name
        except KeyError:
            return out
        coding["display"] = name.nb
        out["text"] = name.en
    return out


def _elevated(
    score: ScaleScore, change: ScaleChange | None, mapping: InstrumentMapping | None
) -> bool | None:
    if change is not None and change.score is not None:
        return change.elevated
    if mapping is None or score.score is None:
        return None
    try:
        return score.score >= elevated_cutoff(mapping.scale(score.scale))
    except KeyError:
        return None


def _change_parts(change: ScaleChange) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    components: list[dict[str, Any]] = []
    interpretations: list[dict[str, Any]] = []
    if change.rc_first is not None:
        components.append(_ratio_component("rc-first", change.rc_first, "Reliable change since the first"))
    if change.rc_previous is not None:
        components.append(
            _ratio_component("rc-previous", change.rc_previous, "Reliable change since the previous")
        )
    if change.rti is not None:
        components.append(_ratio_component("rti", change.rti, "Reliable Trend Index"))
    for cls, since in ((change.change_first, "first"), (change.change_previous, "previous")):
        if cls is not None:
            code, text = _CHANGE_CODES[cls]
            interpretations.append(_interpretation(code, f"{text} since the {since} administration"))
    if change.stagnation:
        interpretations.append(_interpretation("stagnation", "Stagnation: elevated without reliable change"))
    return components, interpretations


def _scale_observation(
    ctx: _Context,
    score: ScaleScore,
    change: ScaleChange | None,
    mapping: InstrumentMapping | None,
    elevated: bool | None,
    closing: ScaleState | None = None,
    recovery: RecoveryCheck | None = None,
) -> Resource | None:
    if score.score is None:
        return None
    obs = ctx.observation(PROFILE_SCALE_SCORE, _scale_code(score.scale, mapping), f"scale:{score.scale}")
    obs["valueQuantity"] = _score(score.score)
    interpretations: list[dict[str, Any]] = []
    if elevated is True:
        interpretations.append(_interpretation("elevated", "Elevated"))
    elif elevated is False:
        interpretations.append(_interpretation("within-range", "Within range"))
    if score.trigger_only:
        interpretations.append(
            _interpretation("trigger-only", "Closed: scored from the trigger item only (not asked in full)")
        )
    if closing is not None and not closing.open:
        interpretations.append(
            _interpretation("closed", "Closed after this administration: only its trigger is asked next time")
        )
    components: list[dict[str, Any]] = []
    if score.z is not None:
        components.append(_ratio_component("z-score", score.z, "z-score"))
    if score.t is not None:
        components.append(_ratio_component("t-score", score.t, "T-score"))
    components.append(_component("items-answered", {"valueInteger": score.items_answered}, "Items answered"))
    if score.trigger_problem_score is not None:
        components.append(
            _component(
                "trigger-score", {"valueQuantity": _score(score.trigger_problem_score)}, "Trigger score"
            )
        )
    moving = _moving_average(closing, mapping)
    if moving is not None:
        components.append(
            _component(
                "mean-last3",
                {"valueQuantity": _score(moving)},
                "Moving average of the last full scale scores (closing rule)",
            )
        )
    if change is not None and change.score is not None:
        change_components, change_interpretations = _change_parts(change)
        components += change_components
        interpretations += change_interpretations
    interpretations += _not_on_track(recovery)
    if interpretations:
        obs["interpretation"] = interpretations
    obs["referenceRange"] = [
        _score_range(mapping),
        *_elevated_range(score.scale, change, mapping),
        *_expected_range(recovery),
    ]
    obs["component"] = components
    return obs


def _not_on_track(recovery: RecoveryCheck | None) -> list[dict[str, Any]]:
    if recovery is None or not recovery.not_on_track:
        return []
    return [
        _interpretation(
            "not-on-track",
            "Not on track: outside the expected-recovery band at this and the previous administration",
        )
    ]


def _expected_range(recovery: RecoveryCheck | None) -> list[dict[str, Any]]:
    """The expected-recovery band at this administration (module doc), when the signal judged it."""
    if recovery is None:
        return []
    return [
        {
            "low": _score(round(recovery.low, 2)),
            "high": _score(round(recovery.high, 2)),
            "type": {
                "coding": [
                    {"system": CS_INTERPRETATION, "code": "expected-range", "display": "Forventet område"}
                ],
                "text": "Expected-recovery range",
            },
            "text": (
                f"Expected-recovery range at administration {recovery.k} for an intake of "
                f"{recovery.intake:g}: {recovery.low:.2f}-{recovery.high:.2f} "
                f"(expected {recovery.expected:.2f})"
            ),
        }
    ]


def _moving_average(closing: ScaleState | None, mapping: InstrumentMapping | None) -> float | None:
    """The mean of the last ``close_window`` full scores once the scale has that many (the rule's
    moving average), at the instrument's precision."""
    if closing is None or mapping is None or closing.mean_last is None:
        return None
    try:
        window = mapping.scale(closing.scale).close_window
    except KeyError:
        return None
    if len(closing.full_scores) < window:
        return None
    return at_precision(closing.mean_last, mapping.decimals)


def _elevated_range(
    code: str, change: ScaleChange | None, mapping: InstrumentMapping | None
) -> list[dict[str, Any]]:
    """The scale's elevated range (module doc) as a typed referenceRange; none without a mapping."""
    if mapping is None:
        return []
    try:
        low = elevated_cutoff(mapping.scale(code))
    except KeyError:
        return []
    if change is not None and change.score is not None:
        low = change.cutoff
    high = mapping.answer_handling.max
    return [
        {
            "low": _score(low),
            "high": _score(high),
            "type": {
                "coding": [
                    {"system": CS_INTERPRETATION, "code": "elevated-range", "display": "Forhøyet område"}
                ],
                "text": "Elevated range",
            },
            "text": f"Elevated range: {low:g}-{high:g} (a score at or above {low:g} is elevated)",
        }
    ]


def _score_range(mapping: InstrumentMapping | None) -> dict[str, Any]:
    low, high = (1, 7) if mapping is None else (mapping.answer_handling.min, mapping.answer_handling.max)
    return {"low": _score(low), "high": _score(high), "text": f"Possible scores {low}-{high}"}


# --- alliance and preferences ---------------------------------------------------------------------


def _alliance_observation(
    ctx: _Context,
    score: AllianceScore,
    change: ScaleChange | None,
    mapping: InstrumentMapping | None,
    recovery: RecoveryCheck | None = None,
) -> Resource | None:
    if score.mean is None:
        return None
    coding: dict[str, Any] = {"system": CS_ALLIANCE, "code": score.code}
    code: dict[str, Any] = {"coding": [coding]}
    if mapping is not None:
        for dim in mapping.alliance.dimensions:
            if dim.code == score.code:
                coding["display"] = dim.name.nb
                code["text"] = f"Alliance: {dim.name.en}"
        if score.code == mapping.alliance.total:
            code["text"] = "Alliance: total"
    obs = ctx.observation(PROFILE_ALLIANCE, code, f"alliance:{score.code}")
    obs["valueQuantity"] = _score(score.mean)
    components: list[dict[str, Any]] = []
    if score.percent is not None:
        components.append(
            _component(
                "percent-of-max", {"valueQuantity": _quantity(score.percent, "%", "%")}, "Percent of maximum"
            )
        )
    components.append(_component("items-answered", {"valueInteger": score.items_answered}, "Items answered"))
    if change is not None and change.score is not None:
        change_components, change_interpretations = _change_parts(change)
        components += [c for c in change_components if c["code"]["coding"][0]["code"] != "rti"]
        if change_interpretations:
            obs["interpretation"] = change_interpretations
    if recovery is not None:
        if flagged := _not_on_track(recovery):
            obs["interpretation"] = [*obs.get("interpretation", []), *flagged]
        obs["referenceRange"] = _expected_range(recovery)
    obs["component"] = components
    return obs


def _preference_observation(ctx: _Context, link_id: str, value: str | None) -> Resource | None:
    if value is None:
        return None
    obs = ctx.observation(
        PROFILE_PREFERENCE, {"coding": [{"system": CS_ITEMS, "code": link_id}]}, f"preference:{link_id}"
    )
    obs["valueCodeableConcept"] = {"coding": [{"system": CS_PREFERENCE, "code": value}]}
    return obs


def _single_item_observation(
    ctx: _Context, item: SingleItemScore, mapping: InstrumentMapping | None = None
) -> Resource | None:
    """A single or medication item: the answer as given (1-7); the problem-direction score, which
    differs for items worded as a resource, is the ``scale-score`` component. A non-numeric answer scored
    as a number (``raw`` None) is written in the item's wording direction (module doc)."""
    if item.raw is None and item.problem_score is None:
        return None
    low, high = (1, 7) if mapping is None else (mapping.answer_handling.min, mapping.answer_handling.max)
    obs = ctx.observation(
        PROFILE_SCALE_SCORE,
        {"coding": [{"system": CS_ITEMS, "code": item.link_id}]},
        f"item:{item.link_id}",
    )
    value = item.raw
    if value is None:
        assert item.problem_score is not None
        value = low + high - item.problem_score if item.direction == "resource" else item.problem_score
    obs["valueQuantity"] = _score(value)
    components = [_component("items-answered", {"valueInteger": 1}, "Items answered")]
    if item.problem_score is not None:
        components.append(
            _component(
                "scale-score",
                {"valueQuantity": _score(item.problem_score)},
                "Score in the problem direction (higher = more problems)",
            )
        )
    obs["component"] = components
    return obs


# --- sum scores -----------------------------------------------------------------------------------


def _sum_code(mapping: SumScoreMapping) -> dict[str, Any]:
    code = mapping.total.code
    if isinstance(code, str):
        return {"coding": [{"system": LOINC, "code": code}]}
    coding = {k: str(code[k]) for k in ("system", "code", "display") if k in code}
    return {"coding": [coding], "text": coding.get("display", coding["code"])}


def _sum_observation(ctx: _Context, score: SumScore, mapping: SumScoreMapping) -> Resource | None:
    if score.total is None:
        return None
    obs = ctx.observation(PROFILE_SCALE_SCORE, _sum_code(mapping), f"sum:{score.instrument}")
    obs["valueQuantity"] = _score(score.total)
    if score.band_display is not None:
        obs["interpretation"] = [{"text": score.band_display}]
    obs["referenceRange"] = [
        {
            "low": _score(mapping.total.min),
            "high": _score(mapping.total.max),
            "text": f"Possible totals {mapping.total.min:g}-{mapping.total.max:g}",
        }
    ]
    obs["component"] = [
        _component("items-answered", {"valueInteger": score.items_answered}, "Items answered")
    ]
    return obs


# --- conclusion -----------------------------------------------------------------------------------


def _conclusion(
    scores: Nf21Scores | None,
    elevated: Mapping[str, bool | None],
    changes: Mapping[str, ScaleChange],
    sums: Sequence[SumScore],
    mapping: InstrumentMapping | None,
) -> tuple[str, list[str]]:
    parts: list[str] = []
    codes: list[str] = []
    if scores is not None:
        high = [
            f"{_scale_name(code, mapping)} ({_fmt(s.score)})"
            for code, s in scores.scales.items()
            if s.score is not None and elevated.get(code)
        ]
        parts.append(f"Elevated: {', '.join(high)}." if high else "No elevated scale.")
        if high:
            codes.append("elevated")
        for cls, label in (
            ("reliably-deteriorated", "Reliable deterioration since the first administration"),
            ("reliably-improved", "Reliable improvement since the first administration"),
        ):
            names = [
                _scale_name(code, mapping)
                for code in scores.scales
                if (c := changes.get(code)) is not None and c.score is not None and c.change_first == cls
            ]
            if names:
                parts.append(f"{label}: {', '.join(names)}.")
                codes.append(_CHANGE_CODES[cls][0])
        stagnating = [
            _scale_name(code, mapping)
            for code in scores.scales
            if (c := changes.get(code)) is not None and c.stagnation
        ]
        if stagnating:
            parts.append(f"Stagnation: {', '.join(stagnating)}.")
            codes.append("stagnation")
    for s in sums:
        if s.total is not None:
            band = f" ({s.band_display})" if s.band_display else ""
            parts.append(f"{s.instrument.upper()} total {s.total:g}{band}.")
    return " ".join(parts), codes


def _sum_panel(mapping: SumScoreMapping | None, terminology: Terminology | None) -> dict[str, Any] | None:
    """The panel coding of an administration of ``mapping``'s instrument alone (display from content)."""
    if mapping is None or mapping.panel is None:
        return None
    coding: dict[str, Any] = {"system": mapping.panel.system, "code": mapping.panel.code}
    display = None if terminology is None else terminology.display(mapping.panel.system, mapping.panel.code)
    if display is not None:
        coding["display"] = display
    return coding


# --- entry point ----------------------------------------------------------------------------------


def build_administration(
    *,
    response_ref: str,
    patient_ref: str,
    authored: str,
    scores: Nf21Scores | None,
    sums: Sequence[SumScore] = (),
    changes: Mapping[str, ScaleChange] | None = None,
    id_factory: Callable[[], str] | None = None,
    id_for: Callable[[str], str] | None = None,
    mapping: InstrumentMapping | None = None,
    sum_mappings: Mapping[str, SumScoreMapping] | None = None,
    alliance_changes: Mapping[str, ScaleChange] | None = None,
    issued: str | None = None,
    terminology: Terminology | None = None,
    closing: Mapping[str, ScaleState] | None = None,
    recovery: Mapping[str, RecoveryCheck] | None = None,
) -> AdministrationResources:
    """The Observations, panel and DiagnosticReport for one scored administration.

    ``response_ref`` must be a versioned reference (``QuestionnaireResponse/<id>/_history/<v>``).
    ``sum_mappings`` (keyed by ``SumScore.instrument``) supplies each total's LOINC code and range and
    is required for every complete sum score; an administration of one sum-score instrument alone
    takes its panel code from that mapping's ``panel``. ``terminology`` (the content's, as the
    registry loads it) gives the displays of such codes; without it they are written without one.
    ``issued`` (an instant) is the report's time of issue; it defaults to ``authored``. Raises
    :class:`ValueError` when nothing is scored.
    """
    if "/_history/" not in response_ref and not response_ref.startswith("urn:uuid:"):
        raise ValueError(f"response_ref must be a versioned reference (got {response_ref!r})")
    changes = changes or {}
    closing = closing or {}
    recovery = recovery or {}
    alliance_changes = alliance_changes or {}
    sum_mappings = sum_mappings or {}
    if id_factory is None and id_for is None:
        raise ValueError("give id_factory or id_for")
    ctx = _Context(patient_ref, response_ref, authored, id_factory or _no_factory, id_for)

    scale_obs: list[Resource] = []
    alliance_obs: list[Resource] = []
    preference_obs: list[Resource] = []
    single_obs: list[Resource] = []
    elevated: dict[str, bool | None] = {}
    if scores is not None:
        for code, score in scores.scales.items():
            change = changes.get(code)
            elevated[code] = _elevated(score, change, mapping)
            state = closing.get(code)
            judged = recovery.get(code)
            if (
                obs := _scale_observation(ctx, score, change, mapping, elevated[code], state, judged)
            ) is not None:
                scale_obs.append(obs)
        alliance_scores = [*scores.alliance.dimensions.values(), scores.alliance.total]
        total = scores.alliance.total.code
        for a in alliance_scores:
            judged = recovery.get(f"alliance:{a.code}") if a.code == total else None
            if (
                obs := _alliance_observation(ctx, a, alliance_changes.get(a.code), mapping, judged)
            ) is not None:
                alliance_obs.append(obs)
        for link_id, value in scores.preferences.items():
            if (obs := _preference_observation(ctx, link_id, value)) is not None:
                preference_obs.append(obs)
        for item in [*scores.single.values(), *scores.medication.values()]:
            if (obs := _single_item_observation(ctx, item, mapping)) is not None:
                single_obs.append(obs)

    sum_obs: list[Resource] = []
    for s in sums:
        if s.total is None:
            continue
        sum_mapping = sum_mappings.get(s.instrument)
        if sum_mapping is None:
            raise ValueError(f"no sum-score mapping given for instrument {s.instrument!r}")
        if (obs := _sum_observation(ctx, s, sum_mapping)) is not None:
            sum_obs.append(obs)

    members = [*scale_obs, *alliance_obs, *preference_obs, *single_obs, *sum_obs]
    if not members:
        raise ValueError("nothing was scored: no Observation to write")

    if scores is not None:
        panel_code: dict[str, Any] = {
            "coding": [
                {
                    "system": CS_ROM,
                    "code": "nf21-administration",
                    "display": "Norse Feedback 2.1 administration",
                }
            ],
        }
    else:
        complete = [s.instrument for s in sums if s.total is not None]
        panel_coding = _sum_panel(sum_mappings.get(complete[0]), terminology) if len(complete) == 1 else None
        if panel_coding is None:
            raise ValueError(f"no panel code for an administration of {', '.join(complete)}")
        panel_code = {"coding": [panel_coding]}
    panel = ctx.observation(PROFILE_PANEL, panel_code, "panel")
    panel["hasMember"] = [_ref(m) for m in members]

    conclusion, conclusion_codes = _conclusion(scores, elevated, changes, sums, mapping)
    report: Resource = {
        "resourceType": "DiagnosticReport",
        "id": ctx.id("report"),
        "meta": {"profile": [PROFILE_REPORT]},
        "status": "final",
        "category": [
            {"coding": [{"system": CS_ROM, "code": "rom", "display": "Routine outcome monitoring"}]}
        ],
        "code": {
            "coding": [
                {"system": CS_ROM, "code": "rom-feedback-report", "display": "Clinical feedback report"}
            ]
        },
        "subject": {"reference": patient_ref},
        "effectiveDateTime": authored,
        "issued": issued or authored,
        "result": [_ref(panel), *(_ref(m) for m in members)],
        "conclusion": conclusion,
    }
    if conclusion_codes:
        report["conclusionCode"] = [
            {"coding": [{"system": CS_INTERPRETATION, "code": c}]} for c in dict.fromkeys(conclusion_codes)
        ]
    return AdministrationResources(
        scale_scores=tuple(scale_obs),
        alliance=tuple(alliance_obs),
        preferences=tuple(preference_obs),
        sum_scores=tuple(sum_obs),
        panel=panel,
        report=report,
        single_items=tuple(single_obs),
    )
