"""Pydantic schemas of the declarative mapping files in ``mappings/`` (one per instrument version).

Two shapes:

* :class:`InstrumentMapping` -- an adaptive multi-scale instrument such as Norse Feedback 2.1: scale
  membership, reverse keying, triggers, opening and closing thresholds, norms, reliabilities, the
  alliance and preference definitions and the handling of the two non-numeric answers.
* :class:`SumScoreMapping` -- a sum-score instrument such as PHQ-9 or GAD-7: total, answer scores,
  severity bands and alerts.

Every load error is a :class:`ContentError` whose message names the file and the field path, for
example ``mappings/nf21-2.1.0.yaml: scales[3].norms.sd: must be > 0``.
"""

from __future__ import annotations

from datetime import date
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "AllianceDefinition",
    "AnswerHandling",
    "CloseRule",
    "CodeRef",
    "ContentError",
    "ExpectedRecovery",
    "InstrumentMapping",
    "ItemSource",
    "Scale",
    "SumScoreMapping",
    "load_any_mapping",
    "load_item_source",
    "load_mapping",
    "load_sum_score_mapping",
]

# A model validator that knows which field is wrong starts its message with this marker and the
# field name, so the error path can point at the field instead of the enclosing object.
_FIELD_MARK = "@"

_M = TypeVar("_M", bound=BaseModel)


class ContentError(Exception):
    """A content file (mapping, Questionnaire, item source) is unreadable or inconsistent."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems
        super().__init__("\n".join(f"{file}: {p}" for p in problems))


def _field_error(field: str, message: str) -> ValueError:
    return ValueError(f"{_FIELD_MARK}{field}{_FIELD_MARK} {message}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalizedText(_Model):
    """A label in Norwegian bokmål (the base language) and English."""

    nb: str = Field(min_length=1)
    en: str = Field(min_length=1)


class Norms(_Model):
    mean: float
    sd: float
    n: int
    population: str = Field(min_length=1)
    source: str = Field(min_length=1)

    @field_validator("sd")
    @classmethod
    def _sd_positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be > 0")
        return value

    @field_validator("n")
    @classmethod
    def _n_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1")
        return value


class Reliability(_Model):
    """Reliability r used for reliable change; ``assumed`` marks a placeholder to replace locally."""

    value: float
    source: str = Field(min_length=1)
    assumed: bool

    @field_validator("value")
    @classmethod
    def _in_unit_interval(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError("must be between 0 and 1 (exclusive)")
        return value


class RecoveryCoefficients(_Model):
    """``expected = intercept + log_k ln(k) + intake x + intake_log_k x ln(k)`` (k >= 2, x = intake)."""

    intercept: float
    log_k: float
    intake: float
    intake_log_k: float


class RecoveryBand(_Model):
    """The tolerance band around the expected score: residual percentiles (``low`` <= 0 <= ``high``)."""

    low: float = Field(le=0)
    high: float = Field(ge=0)
    percentiles: tuple[float, float] = (10.0, 90.0)

    @model_validator(mode="after")
    def _ordered(self) -> RecoveryBand:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise _field_error("percentiles", "must satisfy 0 <= low < high <= 100")
        return self


class ExpectedRecovery(_Model):
    """An expected-recovery curve fitted by ``fhir-norse calibrate --expected-recovery`` (issue 19,
    ``fhir_norse/scoring/recovery.py``): the form, its coefficients and band, and the sample it rests on."""

    form: str = Field(min_length=1)
    coefficients: RecoveryCoefficients
    band: RecoveryBand
    higher_is_worse: bool
    max_administration: int = Field(ge=2)
    n_patients: int = Field(ge=1)
    n_episodes: int = Field(ge=1)
    n_scores: int = Field(ge=1)
    fitted: date
    sample: str = Field(min_length=1)


# The answer scale of every multi-scale item (1-7), and so the range of its scale scores and means.
ANSWER_RANGE = (1, 7)


def _within_answer_range(value: float) -> float:
    if not ANSWER_RANGE[0] <= value <= ANSWER_RANGE[1]:
        raise ValueError(f"must be within 1-7 (got {value:g})")
    return value


class Scale(_Model):
    """One clinical scale. ``trigger`` is one of its items, or ``opens_on`` names another scale
    whose trigger opens it (Substance Recovery opens on the Substance Use trigger)."""

    code: str = Field(min_length=1)
    name: LocalizedText
    domain: str
    items: list[str] = Field(min_length=1)
    trigger: str | None = None
    opens_on: str | None = None
    reverse_keyed: list[str] = Field(default_factory=list)
    open_if_trigger_gt: float
    close_if_mean_last3_lt: float
    close_window: int = 3
    elevated_from: float | None = Field(
        default=None,
        description=(
            "The elevated range is score >= elevated_from (default: close_if_mean_last3_lt, the level at "
            "which the scale would not close). One definition for the interpretation code, the "
            "referenceRange written on each scale Observation, crossing into or out of the elevated "
            "range, and stagnation."
        ),
    )
    norms: Norms
    reliability: Reliability
    expected_recovery: ExpectedRecovery | None = None
    not_on_track_signal: bool = Field(
        default=False,
        description=(
            "Raise the not-on-track signal (interpretation, Flag and Task) for this scale from its "
            "expected_recovery model; off by default, and it needs the model."
        ),
    )

    @field_validator("open_if_trigger_gt", "close_if_mean_last3_lt")
    @classmethod
    def _in_range(cls, value: float) -> float:
        return _within_answer_range(value)

    @field_validator("elevated_from")
    @classmethod
    def _elevated_in_range(cls, value: float | None) -> float | None:
        return None if value is None else _within_answer_range(value)

    @property
    def elevated_low(self) -> float:
        """The lowest score of the elevated range (``elevated_from``, default the closing threshold)."""
        return self.close_if_mean_last3_lt if self.elevated_from is None else self.elevated_from

    @field_validator("close_window")
    @classmethod
    def _window_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1")
        return value

    @model_validator(mode="after")
    def _structure(self) -> Scale:
        if len(set(self.items)) != len(self.items):
            raise _field_error("items", "contains a linkId twice")
        if (self.trigger is None) == (self.opens_on is None):
            raise _field_error("trigger", "exactly one of trigger and opens_on must be set")
        if self.trigger is not None and self.trigger not in self.items:
            raise _field_error("trigger", f"{self.trigger!r} is not one of the scale's items")
        for i, link_id in enumerate(self.reverse_keyed):
            if link_id not in self.items:
                raise _field_error(f"reverse_keyed[{i}]", f"{link_id!r} is not one of the scale's items")
        _check_signal(self.not_on_track_signal, self.expected_recovery, higher_is_worse=True)
        return self


def _check_signal(on: bool, model: ExpectedRecovery | None, *, higher_is_worse: bool) -> None:
    if on and model is None:
        raise _field_error(
            "not_on_track_signal",
            "needs an expected_recovery model (fhir-norse calibrate --expected-recovery)",
        )
    if model is not None and model.higher_is_worse != higher_is_worse:
        raise _field_error(
            "expected_recovery.higher_is_worse", f"must be {str(higher_is_worse).lower()} for this score"
        )


class Domain(_Model):
    code: str = Field(min_length=1)
    name: LocalizedText


class NonNumericAnswer(_Model):
    """How one non-numeric answer code is scored, per part of the instrument: a number, or ``missing``."""

    code: str
    clinical_scales: float | Literal["missing"]
    alliance: float | Literal["missing"]
    preferences: Literal["missing"] = "missing"
    single_items: float | Literal["missing"] = "missing"


class AnswerHandling(_Model):
    """Agreement ``min``-``max`` (reverse keyed: ``min + max - x``) plus the two non-numeric answers.

    The labels of the answers are wording and live in the item source, not here.
    """

    min: int = 1
    max: int = 7
    not_relevant: NonNumericAnswer
    prefer_not: NonNumericAnswer

    @model_validator(mode="after")
    def _prefer_not_missing(self) -> AnswerHandling:
        p = self.prefer_not
        if p.clinical_scales != "missing" or p.alliance != "missing" or p.single_items != "missing":
            raise _field_error("prefer_not", "'prefer not to answer' must be missing everywhere")
        return self

    def codes(self) -> list[str]:
        return [str(v) for v in range(self.min, self.max + 1)] + [
            self.not_relevant.code,
            self.prefer_not.code,
        ]


class AllianceDimension(_Model):
    code: str
    name: LocalizedText
    items: list[str] = Field(min_length=1)


class ChangeBasis(_Model):
    """The spread and reliability that reliable change of a score without published norms rests on."""

    sd: float = Field(gt=0)
    sd_source: str = Field(min_length=1)
    reliability: Reliability


class AllianceDefinition(_Model):
    """Alliance dimensions (each the mean of its items), the total (mean of all items) and the raw
    maximum used to show a score as percent of the total possible raw score. ``change`` (optional)
    is the SD and reliability of the dimension and total means, for reliable change of the alliance."""

    dimensions: list[AllianceDimension] = Field(min_length=1)
    total: str = "total"
    item_max: int = 7
    max_raw: int
    change: ChangeBasis | None = None
    # The expected-recovery curve of the alliance total (higher is better) and its signal switch.
    expected_recovery: ExpectedRecovery | None = None
    not_on_track_signal: bool = False

    @property
    def items(self) -> list[str]:
        return [i for d in self.dimensions for i in d.items]

    @model_validator(mode="after")
    def _max_raw(self) -> AllianceDefinition:
        if self.max_raw != self.item_max * len(self.items):
            raise _field_error(
                "max_raw", f"must be item_max x number of items = {self.item_max * len(self.items)}"
            )
        _check_signal(self.not_on_track_signal, self.expected_recovery, higher_is_worse=False)
        return self


class PreferenceItem(_Model):
    link_id: str
    # ``construct`` would shadow a BaseModel method, hence the alias.
    construct_code: str = Field(alias="construct")


class SingleItem(_Model):
    link_id: str
    direction: Literal["problem", "resource"]
    construct_code: str | None = Field(default=None, alias="construct")


class Section(_Model):
    """A section of the static form, in display order."""

    id: Literal["triggers", "scales", "alliance", "preferences", "single", "medication"]
    title: LocalizedText


class ChangeRules(_Model):
    """How change is judged: ``critical`` |index| for a reliable change, the stagnation window."""

    critical: float = Field(default=1.96, gt=0)
    stagnation_window: int = Field(default=4, ge=2)


class AlertSettings(_Model):
    """Clinical alerts: which scale is suicidality, the alliance floor, whether "prefer not" is urgent."""

    suicide_scale: str
    alliance_floor_percent: float = Field(default=75.0, ge=0, le=100)
    prefer_not_urgent: bool = False


class Questionnaires(_Model):
    adaptive: str
    static: str


CloseRule = Literal["moving-average", "moving-average-unless-trigger-open"]


class InstrumentMapping(_Model):
    """A multi-scale adaptive instrument version (Norse Feedback 2.1)."""

    instrument: str
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    title: LocalizedText
    canonical_base: str
    questionnaires: Questionnaires
    answer_handling: AnswerHandling
    close_rule: CloseRule = Field(
        default="moving-average",
        description=(
            "moving-average (the published rule): an open scale closes when the mean of its last "
            "close_window full scores is below close_if_mean_last3_lt, whatever its latest trigger; a "
            "closed scale's trigger is asked at every administration and re-opens it within that same "
            "administration when above open_if_trigger_gt. moving-average-unless-trigger-open (the "
            "2.1.0 behaviour): as moving-average, but a scale whose latest trigger is above the opening "
            "threshold stays open whatever its mean."
        ),
    )
    close_min_administrations: int = Field(
        default=3,
        description=(
            "A deviation from the published rules (which leave fewer scores open): a scale may close "
            "only when it has at least this many full scale scores; with fewer it stays open. The "
            "closing mean is over the last close_window scores."
        ),
    )
    full_bank_contexts: list[Literal["intake", "weekly", "termination"]] = Field(
        default_factory=lambda: cast(list[Literal["intake", "weekly", "termination"]], ["intake"]),
        description=(
            "A deviation from the published rules (where every administration asks the triggers first): "
            "administration contexts that ask every scale in full whatever its state (the first, long "
            "administration of the case study); a clinician's override still closes a scale."
        ),
    )
    decimals: int = Field(
        default=2,
        ge=0,
        le=6,
        description=(
            "The precision of the scores the instrument reports (scale scores and alliance means), in "
            "decimal places: each is rounded half up once, where it is computed, and everything derived "
            "uses the rounded score (fhir_norse/scoring/precision.py)."
        ),
    )
    domains: list[Domain] = Field(min_length=1)
    scales: list[Scale] = Field(min_length=1)
    display_order: list[str]
    sections: list[Section]
    alliance: AllianceDefinition
    preferences: list[PreferenceItem]
    single: list[SingleItem]
    medication: list[SingleItem]
    change: ChangeRules = Field(default_factory=ChangeRules)
    alerts: AlertSettings | None = None

    def scale(self, code: str) -> Scale:
        for s in self.scales:
            if s.code == code:
                return s
        raise KeyError(code)

    def scale_of_item(self, link_id: str) -> Scale:
        for s in self.scales:
            if link_id in s.items:
                return s
        raise KeyError(link_id)

    def trigger_of(self, scale: Scale) -> str:
        """The linkId of the item whose answer opens ``scale``."""
        if scale.trigger is not None:
            return scale.trigger
        assert scale.opens_on is not None
        opener = self.scale(scale.opens_on).trigger
        assert opener is not None
        return opener

    def all_link_ids(self) -> list[str]:
        return (
            [i for s in self.scales for i in s.items]
            + self.alliance.items
            + [p.link_id for p in self.preferences]
            + [s.link_id for s in self.single]
            + [m.link_id for m in self.medication]
        )

    @field_validator("close_min_administrations")
    @classmethod
    def _min_admin(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1")
        return value

    @model_validator(mode="after")
    def _cross(self) -> InstrumentMapping:
        domains = {d.code for d in self.domains}
        codes = [s.code for s in self.scales]
        for i, s in enumerate(self.scales):
            if s.domain not in domains:
                raise _field_error(f"scales[{i}].domain", f"{s.domain!r} is not a declared domain")
            if s.opens_on is not None:
                if s.opens_on not in codes:
                    raise _field_error(f"scales[{i}].opens_on", f"{s.opens_on!r} is not a scale")
                if self.scale(s.opens_on).trigger is None:
                    raise _field_error(f"scales[{i}].opens_on", f"{s.opens_on!r} has no trigger of its own")
        if len(set(codes)) != len(codes):
            raise _field_error("scales", "scale codes must be unique")
        seen: set[str] = set()
        for link_id in self.all_link_ids():
            if link_id in seen:
                raise _field_error("scales", f"linkId {link_id!r} is used twice")
            seen.add(link_id)
        if sorted(self.display_order) != sorted(codes):
            raise _field_error("display_order", "must list every scale code exactly once")
        if self.alerts is not None and self.alerts.suicide_scale not in codes:
            raise _field_error("alerts.suicide_scale", f"{self.alerts.suicide_scale!r} is not a scale")
        if len({s.id for s in self.sections}) != len(self.sections):
            raise _field_error("sections", "a section is listed twice")
        return self


# --- the item source (wording) ---------------------------------------------------------------------


class SourceItem(_Model):
    id: str = Field(min_length=1)
    nb: str = Field(min_length=1)
    en: str = Field(min_length=1)
    dimension: Literal["goal", "bond", "task"] | None = None
    direction: Literal["problem", "resource"] | None = None


class SourceScale(_Model):
    scale: str
    items: list[SourceItem] = Field(min_length=1)


class ItemSource(_Model):
    """``questionnaires/source/<instrument>-items.yaml``: the wording of every item and answer."""

    instrument: str
    title: LocalizedText
    answer_labels: dict[str, LocalizedText]
    preference_labels: dict[str, LocalizedText]
    scales: list[SourceScale]
    alliance: list[SourceItem]
    preferences: list[SourceItem]
    single: list[SourceItem]
    medication: list[SourceItem]

    def items_by_id(self) -> dict[str, SourceItem]:
        out: dict[str, SourceItem] = {}
        for s in self.scales:
            out.update((i.id, i) for i in s.items)
        for group in (self.alliance, self.preferences, self.single, self.medication):
            out.update((i.id, i) for i in group)
        return out


# --- sum-score instruments (PHQ-9, GAD-7) ---------------------------------------------------------


class SeverityBand(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    min: float
    max: float
    code: str
    display: str


class SumTotal(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    code: str | dict[str, Any]
    items: list[str] = Field(min_length=1)
    answer_scores: dict[str, float] | list[dict[str, Any]]
    min: float
    max: float

    def scores(self) -> dict[str, float]:
        """Answer code -> score, whichever of the two accepted shapes the file uses."""
        if isinstance(self.answer_scores, dict):
            return dict(self.answer_scores)
        out: dict[str, float] = {}
        for entry in self.answer_scores:
            code = entry.get("code")
            score = entry.get("score", entry.get("value"))
            if isinstance(code, str) and isinstance(score, int | float):
                out[code] = float(score)
        return out


class CodeRef(_Model):
    """A code of a code system; its display comes from the content's terminology."""

    system: str
    code: str


class SumScoreMapping(BaseModel):
    """A sum-score instrument: ``total`` adds the item scores; ``severity_bands`` partition the range;
    ``panel`` is the code of the panel Observation of an administration of this instrument alone (a code
    of ValueSet ``rom-panels``); ``decimals`` is the precision of the total (whole numbers unless the
    answer scores have decimals)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    instrument: str
    version: str
    questionnaire: str
    panel: CodeRef | None = None
    decimals: int = Field(default=0, ge=0, le=6)
    total: SumTotal
    severity_bands: list[SeverityBand] = Field(min_length=1)
    alerts: list[Any] = Field(default_factory=list)
    source: str | dict[str, Any] | list[Any]

    @model_validator(mode="after")
    def _bands(self) -> SumScoreMapping:
        if len(set(self.total.items)) != len(self.total.items):
            raise _field_error("total.items", "contains a linkId twice")
        bands = sorted(self.severity_bands, key=lambda b: b.min)
        if bands[0].min != self.total.min or bands[-1].max != self.total.max:
            raise _field_error("severity_bands", "must cover total.min to total.max")
        for a, b in pairwise(bands):
            if b.min <= a.max:
                raise _field_error("severity_bands", f"bands {a.code!r} and {b.code!r} overlap")
        for i, band in enumerate(self.severity_bands):
            if band.min > band.max:
                raise _field_error(f"severity_bands[{i}]", "min is above max")
        return self


# --- loading --------------------------------------------------------------------------------------


def _display_path(path: Path) -> str:
    parts = path.parts
    for anchor in ("mappings", "questionnaires", "profiles"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor) :])
    return str(path)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _format(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors():
        loc = _loc(tuple(error["loc"]))
        message = str(error["msg"])
        message = message.removeprefix("Value error, ")
        if message.startswith(_FIELD_MARK):
            field, _, message = message[1:].partition(_FIELD_MARK)
            loc = f"{loc}.{field}" if loc else field
            message = message.strip()
        problems.append(f"{loc or '(root)'}: {message}")
    return problems


def _read_yaml(path: Path) -> dict[str, Any]:
    name = _display_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ContentError(name, [f"cannot read: {exc.strerror}"]) from exc
    except yaml.YAMLError as exc:
        raise ContentError(name, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ContentError(name, ["(root): must be a mapping"])
    return data


def _validate(model: type[_M], path: Path, data: dict[str, Any]) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ContentError(_display_path(path), _format(exc)) from exc


def load_mapping(path: Path) -> InstrumentMapping:
    """Load a multi-scale instrument mapping; raise :class:`ContentError` naming file and field."""
    return _validate(InstrumentMapping, path, _read_yaml(path))


def load_sum_score_mapping(path: Path) -> SumScoreMapping:
    """Load a sum-score (PHQ-9/GAD-7) mapping; raise :class:`ContentError` naming file and field."""
    return _validate(SumScoreMapping, path, _read_yaml(path))


def load_item_source(path: Path) -> ItemSource:
    """Load the item wording file; raise :class:`ContentError` naming file and field."""
    return _validate(ItemSource, path, _read_yaml(path))


def load_any_mapping(path: Path) -> InstrumentMapping | SumScoreMapping:
    """Load a mapping of either shape: a file with ``scales`` is a multi-scale instrument."""
    data = _read_yaml(path)
    if "scales" in data:
        return _validate(InstrumentMapping, path, data)
    return _validate(SumScoreMapping, path, data)
