"""Pure scoring of sum-score instruments (PHQ-9, GAD-7) from a :class:`SumScoreMapping`.

The server computes the total itself; a total the client sent is only compared, never used.

Decisions:

* The total is the sum of the mapped answer scores and is reported only when **every** scored item is
  answered (``complete``); a partial sum would under-state severity, and the published instruments define
  no proration. An incomplete response has ``total`` and band ``None`` and a warning.
* The total is rounded half up to the mapping's ``decimals`` (whole numbers by default;
  :mod:`fhir_norse.scoring.precision`) before its band is looked up.
* Band: the severity band whose ``min``..``max`` contains the total (``min <= total <= max``).
* A submitted total that differs from the computed one (or is sent for an incomplete response) is a
  warning, not an error.
* Alerts come from the mapping's ``alerts`` entries ``{item, when_score_at_least, flag, display}`` and are
  checked on answered items even when the response is incomplete.
* An answer code the mapping does not score is missing, with a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fhir_norse.instruments.schema import SeverityBand, SumScoreMapping
from fhir_norse.scoring.precision import at_precision

__all__ = ["SumAlert", "SumScore", "score_sum", "submitted_total", "total_link_id"]


@dataclass(frozen=True)
class SumAlert:
    """An alert rule of the mapping that fired: ``flag`` is the alert code, ``display`` its text."""

    flag: str
    display: str
    link_id: str
    item_score: float


@dataclass(frozen=True)
class SumScore:
    instrument: str
    total: float | None
    band_code: str | None
    band_display: str | None
    items_answered: int
    items_total: int
    complete: bool
    item_scores: dict[str, float]
    warnings: tuple[str, ...]
    alerts: tuple[SumAlert, ...]


def total_link_id(mapping: SumScoreMapping) -> str:
    """The linkId of the total item in the Questionnaire (the total's code, e.g. a LOINC code)."""
    code = mapping.total.code
    if isinstance(code, str):
        return code
    return str(code["code"])


def _number(answer: Mapping[str, Any]) -> float | None:
    for key in ("valueInteger", "valueDecimal"):
        value = answer.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    quantity = answer.get("valueQuantity")
    if isinstance(quantity, dict):
        value = quantity.get("value")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _find_total(items: Any, link_id: str) -> float | None:
    if not isinstance(items, list):
        return None
    for item in items:
        if not isinstance(item, dict):
            continue
        answers = item.get("answer")
        if item.get("linkId") == link_id and isinstance(answers, list) and answers:
            first = answers[0]
            if isinstance(first, dict):
                return _number(first)
        nested = [item.get("item")] + [a.get("item") for a in answers or [] if isinstance(a, dict)]
        for children in nested:
            found = _find_total(children, link_id)
            if found is not None:
                return found
    return None


def submitted_total(qr: Mapping[str, Any], mapping: SumScoreMapping) -> float | None:
    """The total the client put in the response (item with the total's linkId), if any."""
    return _find_total(qr.get("item"), total_link_id(mapping))


def _band(total: float, bands: list[SeverityBand]) -> SeverityBand | None:
    for band in bands:
        if band.min <= total <= band.max:
            return band
    return None


def _alerts(mapping: SumScoreMapping, item_scores: Mapping[str, float]) -> list[SumAlert]:
    fired: list[SumAlert] = []
    for rule in mapping.alerts:
        if not isinstance(rule, dict):
            continue
        link_id, at_least = rule.get("item"), rule.get("when_score_at_least")
        if not isinstance(link_id, str) or not isinstance(at_least, int | float):
            continue
        score = item_scores.get(link_id)
        if score is not None and score >= at_least:
            fired.append(
                SumAlert(
                    flag=str(rule.get("flag", "")),
                    display=str(rule.get("display", "")),
                    link_id=link_id,
                    item_score=score,
                )
            )
    return fired


def score_sum(
    answers: Mapping[str, str], mapping: SumScoreMapping, submitted_total: float | None = None
) -> SumScore:
    """Total, severity band, warnings and alerts of a sum-score instrument; see the module docstring."""
    scores = mapping.total.scores()
    warnings: list[str] = []
    item_scores: dict[str, float] = {}
    for link_id in mapping.total.items:
        code = answers.get(link_id)
        if code is None:
            continue
        if code in scores:
            item_scores[link_id] = scores[code]
        else:
            warnings.append(f"{link_id}: answer code {code!r} is not scored; treated as missing")

    complete = len(item_scores) == len(mapping.total.items)
    total = at_precision(sum(item_scores.values()), mapping.decimals) if complete else None
    band = None if total is None else _band(total, mapping.severity_bands)
    if not complete:
        missing = [i for i in mapping.total.items if i not in item_scores]
        warnings.append(f"incomplete: no total computed; unanswered or unscored items {', '.join(missing)}")
    if submitted_total is not None and submitted_total != total:
        computed = "none (incomplete)" if total is None else f"{total:g}"
        warnings.append(
            f"submitted total {submitted_total:g} disagrees with the computed total {computed}; "
            "the computed total is used"
        )
    return SumScore(
        instrument=mapping.instrument,
        total=total,
        band_code=None if band is None else band.code,
        band_display=None if band is None else band.display,
        items_answered=len(item_scores),
        items_total=len(mapping.total.items),
        complete=complete,
        item_scores=item_scores,
        warnings=tuple(warnings),
        alerts=tuple(_alerts(mapping, item_scores)),
    )
