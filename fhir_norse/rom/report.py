"""The clinician's feedback report (issue 17): one patient's record as of one administration, decided.

Everything the report page shows is read here, once, through the **caller's** repository, and turned
into plain frozen values (:class:`PatientReport`); the web layer (``fhir_norse/web/report/``) only words
and draws them. What is read (all of it written by scoring, :mod:`fhir_norse.scoring.resources`, and the
alert rules, :mod:`fhir_norse.rom.intake`):

* the administrations: the patient's ``rom-report`` DiagnosticReports (final, amended or corrected) of
  one multi-scale instrument, each tied to its QuestionnaireResponse through its Observations'
  ``derivedFrom``; numbered 1, 2, ... by ``authored`` within the episode of the administration shown
  (the series scoring computed change over, :mod:`fhir_norse.rom.patient`);
* per administration its Observations: scale scores (value, ``trigger-only``, ``elevated``, the change
  interpretations since the first and the previous administration, ``stagnation``, the RTI component and
  the ``elevated-range`` referenceRange; with the mapping's expected-recovery model, the expected course
  for the episode's intake score, :class:`ExpectedCurve`), alliance (mean, ``percent-of-max``, change
  since the previous), preferences (``preference-values``) and the single and medication items;
* the alert Flags (``rom-alert-flag``) in effect at the administration shown (``period.start`` at or
  before it, no ``period.end`` or one after it), with their review Task (``Task.focus``);
* the administration's response (context, episode, the item answers of the scales asked in full,
  "prefer not to answer" on suicidality) and, as a definition through :meth:`Repository.as_server`,
  the bokmål Questionnaire it was answered on (item and answer texts, with their English translations,
  https://hl7.org/fhir/R4/extension-translation.html).

The mapping (scales, domains, norms, alliance, preferences) is the registry's mapping of the
Questionnaire answered. Anything out of the caller's reach is the repository's :class:`NotFound` (a
patient the caller may not see is answered exactly as one that does not exist).

:func:`caseload` lists a practitioner's patients (the care teams and episodes that name them,
:meth:`fhir_norse.auth.policy.AccessPolicy.reachable`) with what needs attention first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from fhir_norse.adaptive.history import context_of, episode_of
from fhir_norse.auth.caller import Access
from fhir_norse.canonicals import (
    ALERT_KEY_SYSTEM,
    CS_ALERTS,
    CS_ALLIANCE,
    CS_COMPONENTS,
    CS_INTERPRETATION,
    CS_ITEMS,
    CS_PREFERENCE,
    CS_SCALES,
    PROFILE_FLAG,
    PROFILE_REPORT,
)
from fhir_norse.instruments.registry import InstrumentRegistry
from fhir_norse.instruments.schema import ExpectedRecovery, InstrumentMapping
from fhir_norse.outcomes import NotFound
from fhir_norse.rom.administrations import OPEN_STATUSES, parse_instant, task_window
from fhir_norse.rom.intake import QuestionnaireResponseIntake
from fhir_norse.scoring.recovery import model_of
from fhir_norse.server.repository import JsonDict, Repository, loads
from fhir_norse.server.resources import reference_id
from fhir_norse.server.search.typed import Where

__all__ = [
    "AlertLine",
    "AllianceBar",
    "AllianceReport",
    "CaseloadRow",
    "ChangeLine",
    "ChangeSummary",
    "DomainGroup",
    "ExpectedCurve",
    "Header",
    "ItemAnswer",
    "OpenScale",
    "PatientReport",
    "Point",
    "PreferenceLine",
    "SingleItemLine",
    "Text",
    "Trajectory",
    "assemble_report",
    "caseload",
]

_LIMIT = 100_000
_SCORED_REPORT = frozenset({"final", "amended", "corrected"})
_TRANSLATION = "http://hl7.org/fhir/StructureDefinition/translation"
_CHANGE = {"reliable-improvement": "improvement", "reliable-deterioration": "deterioration"}

Context = Literal["intake", "weekly", "termination"]
ChangeKind = Literal["improvement", "deterioration"]
Direction = Literal["more", "less", "as-now"]


# --- the report's values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    """A text in bokmål and English (the content's own wording: scale names, item texts, answers)."""

    nb: str
    en: str

    def get(self, lang: str) -> str:
        return self.en if lang == "en" else self.nb


@dataclass(frozen=True, slots=True)
class Header:
    """Who and which administration: ``number`` is 1-based within the episode, ``of`` the number of
    administrations in it so far (all of them, also later ones than the one shown)."""

    patient_id: str
    patient_name: str
    birth_date: date | None
    episode: str | None  # EpisodeOfCare/<id>
    number: int
    of: int
    authored: str
    date: date
    context: Context | None
    instrument: Text  # the mapping's title
    questionnaire: str  # canonical|version answered
    mapping_version: str
    report_id: str  # DiagnosticReport id
    response_id: str


@dataclass(frozen=True, slots=True)
class AlertLine:
    """A Flag in effect at the administration shown. ``kind`` is the rom-alerts code (suicide-risk,
    deterioration, alliance-rupture, prefer-not-suicide); ``status`` the Flag's status now (active, or
    inactive when it has cleared since); ``task_status``/``task_owner`` the review Task's, if any."""

    kind: str
    scale: str | None
    scale_name: Text | None
    since: date
    since_number: int | None
    status: str
    urgent: bool
    reason: str
    task_status: str | None
    task_owner: str | None
    flag_id: str


@dataclass(frozen=True, slots=True)
class AllianceBar:
    code: str  # task | goal | bond | total
    name: Text
    percent: float | None  # of the maximum, this administration
    previous: float | None  # the previous administration's
    mean: float | None


@dataclass(frozen=True, slots=True)
class AllianceReport:
    """Four bars (task, goal, bond, total); ``rupture`` when an alliance-rupture Flag is in effect at
    this administration, with the reasons the rule gave (``below_floor``, ``reliable_drop``)."""

    bars: tuple[AllianceBar, ...]
    previous_number: int | None
    floor_percent: float | None
    rupture: bool
    below_floor: bool
    reliable_drop: bool


@dataclass(frozen=True, slots=True)
class PreferenceLine:
    """One therapy-preference item: ``direction`` None when not answered at this administration;
    ``changed_at``/``changed_on`` the administration whose answer differs from the one before it
    (the first answer counts as a change), None when never answered."""

    link_id: str
    text: Text
    direction: Direction | None
    changed_at: int | None
    changed_on: date | None


@dataclass(frozen=True, slots=True)
class Point:
    number: int
    date: date
    score: float
    full: bool  # asked in full (False: trigger only, the scale was closed)
    elevated: bool
    change: ChangeKind | None  # reliable change since the previous administration


@dataclass(frozen=True, slots=True)
class ExpectedCurve:
    """The expected-recovery curve of a scale (issue 19) for this episode's intake score: ``points``
    are (administration number, expected score, band low, band high) from 2 on (at 1 the curve is the
    intake itself); the sample is the one the mapping's model was fitted on."""

    intake: float
    points: tuple[tuple[int, float, float, float], ...]
    n_patients: int
    n_episodes: int
    fitted: date
    percentiles: tuple[float, float]


@dataclass(frozen=True, slots=True)
class Trajectory:
    """One scale over the administrations up to the one shown."""

    code: str
    name: Text
    domain: str
    points: tuple[Point, ...]
    elevated_low: float
    elevated_high: float
    norm_mean: float
    scale_min: int
    scale_max: int
    stagnation: bool  # at the administration shown
    latest: float | None  # score at the administration shown (None: not scored there)
    change_first: ChangeKind | None
    change_previous: ChangeKind | None
    rti: float | None
    rti_reliable: ChangeKind | None
    expected: ExpectedCurve | None = None  # when the mapping has an expected-recovery model


@dataclass(frozen=True, slots=True)
class DomainGroup:
    code: str
    name: Text
    trajectories: tuple[Trajectory, ...]


@dataclass(frozen=True, slots=True)
class SingleItemLine:
    link_id: str
    kind: Literal["single", "medication"]
    text: Text
    value: float | None  # the answer as given (1-7), None when not answered
    direction: Literal["problem", "resource"]


@dataclass(frozen=True, slots=True)
class ItemAnswer:
    link_id: str
    text: Text
    answer: Text | None  # the answer option's display; None when not answered
    code: str | None
    reverse_keyed: bool


@dataclass(frozen=True, slots=True)
class OpenScale:
    code: str
    name: Text
    score: float | None
    items: tuple[ItemAnswer, ...]


@dataclass(frozen=True, slots=True)
class ChangeLine:
    code: str
    name: Text
    kind: ChangeKind
    index: float | None


@dataclass(frozen=True, slots=True)
class ChangeSummary:
    """Reliable changes since the first and the previous administration, the reliable trends (RTI)
    and the stagnating scales, at the administration shown."""

    since_first: tuple[ChangeLine, ...]
    since_previous: tuple[ChangeLine, ...]
    trends: tuple[ChangeLine, ...]
    stagnating: tuple[ChangeLine | Text, ...]
    elevated: tuple[Text, ...]
    critical: float


@dataclass(frozen=True, slots=True)
class PatientReport:
    header: Header
    alerts: tuple[AlertLine, ...]
    suicide_prefer_not: bool
    alliance: AllianceReport
    preferences: tuple[PreferenceLine, ...]
    domains: tuple[DomainGroup, ...]
    all_scales: bool
    hidden_scales: int  # scales left out (never asked in full) when not ``all_scales``
    single_items: tuple[SingleItemLine, ...]
    open_scales: tuple[OpenScale, ...]
    change: ChangeSummary
    administrations: tuple[tuple[int, str, date], ...]  # (number, DiagnosticReport id, date)


@dataclass(frozen=True, slots=True)
class CaseloadRow:
    patient_id: str
    name: str
    birth_date: date | None
    open_alerts: tuple[str, ...]  # rom-alerts codes of the active Flags
    stagnating: tuple[Text, ...]
    deteriorating: tuple[Text, ...]
    last_response: date | None
    open_tasks: int
    overdue_tasks: int


# --- reading FHIR ----------------------------------------------------------------------------------


def _codes(concept: Any, system: str) -> list[str]:
    if not isinstance(concept, Mapping):
        return []
    return [
        str(c["code"])
        for c in concept.get("coding") or []
        if c.get("system") == system and isinstance(c.get("code"), str)
    ]


def _code(concept: Any, system: str) -> str | None:
    found = _codes(concept, system)
    return found[0] if found else None


def _component(obs: Mapping[str, Any], code: str) -> float | None:
    for comp in obs.get("component") or []:
        if code in _codes(comp.get("code"), CS_COMPONENTS):
            value = (comp.get("valueQuantity") or {}).get("value")
            if isinstance(value, int | float):
                return float(value)
    return None


def _interpretations(obs: Mapping[str, Any]) -> dict[str, str]:
    """rom-interpretation code -> its text (the change codes keyed ``<code>/first|previous``)."""
    out: dict[str, str] = {}
    for concept in obs.get("interpretation") or []:
        text = str(concept.get("text") or "")
        for code in _codes(concept, CS_INTERPRETATION):
            if code in _CHANGE or code == "no-reliable-change":
                since = "first" if "since the first" in text else "previous"
                out[f"{code}/{since}"] = text
            else:
                out[code] = text
    return out


def _change(interp: Mapping[str, str], since: str) -> ChangeKind | None:
    for code, kind in _CHANGE.items():
        if f"{code}/{since}" in interp:
            return kind  # type: ignore[return-value]
    return None


def _value(obs: Mapping[str, Any]) -> float | None:
    value = (obs.get("valueQuantity") or {}).get("value")
    return float(value) if isinstance(value, int | float) else None


def _day(value: Any) -> date:
    moment = parse_instant(value)
    if isinstance(value, str) and len(value) >= 10:
        # The date as the patient wrote it (its own offset), not the UTC date.
        try:
            return date.fromisoformat(value[:10])
        except ValueError:
            pass
    if moment is None:
        raise ValueError(f"not a date: {value!r}")
    return moment.date()


def _sort_key(value: Any) -> datetime:
    """An instant to order by (an unreadable one first)."""
    moment = parse_instant(value)
    return moment if moment is not None else datetime.min.replace(tzinfo=UTC)


def _localized(element: Mapping[str, Any], key: str) -> Text:
    """``element[key]`` (bokmål) and its English translation extension (the same text without one)."""
    base = str(element.get(key) or "")
    english = base
    for ext in (element.get(f"_{key}") or {}).get("extension") or []:
        if ext.get("url") != _TRANSLATION:
            continue
        parts = {e.get("url"): e for e in ext.get("extension") or []}
        if (parts.get("lang") or {}).get("valueCode") == "en":
            english = str((parts.get("content") or {}).get("valueString") or base)
    return Text(base, english)


def _patient_name(body: Mapping[str, Any]) -> str:
    names = body.get("name") or []
    chosen = next((n for n in names if n.get("use") == "official"), names[0] if names else {})
    if chosen.get("text"):
        return str(chosen["text"])
    parts = [*(chosen.get("given") or []), chosen.get("family") or ""]
    return " ".join(str(p) for p in parts if p).strip()


def _birth_date(body: Mapping[str, Any]) -> date | None:
    try:
        return date.fromisoformat(str(body.get("birthDate")))
    except ValueError:
        return None


def _registry(repo: Repository) -> InstrumentRegistry:
    hook = repo.kernel.hooks.get("QuestionnaireResponse")
    if not isinstance(hook, QuestionnaireResponseIntake):
        raise RuntimeError("the server has no outcome-monitoring layer (no instrument registry)")
    return hook.registry


def _patient(repo: Repository, patient_id: str) -> JsonDict:
    stored = repo.get("Patient", patient_id)
    if stored is None:
        raise NotFound(f"Patient/{patient_id} is not known")
    return loads(stored.body_text)


def _find(repo: Repository, res_type: str, param: str, patient_id: str) -> list[JsonDict]:
    where = Where(res_type, references={param: f"Patient/{patient_id}"})
    return [loads(s.body_text) for s in repo.find(where, _LIMIT)]


# --- administrations -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Admin:
    report: JsonDict
    response_id: str
    authored: str
    observations: list[JsonDict]
    response: JsonDict | None = None
    number: int = 0

    @property
    def date(self) -> date:
        return _day(self.authored)

    def stamped(self) -> list[Mapping[str, Any]]:
        """Where the server wrote the administration's context and episode: on the derived resources
        (the response's own extensions when it had them, else what the server resolved), and the response."""
        return [self.report, *self.observations[:1], *([self.response] if self.response else [])]

    @property
    def episode(self) -> str | None:
        return next((e for r in self.stamped() if (e := episode_of(r)) is not None), None)

    @property
    def context(self) -> str | None:
        return next((c for r in self.stamped() if (c := context_of(r)) is not None), None)

    def scales(self) -> dict[str, JsonDict]:
        return {c: o for o in self.observations if (c := _code(o.get("code"), CS_SCALES)) is not None}

    def alliance(self) -> dict[str, JsonDict]:
        return {c: o for o in self.observations if (c := _code(o.get("code"), CS_ALLIANCE)) is not None}

    def items(self) -> dict[str, JsonDict]:
        return {c: o for o in self.observations if (c := _code(o.get("code"), CS_ITEMS)) is not None}


def _administrations(repo: Repository, patient_id: str, observations: Sequence[JsonDict]) -> list[_Admin]:
    """Every scored administration (a rom-report DiagnosticReport) of the patient, oldest first."""
    by_id = {str(o["id"]): o for o in observations}
    out: list[_Admin] = []
    for report in _find(repo, "DiagnosticReport", "subject", patient_id):
        if PROFILE_REPORT not in ((report.get("meta") or {}).get("profile") or []):
            continue
        if report.get("status") not in _SCORED_REPORT:
            continue
        members = [
            by_id[oid]
            for r in report.get("result") or []
            if (oid := reference_id(r.get("reference"), "Observation")) is not None and oid in by_id
        ]
        sources = {
            rid
            for o in members
            for d in o.get("derivedFrom") or []
            if (rid := reference_id(d.get("reference"), "QuestionnaireResponse")) is not None
        }
        if len(sources) != 1:
            continue
        out.append(_Admin(report, sources.pop(), str(report.get("effectiveDateTime")), [m for m in members]))
    out.sort(key=lambda a: (_sort_key(a.authored), a.response_id))
    return out


def _responses(repo: Repository, patient_id: str) -> dict[str, JsonDict]:
    return {str(r["id"]): r for r in _find(repo, "QuestionnaireResponse", "subject", patient_id)}


def _mapping_of(registry: InstrumentRegistry, response: Mapping[str, Any]) -> tuple[InstrumentMapping, str]:
    canonical = str(response.get("questionnaire") or "")
    url, _, version = canonical.partition("|")
    instrument = registry.for_questionnaire(url, version or None)
    if instrument is None or not isinstance(instrument.mapping, InstrumentMapping):
        raise NotFound("the administration was not answered on a multi-scale instrument this server scores")
    return instrument.mapping, canonical


# --- the Questionnaire's texts ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Form:
    items: Mapping[str, Text]
    answers: Mapping[str, Mapping[str, Text]]  # linkId -> code -> display


def _form(repo: Repository, registry: InstrumentRegistry, canonical: str) -> _Form:
    """Item and answer texts of the bokmål form behind ``canonical`` (a definition: read as the server)."""
    url, _, version = canonical.partition("|")
    source_url, source_version = registry.source_of(url, version or None)
    tokens: dict[str, str | tuple[str | None, str]] = {}
    if source_version:
        tokens["version"] = source_version
    server = repo.as_server()
    found = server.find(Where("Questionnaire", uris={"url": source_url}, tokens=tokens), 2)
    items: dict[str, Text] = {}
    answers: dict[str, dict[str, Text]] = {}

    def walk(nodes: Iterable[Mapping[str, Any]]) -> None:
        for node in nodes:
            if node.get("type") != "group":
                items[str(node.get("linkId"))] = _localized(node, "text")
                options: dict[str, Text] = {}
                for option in node.get("answerOption") or []:
                    coding = option.get("valueCoding") or {}
                    if isinstance(coding.get("code"), str):
                        options[str(coding["code"])] = _localized(coding, "display")
                answers[str(node.get("linkId"))] = options
            walk(node.get("item") or [])

    if found:
        walk(loads(found[0].body_text).get("item") or [])
    return _Form(items, answers)


def _answers(response: Mapping[str, Any]) -> dict[str, str]:
    """linkId -> the code (or value as text) of each answered item of a response."""
    out: dict[str, str] = {}

    def walk(nodes: Iterable[Mapping[str, Any]]) -> None:
        for node in nodes:
            for answer in node.get("answer") or []:
                coding = answer.get("valueCoding")
                if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
                    out[str(node.get("linkId"))] = str(coding["code"])
                else:
                    for key, value in answer.items():
                        if key.startswith("value") and not isinstance(value, Mapping | list):
                            out[str(node.get("linkId"))] = str(value)
                walk(answer.get("item") or [])
            walk(node.get("item") or [])

    walk(response.get("item") or [])
    return out


# --- the parts of the report ------------------------------------------------------------------------


def _text(name: Any) -> Text:
    return Text(str(name.nb), str(name.en))


def _elevated_range(obs: Mapping[str, Any] | None) -> tuple[float, float] | None:
    for rr in (obs or {}).get("referenceRange") or []:
        if "elevated-range" in _codes(rr.get("type"), CS_INTERPRETATION):
            low = (rr.get("low") or {}).get("value")
            high = (rr.get("high") or {}).get("value")
            if isinstance(low, int | float) and isinstance(high, int | float):
                return float(low), float(high)
    return None


def _trajectories(
    mapping: InstrumentMapping, series: Sequence[_Admin], all_scales: bool
) -> tuple[tuple[DomainGroup, ...], int]:
    current = series[-1]
    critical = mapping.change.critical
    per_scale: dict[str, Trajectory] = {}
    hidden = 0
    for code in mapping.display_order:
        scale = mapping.scale(code)
        points: list[Point] = []
        last_obs: JsonDict | None = None
        for admin in series:
            obs = admin.scales().get(code)
            score = None if obs is None else _value(obs)
            if obs is None or score is None:
                continue
            last_obs = obs
            interp = _interpretations(obs)
            points.append(
                Point(
                    number=admin.number,
                    date=admin.date,
                    score=score,
                    full="trigger-only" not in interp,
                    elevated="elevated" in interp,
                    change=_change(interp, "previous"),
                )
            )
        if not points:
            continue
        if not all_scales and not any(p.full for p in points):
            hidden += 1
            continue
        now = current.scales().get(code)
        interp = _interpretations(now or {})
        rti = None if now is None else _component(now, "rti")
        rti_class: ChangeKind | None = None
        if rti is not None and abs(rti) > critical:
            rti_class = "deterioration" if rti > 0 else "improvement"
        low, high = _elevated_range(last_obs) or (scale.elevated_low, float(mapping.answer_handling.max))
        per_scale[code] = Trajectory(
            code=code,
            name=_text(scale.name),
            domain=scale.domain,
            points=tuple(points),
            elevated_low=low,
            elevated_high=high,
            norm_mean=scale.norms.mean,
            scale_min=mapping.answer_handling.min,
            scale_max=mapping.answer_handling.max,
            stagnation="stagnation" in interp,
            latest=None if now is None else _value(now),
            change_first=_change(interp, "first"),
            change_previous=_change(interp, "previous"),
            rti=rti,
            rti_reliable=rti_class,
            expected=_expected_curve(scale.expected_recovery, points, current.number),
        )
    groups = tuple(
        DomainGroup(
            d.code,
            _text(d.name),
            tuple(t for c, t in per_scale.items() if mapping.scale(c).domain == d.code),
        )
        for d in mapping.domains
    )
    return tuple(g for g in groups if g.trajectories), hidden


def _expected_curve(
    block: ExpectedRecovery | None, points: Sequence[Point], last: int
) -> ExpectedCurve | None:
    """The expected course from this episode's intake score up to administration ``last`` (none
    without a model or without a score at the intake)."""
    if block is None or not points or points[0].number != 1 or last < 2:
        return None
    model = model_of(block)
    intake = points[0].score
    curve = tuple((k, model.expected(k, intake), *model.band(k, intake)) for k in range(2, last + 1))
    return ExpectedCurve(
        intake, curve, block.n_patients, block.n_episodes, block.fitted, block.band.percentiles
    )


def _alliance(
    mapping: InstrumentMapping, series: Sequence[_Admin], rupture_flags: Sequence[AlertLine]
) -> AllianceReport:
    current = series[-1].alliance()
    previous_admin = next((a for a in reversed(series[:-1]) if a.alliance()), None)
    previous = previous_admin.alliance() if previous_admin is not None else {}
    names = {d.code: _text(d.name) for d in mapping.alliance.dimensions}
    names[mapping.alliance.total] = Text("Totalt", "Total")
    order: list[str] = [c for c in ("task", "goal", "bond") if c in names]
    order += [d.code for d in mapping.alliance.dimensions if d.code not in order]
    order.append(mapping.alliance.total)
    bars = tuple(
        AllianceBar(
            code=code,
            name=names[code],
            percent=_component(current[code], "percent-of-max") if code in current else None,
            previous=_component(previous[code], "percent-of-max") if code in previous else None,
            mean=_value(current[code]) if code in current else None,
        )
        for code in order
    )
    total = current.get(mapping.alliance.total)
    floor = None if mapping.alerts is None else mapping.alerts.alliance_floor_percent
    percent = None if total is None else _component(total, "percent-of-max")
    below = floor is not None and percent is not None and percent < floor
    drop = total is not None and _change(_interpretations(total), "previous") == "deterioration"
    return AllianceReport(
        bars=bars,
        previous_number=None if previous_admin is None else previous_admin.number,
        floor_percent=floor,
        rupture=any(f.kind == "alliance-rupture" for f in rupture_flags) or below or drop,
        below_floor=below,
        reliable_drop=drop,
    )


def _preferences(
    mapping: InstrumentMapping, series: Sequence[_Admin], form: _Form
) -> tuple[PreferenceLine, ...]:
    out: list[PreferenceLine] = []
    for pref in mapping.preferences:
        last: str | None = None
        changed: _Admin | None = None
        for admin in series:
            obs = admin.items().get(pref.link_id)
            value = None if obs is None else _code(obs.get("valueCodeableConcept"), CS_PREFERENCE)
            if value is not None and value != last:
                changed, last = admin, value
        current_obs = series[-1].items().get(pref.link_id)
        current = (
            None if current_obs is None else _code(current_obs.get("valueCodeableConcept"), CS_PREFERENCE)
        )
        direction: Direction | None = current if current in ("more", "less", "as-now") else None  # type: ignore[assignment]
        out.append(
            PreferenceLine(
                link_id=pref.link_id,
                text=form.items.get(pref.link_id, Text(pref.link_id, pref.link_id)),
                direction=direction,
                changed_at=None if changed is None else changed.number,
                changed_on=None if changed is None else changed.date,
            )
        )
    return tuple(out)


def _single_items(mapping: InstrumentMapping, current: _Admin, form: _Form) -> tuple[SingleItemLine, ...]:
    items = current.items()
    out: list[SingleItemLine] = []
    for kind, defs in (("single", mapping.single), ("medication", mapping.medication)):
        for item in defs:
            obs = items.get(item.link_id)
            out.append(
                SingleItemLine(
                    link_id=item.link_id,
                    kind=kind,  # type: ignore[arg-type]
                    text=form.items.get(item.link_id, Text(item.link_id, item.link_id)),
                    value=None if obs is None else _value(obs),
                    direction=item.direction,
                )
            )
    return tuple(out)


def _open_scales(
    mapping: InstrumentMapping, current: _Admin, form: _Form, answers: Mapping[str, str]
) -> tuple[OpenScale, ...]:
    out: list[OpenScale] = []
    scales = current.scales()
    for code in mapping.display_order:
        obs = scales.get(code)
        if obs is None or "trigger-only" in _interpretations(obs):
            continue
        scale = mapping.scale(code)
        lines = []
        for link_id in scale.items:
            answered = answers.get(link_id)
            display = None if answered is None else form.answers.get(link_id, {}).get(answered)
            lines.append(
                ItemAnswer(
                    link_id=link_id,
                    text=form.items.get(link_id, Text(link_id, link_id)),
                    answer=display if display is not None or answered is None else Text(answered, answered),
                    code=answered,
                    reverse_keyed=link_id in scale.reverse_keyed,
                )
            )
        out.append(OpenScale(code, _text(scale.name), _value(obs), tuple(lines)))
    return tuple(out)


def _summary(mapping: InstrumentMapping, current: _Admin) -> ChangeSummary:
    scales = current.scales()
    first: list[ChangeLine] = []
    previous: list[ChangeLine] = []
    trends: list[ChangeLine] = []
    stagnating: list[ChangeLine | Text] = []
    elevated: list[Text] = []
    for code in mapping.display_order:
        obs = scales.get(code)
        if obs is None:
            continue
        name = _text(mapping.scale(code).name)
        interp = _interpretations(obs)
        if (kind := _change(interp, "first")) is not None:
            first.append(ChangeLine(code, name, kind, _component(obs, "rc-first")))
        if (kind := _change(interp, "previous")) is not None:
            previous.append(ChangeLine(code, name, kind, _component(obs, "rc-previous")))
        rti = _component(obs, "rti")
        if rti is not None and abs(rti) > mapping.change.critical:
            trends.append(ChangeLine(code, name, "deterioration" if rti > 0 else "improvement", rti))
        if "stagnation" in interp:
            stagnating.append(name)
        if "elevated" in interp:
            elevated.append(name)
    return ChangeSummary(
        tuple(first),
        tuple(previous),
        tuple(trends),
        tuple(stagnating),
        tuple(elevated),
        mapping.change.critical,
    )


def _in_effect(flag: Mapping[str, Any], authored: str, newest: bool) -> bool:
    """Whether ``flag`` was in effect at the administration ``authored`` (the newest: active now)."""
    if flag.get("status") == "entered-in-error":
        return False
    if newest:
        return flag.get("status") == "active"
    period = flag.get("period") or {}
    start, end, at = (
        parse_instant(period.get("start")),
        parse_instant(period.get("end")),
        parse_instant(authored),
    )
    if start is None or at is None or start > at:
        return False
    return end is None or end > at


def _alerts(
    repo: Repository,
    patient_id: str,
    mapping: InstrumentMapping,
    series: Sequence[_Admin],
    newest: bool,
) -> tuple[AlertLine, ...]:
    authored = series[-1].authored
    numbers = {a.authored: a.number for a in series}
    tasks: dict[str, JsonDict] = {}
    for task in _find(repo, "Task", "patient", patient_id):
        focus = reference_id((task.get("focus") or {}).get("reference"), "Flag")
        if focus is not None:
            tasks[focus] = task
    out: list[AlertLine] = []
    for flag in _find(repo, "Flag", "subject", patient_id):
        if PROFILE_FLAG not in ((flag.get("meta") or {}).get("profile") or []):
            continue
        if not _in_effect(flag, authored, newest):
            continue
        kind = _code(flag.get("code"), CS_ALERTS) or "alert"
        key = next(
            (
                str(i.get("value"))
                for i in flag.get("identifier") or []
                if i.get("system") == ALERT_KEY_SYSTEM
            ),
            "",
        )
        scale = key.partition("/")[2] or None
        name = None
        if scale is not None and scale.startswith("alliance:"):
            name = Text("Samarbeidet (totalt)", "Alliance (total)")  # not-on-track of the alliance total
        elif scale is not None:
            try:
                name = _text(mapping.scale(scale).name)
            except KeyError:
                name = Text(scale, scale)
        priority = [
            c.get("code")
            for ext in flag.get("extension") or []
            for c in (ext.get("valueCodeableConcept") or {}).get("coding") or []
        ]
        review = tasks.get(str(flag["id"]))
        owner = None
        if review is not None and review.get("owner"):
            owner = str(review["owner"].get("display") or review["owner"].get("reference") or "")
        start = str((flag.get("period") or {}).get("start") or "")
        out.append(
            AlertLine(
                kind=kind,
                scale=scale,
                scale_name=name,
                since=_day(start),
                since_number=numbers.get(start),
                status=str(flag.get("status")),
                urgent="PH" in priority,
                reason=str((flag.get("code") or {}).get("text") or ""),
                task_status=None if review is None else str(review.get("status")),
                task_owner=owner,
                flag_id=str(flag["id"]),
            )
        )
    rank = {
        "suicide-risk": 0,
        "prefer-not-suicide": 1,
        "deterioration": 2,
        "not-on-track": 3,
        "alliance-rupture": 4,
    }
    out.sort(key=lambda a: (not a.urgent, rank.get(a.kind, 9), a.since, a.scale or ""))
    return tuple(out)


# --- entry points -----------------------------------------------------------------------------------


def assemble_report(
    repo: Repository,
    patient_id: str,
    *,
    administration: str | None = None,
    all_scales: bool = False,
) -> PatientReport:
    """The report of Patient ``patient_id`` as of ``administration`` (a DiagnosticReport id; default the
    newest), read with the caller's ``repo`` (module doc). :class:`NotFound` for a patient out of reach,
    one without a scored administration, or an administration that is not one of the patient's."""
    patient = _patient(repo, patient_id)
    registry = _registry(repo)
    observations = [
        o
        for o in _find(repo, "Observation", "subject", patient_id)
        if o.get("status") in ("final", "amended", "corrected")
    ]
    every = _administrations(repo, patient_id, observations)
    responses = _responses(repo, patient_id)
    scored: list[tuple[_Admin, InstrumentMapping, str]] = []
    for admin in every:
        admin.response = responses.get(admin.response_id)
        if admin.response is None:
            continue
        try:
            mapping, canonical = _mapping_of(registry, admin.response)
        except NotFound:
            continue
        scored.append((admin, mapping, canonical))
    if not scored:
        raise NotFound(f"Patient/{patient_id} has no scored administration")
    if administration is None:
        chosen = scored[-1]
    else:
        found = [s for s in scored if str(s[0].report.get("id")) == administration]
        if not found:
            raise NotFound(
                f"DiagnosticReport/{administration} is not an administration of Patient/{patient_id}"
            )
        chosen = found[0]
    admin, mapping, canonical = chosen
    assert admin.response is not None
    episode = admin.episode
    in_episode = [s[0] for s in scored if s[1].instrument == mapping.instrument and s[0].episode == episode]
    for number, a in enumerate(in_episode, start=1):
        a.number = number
    series = in_episode[: in_episode.index(admin) + 1]
    newest = admin is in_episode[-1]
    form = _form(repo, registry, canonical)
    answers = _answers(admin.response)
    alerts = _alerts(repo, patient_id, mapping, series, newest)
    domains, hidden = _trajectories(mapping, series, all_scales)
    suicide_items = (
        set() if mapping.alerts is None else set(mapping.scale(mapping.alerts.suicide_scale).items)
    )
    prefer_not = mapping.answer_handling.prefer_not.code
    context = admin.context
    header = Header(
        patient_id=patient_id,
        patient_name=_patient_name(patient),
        birth_date=_birth_date(patient),
        episode=episode,
        number=admin.number,
        of=len(in_episode),
        authored=admin.authored,
        date=admin.date,
        context=context if context in ("intake", "weekly", "termination") else None,  # type: ignore[arg-type]
        instrument=_text(mapping.title),
        questionnaire=canonical,
        mapping_version=mapping.version,
        report_id=str(admin.report.get("id")),
        response_id=admin.response_id,
    )
    return PatientReport(
        header=header,
        alerts=alerts,
        suicide_prefer_not=any(answers.get(i) == prefer_not for i in suicide_items),
        alliance=_alliance(mapping, series, [a for a in alerts if a.kind == "alliance-rupture"]),
        preferences=_preferences(mapping, series, form),
        domains=domains,
        all_scales=all_scales,
        hidden_scales=hidden,
        single_items=_single_items(mapping, admin, form),
        open_scales=_open_scales(mapping, admin, form, answers),
        change=_summary(mapping, admin),
        administrations=tuple((a.number, str(a.report.get("id")), a.date) for a in in_episode),
    )


def _latest_scale_facts(
    repo: Repository, patient_id: str, mapping_names: Mapping[str, Text]
) -> tuple[tuple[Text, ...], tuple[Text, ...]]:
    """(stagnating, deteriorating) scales at the patient's newest scored administration, among the scales
    asked in full there: read from that DiagnosticReport's results only (not the whole record)."""
    reports = [
        r
        for r in _find(repo, "DiagnosticReport", "subject", patient_id)
        if PROFILE_REPORT in ((r.get("meta") or {}).get("profile") or [])
        and r.get("status") in _SCORED_REPORT
    ]
    if not reports:
        return (), ()
    newest = max(reports, key=lambda r: _sort_key(r.get("effectiveDateTime")))
    stagnating: list[Text] = []
    deteriorating: list[Text] = []
    for ref in newest.get("result") or []:
        oid = reference_id(ref.get("reference"), "Observation")
        stored = None if oid is None else repo.get("Observation", oid)
        if stored is None:
            continue
        obs = loads(stored.body_text)
        code = _code(obs.get("code"), CS_SCALES)
        if code is None:
            continue
        name = mapping_names.get(code, Text(code, code))
        interp = _interpretations(obs)
        if "trigger-only" in interp:
            # A closed scale (its trigger alone was asked): not a course the clinician follows here.
            continue
        if "stagnation" in interp:
            stagnating.append(name)
        if "deterioration" in (_change(interp, "first"), _change(interp, "previous")):
            deteriorating.append(name)
    return tuple(stagnating), tuple(deteriorating)


# An urgent Task (an alert's review) still open this long after it was raised is overdue.
URGENT_REVIEW_HOURS = 24
_URGENT = frozenset({"urgent", "asap", "stat"})


def _overdue(task: Mapping[str, Any], now: datetime) -> bool:
    """Open past its time: a questionnaire Task whose answer window has ended, or an urgent Task (an
    alert's review) open for more than :data:`URGENT_REVIEW_HOURS` since it was authored."""
    end = task_window(task)[1]
    if end is not None and end < now:
        return True
    if task.get("priority") in _URGENT and task.get("authoredOn"):
        try:
            authored = datetime.fromisoformat(str(task["authoredOn"]).replace("Z", "+00:00"))
        except ValueError:
            return False
        if authored.tzinfo is None:
            authored = authored.replace(tzinfo=UTC)
        return now - authored > timedelta(hours=URGENT_REVIEW_HOURS)
    return False


def caseload(repo: Repository, practitioner_id: str, now: datetime) -> list[CaseloadRow]:
    """The practitioner's patients, each with its open alerts, stagnating and deteriorating scales (at
    the newest administration), last response date, open Tasks and overdue ones (:func:`_overdue`);
    ordered: open alerts first, then stagnating, then deteriorating, then by the last response, newest
    first. Read with the caller's ``repo``: a patient out of its reach is left out."""
    patients = (
        repo.kernel.policy.reachable(repo.uow.conn, Access(practitioner=practitioner_id)) or frozenset()
    )
    names: dict[str, Text] = {}
    for instrument in _registry(repo):
        if isinstance(instrument.mapping, InstrumentMapping):
            names.update({s.code: _text(s.name) for s in instrument.mapping.scales})
    rows: list[CaseloadRow] = []
    for patient_id in sorted(patients):
        stored = repo.get("Patient", patient_id)
        if stored is None:
            continue
        body = loads(stored.body_text)
        alerts = sorted(
            {
                kind
                for f in _find(repo, "Flag", "subject", patient_id)
                if f.get("status") == "active" and (kind := _code(f.get("code"), CS_ALERTS)) is not None
            }
        )
        stagnating, deteriorating = _latest_scale_facts(repo, patient_id, names)
        authored = [
            r.get("authored")
            for r in _find(repo, "QuestionnaireResponse", "subject", patient_id)
            if r.get("status") in ("completed", "amended") and r.get("authored")
        ]
        last = max(authored, key=_sort_key) if authored else None
        open_tasks = overdue = 0
        for task in _find(repo, "Task", "patient", patient_id):
            if task.get("status") not in OPEN_STATUSES:
                continue
            open_tasks += 1
            if _overdue(task, now):
                overdue += 1
        rows.append(
            CaseloadRow(
                patient_id=patient_id,
                name=_patient_name(body),
                birth_date=_birth_date(body),
                open_alerts=tuple(alerts),
                stagnating=stagnating,
                deteriorating=deteriorating,
                last_response=None if last is None else _day(last),
                open_tasks=open_tasks,
                overdue_tasks=overdue,
            )
        )

    def order(row: CaseloadRow) -> tuple[bool, bool, bool, float, str]:
        latest = -row.last_response.toordinal() if row.last_response is not None else math.inf
        return (not row.open_alerts, not row.stagnating, not row.deteriorating, latest, row.name)

    rows.sort(key=order)
    return rows
