"""Local reliability estimates (Cronbach's alpha) and the new mapping version that records them.

Pure computation for ``fhir-norse calibrate`` (issue 5, build item 3): no database, no CLI. The caller
collects the answer sets (linkId -> answer code, as :func:`~fhir_norse.scoring.answers_from_response`
returns them) of the completed administrations, and this module

* scores every item of every clinical scale in the problem direction with the engine's rules: agreement
  1-7, reverse-keyed items ``min + max - x`` (8 - x), "not relevant to me" = the mapping's clinical value
  (1, already in the problem direction, never reversed), "prefer not to answer" and unknown codes missing;
* keeps, per scale, only the administrations in which *every* item of the scale is scored (listwise
  deletion; a closed scale answered by its trigger alone therefore does not count);
* computes Cronbach's alpha, ``k / (k - 1) * (1 - sum(item variances) / variance(total))`` with sample
  variances (ddof = 1), or ``None`` when it cannot be estimated (fewer than 2 items, fewer than
  ``min_complete`` complete administrations, zero variance of the total);
* writes a new mapping version in the layout of the source file, replacing each estimated scale's
  ``reliability`` with ``{value, source, assumed: false}`` and keeping the assumed value elsewhere;
* with ``--expected-recovery`` (issue 19) also fits each scale's and the alliance total's
  expected-recovery curve (:mod:`fhir_norse.scoring.recovery`) from the episodes' score series and
  writes it as the scale's ``expected_recovery`` block (:func:`fit_expected_recovery`,
  :func:`with_expected_recovery`).

A reliability must lie strictly between 0 and 1 (``Reliability`` in the schema; reliable change needs
``1 - r > 0``). An alpha that rounds (to 3 decimals) to 0 or below, or to 1, cannot be used: that scale keeps
its previous reliability (see :func:`usable_alpha`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from statistics import variance
from typing import Any

import yaml

from fhir_norse.instruments.schema import AnswerHandling, InstrumentMapping, Scale
from fhir_norse.scoring.recovery import (
    DEFAULT_BAND_PERCENTILES,
    DEFAULT_MIN_EPISODES,
    SCORE_RANGE,
    Episode,
    RecoveryModel,
    fit,
    mapping_block,
)

__all__ = [
    "ALLIANCE_KEY_PREFIX",
    "DEFAULT_MIN_COMPLETE",
    "Estimate",
    "RecoveryFit",
    "calibrated_mapping",
    "cronbach_alpha",
    "estimate_reliabilities",
    "fit_expected_recovery",
    "scale_matrix",
    "score_clinical_item",
    "usable_alpha",
    "with_expected_recovery",
    "write_mapping",
]

DEFAULT_MIN_COMPLETE = 30
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


@dataclass(frozen=True)
class Estimate:
    """Cronbach's alpha of one scale (``None`` = not estimable) and what it rests on."""

    alpha: float | None
    n_complete: int
    n_items: int


def cronbach_alpha(
    matrix: Sequence[Sequence[float]], *, min_rows: int = DEFAULT_MIN_COMPLETE
) -> float | None:
    """Cronbach's alpha of a respondents x items matrix of complete rows (sample variances, ddof = 1).

    ``None`` when there are fewer than 2 items, fewer than ``max(min_rows, 2)`` rows, or the variance of
    the row totals is zero. Rows must all have the same length (listwise deletion is the caller's job).
    """
    rows = [list(map(float, r)) for r in matrix]
    if len(rows) < max(min_rows, 2):
        return None
    k = len(rows[0])
    if any(len(r) != k for r in rows):
        raise ValueError("every row must have the same number of items")
    if k < 2:
        return None
    total_var = variance([sum(r) for r in rows])
    if total_var == 0:
        return None
    item_var = sum(variance([r[j] for r in rows]) for j in range(k))
    return k / (k - 1) * (1 - item_var / total_var)


def score_clinical_item(code: str | None, handling: AnswerHandling, reverse: bool) -> float | None:
    """One clinical-scale answer in the problem direction, ``None`` = missing.

    The same rules as the engine's (private) per-item reader in ``engine.py``, which exposes no public
    per-item function: 1-7 (reversed ``min + max - x`` when reverse keyed), the non-numeric answers as
    ``answer_handling`` scores them on clinical scales and never reversed, anything else missing.
    """
    if code is None:
        return None
    if code.isdigit() and handling.min <= int(code) <= handling.max:
        raw = int(code)
        return float(handling.min + handling.max - raw if reverse else raw)
    for special in (handling.not_relevant, handling.prefer_not):
        if special.code == code:
            value = special.clinical_scales
            return None if value == "missing" else float(value)
    return None


def scale_matrix(
    answer_sets: Iterable[Mapping[str, str]], scale: Scale, handling: AnswerHandling
) -> list[list[float]]:
    """The complete rows (every item scored) of one scale, columns in the scale's item order."""
    reverse = set(scale.reverse_keyed)
    rows: list[list[float]] = []
    for answers in answer_sets:
        row = [score_clinical_item(answers.get(i), handling, i in reverse) for i in scale.items]
        if all(v is not None for v in row):
            rows.append([v for v in row if v is not None])
    return rows


def estimate_reliabilities(
    answer_sets: Iterable[Mapping[str, str]],
    mapping: InstrumentMapping,
    *,
    min_complete: int = DEFAULT_MIN_COMPLETE,
) -> dict[str, Estimate]:
    """Cronbach's alpha per scale code (every scale of the mapping, in mapping order)."""
    sets = list(answer_sets)
    out: dict[str, Estimate] = {}
    for scale in mapping.scales:
        rows = scale_matrix(sets, scale, mapping.answer_handling)
        out[scale.code] = Estimate(
            alpha=cronbach_alpha(rows, min_rows=min_complete),
            n_complete=len(rows),
            n_items=len(scale.items),
        )
    return out


def usable_alpha(estimate: Estimate | None) -> float | None:
    """The alpha rounded to 3 decimals when it can serve as a reliability (strictly between 0 and 1)."""
    if estimate is None or estimate.alpha is None:
        return None
    value = round(estimate.alpha, 3)
    return value if 0 < value < 1 else None


def calibrated_mapping(
    mapping: InstrumentMapping | Mapping[str, Any],
    estimates: Mapping[str, Estimate],
    *,
    new_version: str,
    when: date,
) -> dict[str, Any]:
    """The content of a new mapping version with the usable estimates as non-assumed reliabilities.

    ``mapping`` is either the source file as loaded by ``yaml.safe_load`` (preferred: the layout and key
    order are kept) or a loaded :class:`InstrumentMapping` (dumped with its file aliases). Scales without a
    usable estimate keep their reliability unchanged. The result is validated before it is returned.
    """
    if isinstance(mapping, InstrumentMapping):
        content: dict[str, Any] = mapping.model_dump(mode="json", by_alias=True)
    else:
        content = copy.deepcopy(dict(mapping))
    if not _VERSION.match(new_version):
        raise ValueError(f"new_version must look like 1.2.3 (got {new_version!r})")
    if str(content.get("version")) == new_version:
        raise ValueError(f"new_version {new_version!r} is the version being calibrated")
    content["version"] = new_version
    for scale in content.get("scales") or []:
        value = usable_alpha(estimates.get(scale.get("code")))
        if value is None:
            continue
        n = estimates[scale["code"]].n_complete
        scale["reliability"] = {
            "value": value,
            "source": (
                f"Cronbach's alpha over {n} complete administrations on this server, {when.isoformat()}"
            ),
            "assumed": False,
        }
    InstrumentMapping.model_validate(content)
    return content


def write_mapping(path: Path, content: Mapping[str, Any]) -> None:
    """Write a mapping file as YAML; never overwrites (raises :class:`FileExistsError`)."""
    text = yaml.safe_dump(dict(content), sort_keys=False, allow_unicode=True, width=120)
    with Path(path).open("x", encoding="utf-8") as f:
        f.write(text)


# --- expected-recovery curves (issue 19) ------------------------------------------------------------

ALLIANCE_KEY_PREFIX = "alliance:"


@dataclass(frozen=True)
class RecoveryFit:
    """The expected-recovery fit of one scale (or, keyed ``alliance:<total>``, the alliance total):
    the model (None: too few counted episodes) and how many episodes counted."""

    model: RecoveryModel | None
    n_counted: int
    min_episodes: int


def fit_expected_recovery(
    episodes: Mapping[str, Sequence[Episode]],
    mapping: InstrumentMapping,
    *,
    when: date,
    min_episodes: int = DEFAULT_MIN_EPISODES,
    percentiles: tuple[float, float] = DEFAULT_BAND_PERCENTILES,
) -> dict[str, RecoveryFit]:
    """One fit per scale of ``mapping`` and one for the alliance total, from the episodes' series
    (keyed by scale code, and ``alliance:<total>``); clinical scales higher-is-worse, the alliance not.
    ``percentiles``: the residual percentiles that bound the tolerance band."""
    keys = [s.code for s in mapping.scales] + [ALLIANCE_KEY_PREFIX + mapping.alliance.total]
    out: dict[str, RecoveryFit] = {}
    for key in keys:
        model, counted_episodes = fit(
            episodes.get(key, ()),
            higher_is_worse=not key.startswith(ALLIANCE_KEY_PREFIX),
            min_episodes=min_episodes,
            fitted=when,
            percentiles=percentiles,
            score_range=SCORE_RANGE,
        )
        out[key] = RecoveryFit(model, counted_episodes, min_episodes)
    return out


def with_expected_recovery(
    content: Mapping[str, Any], fits: Mapping[str, RecoveryFit], *, sample: str
) -> dict[str, Any]:
    """``content`` (a mapping file's data) with an ``expected_recovery`` block for every fitted scale
    and the alliance total; the others keep theirs (if any). Validated before it is returned."""
    out = copy.deepcopy(dict(content))
    for scale in out.get("scales") or []:
        found = fits.get(str(scale.get("code")))
        if found is not None and found.model is not None:
            scale["expected_recovery"] = mapping_block(found.model, sample)
    alliance = out.get("alliance") or {}
    found = fits.get(ALLIANCE_KEY_PREFIX + str(alliance.get("total", "total")))
    if found is not None and found.model is not None:
        alliance["expected_recovery"] = mapping_block(found.model, sample)
    InstrumentMapping.model_validate(out)
    return out
