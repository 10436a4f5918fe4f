"""Pure scoring of a multi-scale adaptive instrument (Norse Feedback 2.1) from a mapping.

Input: the answers of one QuestionnaireResponse (linkId -> answer code) and an
:class:`~fhir_norse.instruments.schema.InstrumentMapping`. Output: frozen dataclasses. No database, no
HTTP, and no item id, threshold or norm in this module: everything comes from ``mappings/``.

Rules (``../shared/domain/README.md``) and the decisions this module takes where the sources leave room:

* Agreement answers ``min``..``max`` (1-7). A reverse-keyed item scores ``min + max - x`` (8 - x), so every
  clinical item is read in the problem direction (higher = more problems).
* A non-numeric answer scores what ``answer_handling`` says for that part of the instrument. On clinical
  scales "not relevant to me" scores 1 *already in the problem direction* ("no problem"): it is **not**
  reversed on reverse-keyed items (reversing would turn "no problem" into the maximum problem).
  "Prefer not to answer" is missing everywhere. An answer code the mapping does not know is missing and
  reported in ``Nf21Scores.warnings`` (intake validation should have refused it).
* Scale score = mean of the scored items, rounded half up to the mapping's ``decimals`` (the precision
  the instrument reports, :mod:`fhir_norse.scoring.precision`); ``None`` when none is scored. A closed
  scale gets its score from the trigger alone (``trigger_only``). A scale without a trigger of its own
  (``opens_on``, Substance Recovery) is never ``trigger_only``: the opening item belongs to another scale
  and is not averaged in.
* ``opened`` is the opening rule for this administration only: the trigger (the scale's own, or the one of
  the scale named by ``opens_on``), in the problem direction, is strictly above the scale's
  ``open_if_trigger_gt``. Whether a scale *stays* open across administrations needs the history and
  belongs to ``adaptive/``.
* z = (score - norm mean) / norm SD, T = 50 + 10 z, from the rounded score; statistics are not rounded
  (a display rounds them; a classification is made on the exact value).
* Alliance (higher = better, never reversed): each dimension and the total is the mean of its scored items
  (rounded as a scale score) and the percent of the maximum possible raw score **of the answered items**:
  sum / (item_max x n answered) x 100. With every item answered this equals sum / ``max_raw`` x 100, the
  case study's "percent of total possible raw score"; counting a missing item as 0 would read a skipped
  question as a rupture, so it is not done.
* Preferences: the answer code when it is a preference value ("less", "as-now", "more"), else ``None``.
* Single and medication items: the raw 1-7 answer and the problem-direction score (raw for
  ``direction: problem``, ``min + max - raw`` for ``direction: resource``). A non-numeric answer the mapping
  scores as a number is already in the problem direction, so its ``raw`` is ``None``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fhir_norse.instruments.schema import (
    AnswerHandling,
    InstrumentMapping,
    NonNumericAnswer,
    Scale,
    SingleItem,
)
from fhir_norse.scoring.precision import at_precision

__all__ = [
    "AllianceScore",
    "AllianceScores",
    "Nf21Scores",
    "PreferenceValue",
    "ScaleScore",
    "SingleItemScore",
    "answers_from_response",
    "score_nf21",
    "trigger_scores",
]

PreferenceValue = Literal["less", "as-now", "more"]
_PREFERENCE_VALUES: tuple[PreferenceValue, ...] = ("less", "as-now", "more")

_Part = Literal["clinical_scales", "alliance", "single_items"]


@dataclass(frozen=True)
class ScaleScore:
    """One clinical scale at one administration (higher = more problems)."""

    scale: str
    score: float | None
    z: float | None
    t: float | None
    items_answered: int
    items_total: int
    trigger_only: bool
    trigger_problem_score: float | None
    opened: bool


@dataclass(frozen=True)
class AllianceScore:
    """One alliance dimension (or the total): mean 1-7 and percent of the maximum possible raw score."""

    code: str
    mean: float | None
    percent: float | None
    items_answered: int
    items_total: int


@dataclass(frozen=True)
class AllianceScores:
    """Alliance dimensions keyed by their mapping code (``goal``, ``bond``, ``task``) and the total."""

    dimensions: dict[str, AllianceScore]
    total: AllianceScore


@dataclass(frozen=True)
class SingleItemScore:
    """A single or medication item: the raw answer and its problem-direction score."""

    link_id: str
    construct: str | None
    direction: Literal["problem", "resource"]
    raw: float | None
    problem_score: float | None


@dataclass(frozen=True)
class Nf21Scores:
    """Everything scored from one response of a multi-scale instrument."""

    instrument: str
    version: str
    scales: dict[str, ScaleScore]  # in the mapping's display order
    alliance: AllianceScores
    preferences: dict[str, PreferenceValue | None]
    single: dict[str, SingleItemScore]
    medication: dict[str, SingleItemScore]
    warnings: tuple[str, ...]


# --- reading a QuestionnaireResponse -----------------------------------------------------------------


def _walk(items: Iterable[Any], out: dict[str, str]) -> None:
    for item in items:
        if not isinstance(item, dict):
            continue
        link_id = item.get("linkId")
        answers = item.get("answer")
        if isinstance(answers, list):
            for answer in answers:
                if not isinstance(answer, dict):
                    continue
                coding = answer.get("valueCoding")
                code = coding.get("code") if isinstance(coding, dict) else None
                # A repeating item keeps its first coded answer; no scored item of ours repeats.
                if isinstance(link_id, str) and isinstance(code, str) and link_id not in out:
                    out[link_id] = code
                # FHIR allows items nested under an answer as well as under the item.
                _walk(answer.get("item") or [], out)
        _walk(item.get("item") or [], out)


def answers_from_response(qr: Mapping[str, Any]) -> dict[str, str]:
    """linkId -> answer code (``valueCoding.code``) of a QuestionnaireResponse as JSON.

    Walks nested items (under items and under answers); items without a coded answer are left out.
    See https://hl7.org/fhir/R4/questionnaireresponse.html.
    """
    out: dict[str, str] = {}
    _walk(qr.get("item") or [], out)
    return out


# --- answer values -------------------------------------------------------------------------------


def _non_numeric(code: str, handling: AnswerHandling) -> NonNumericAnswer | None:
    for answer in (handling.not_relevant, handling.prefer_not):
        if answer.code == code:
            return answer
    return None


def _raw(code: str, handling: AnswerHandling) -> int | None:
    if code.isdigit() and handling.min <= int(code) <= handling.max:
        return int(code)
    return None


class _Reader:
    """Turns answer codes into numbers for one part of the instrument and collects warnings."""

    def __init__(self, answers: Mapping[str, str], handling: AnswerHandling) -> None:
        self.answers = answers
        self.handling = handling
        # Keyed by linkId: an item read twice (alliance dimension and total, a borrowed trigger) warns once.
        self.warnings: dict[str, str] = {}

    def _unknown(self, link_id: str, code: str) -> None:
        self.warnings[link_id] = f"{link_id}: answer code {code!r} is not scored; treated as missing"

    def value(self, link_id: str, part: _Part, reverse: bool) -> tuple[float | None, float | None]:
        """(raw answer, scored value in the scoring direction) of one item; ``None`` = missing."""
        code = self.answers.get(link_id)
        if code is None:
            return None, None
        raw = _raw(code, self.handling)
        if raw is not None:
            scored = self.handling.min + self.handling.max - raw if reverse else raw
            return float(raw), float(scored)
        special = _non_numeric(code, self.handling)
        if special is None:
            self._unknown(link_id, code)
            return None, None
        fixed = getattr(special, part)
        # A number for a non-numeric answer is already in the scoring direction: never reversed.
        return None, (None if fixed == "missing" else float(fixed))

    def preference(self, link_id: str) -> PreferenceValue | None:
        code = self.answers.get(link_id)
        if code is None:
            return None
        for value in _PREFERENCE_VALUES:
            if code == value:
                return value
        if _non_numeric(code, self.handling) is None:
            self._unknown(link_id, code)
        return None


def _mean(values: list[float], decimals: int) -> float | None:
    """The mean of ``values`` at the instrument's precision (``None`` for no value)."""
    return at_precision(sum(values) / len(values), decimals) if values else None


# --- scales ---------------------------------------------------------------------------------------


def _scale_score(mapping: InstrumentMapping, scale: Scale, reader: _Reader) -> ScaleScore:
    reverse = set(scale.reverse_keyed)
    scored: dict[str, float] = {}
    for link_id in scale.items:
        _, value = reader.value(link_id, "clinical_scales", link_id in reverse)
        if value is not None:
            scored[link_id] = value
    score = _mean(list(scored.values()), mapping.decimals)

    trigger_id = mapping.trigger_of(scale)
    owner = scale if scale.trigger is not None else mapping.scale_of_item(trigger_id)
    if scale.trigger is not None:
        trigger_value = scored.get(trigger_id)
    else:
        _, trigger_value = reader.value(trigger_id, "clinical_scales", trigger_id in owner.reverse_keyed)

    z = None if score is None else (score - scale.norms.mean) / scale.norms.sd
    return ScaleScore(
        scale=scale.code,
        score=score,
        z=z,
        t=None if z is None else 50 + 10 * z,
        items_answered=len(scored),
        items_total=len(scale.items),
        trigger_only=scale.trigger is not None and set(scored) == {scale.trigger},
        trigger_problem_score=trigger_value,
        opened=trigger_value is not None and trigger_value > scale.open_if_trigger_gt,
    )


def trigger_scores(answers: Mapping[str, str], mapping: InstrumentMapping) -> dict[str, float | None]:
    """Trigger linkId -> its answer in the problem direction (reverse keying and "not relevant" applied
    as scoring does; ``None`` when unanswered or missing), for every scale's opening item."""
    reader = _Reader(answers, mapping.answer_handling)
    out: dict[str, float | None] = {}
    for scale in mapping.scales:
        trigger = mapping.trigger_of(scale)
        owner = scale if scale.trigger is not None else mapping.scale_of_item(trigger)
        out[trigger] = reader.value(trigger, "clinical_scales", trigger in owner.reverse_keyed)[1]
    return out


# --- alliance, preferences, single items ----------------------------------------------------------


def _alliance_score(
    code: str, items: list[str], item_max: int, decimals: int, reader: _Reader
) -> AllianceScore:
    values = [v for i in items if (v := reader.value(i, "alliance", False)[1]) is not None]
    return AllianceScore(
        code=code,
        mean=_mean(values, decimals),
        percent=sum(values) / (item_max * len(values)) * 100 if values else None,
        items_answered=len(values),
        items_total=len(items),
    )


def _alliance(mapping: InstrumentMapping, reader: _Reader) -> AllianceScores:
    a = mapping.alliance
    dims = {
        d.code: _alliance_score(d.code, d.items, a.item_max, mapping.decimals, reader) for d in a.dimensions
    }
    total = _alliance_score(a.total, a.items, a.item_max, mapping.decimals, reader)
    return AllianceScores(dimensions=dims, total=total)


def _single_items(items: list[SingleItem], reader: _Reader) -> dict[str, SingleItemScore]:
    out: dict[str, SingleItemScore] = {}
    for item in items:
        raw, problem = reader.value(item.link_id, "single_items", item.direction == "resource")
        out[item.link_id] = SingleItemScore(
            link_id=item.link_id,
            construct=item.construct_code,
            direction=item.direction,
            raw=raw,
            problem_score=problem,
        )
    return out


def score_nf21(answers: Mapping[str, str], mapping: InstrumentMapping) -> Nf21Scores:
    """Score one administration of a multi-scale instrument; see the module docstring for the rules."""
    reader = _Reader(answers, mapping.answer_handling)
    scales = {code: _scale_score(mapping, mapping.scale(code), reader) for code in mapping.display_order}
    alliance = _alliance(mapping, reader)
    preferences = {p.link_id: reader.preference(p.link_id) for p in mapping.preferences}
    single = _single_items(mapping.single, reader)
    medication = _single_items(mapping.medication, reader)
    return Nf21Scores(
        instrument=mapping.instrument,
        version=mapping.version,
        scales=scales,
        alliance=alliance,
        preferences=preferences,
        single=single,
        medication=medication,
        warnings=tuple(reader.warnings.values()),
    )
