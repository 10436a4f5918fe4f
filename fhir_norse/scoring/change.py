"""Change statistics for one scale over a series of administrations (pure: plain values in and out).

* Reliable change index, Jacobson & Truax (1991), https://doi.org/10.1037/0022-006X.59.1.12:
  ``RC = (x2 - x1) / S_diff`` with ``S_diff = sqrt(2) * SD * sqrt(1 - r)``.
* Reliable Trend Index (McAleavey): ``RTI = b1 / (SD * sqrt(1 - r) * sqrt(12 / (n (n^2 - 1))))``, ``b1``
  the least-squares slope over ``n`` equally spaced administrations. It equals RC for ``n = 2``.

``SD`` and ``r`` come from the mapping (``scale.norms.sd`` and ``scale.reliability.value``); no norm,
reliability or threshold is written here. Scores follow the instrument's direction: on the clinical
scales higher means more problems (``higher_is_worse=True``); for the alliance higher is better.

Decisions, all configurable by parameter:

* A change is reliable when ``|index| > critical`` (strictly; default 1.96, two-sided 5 %).
* **Missing administrations** (``None`` in a series) are skipped: "first" is the first scored
  administration, "previous" the last scored one before the current. The RTI keeps each score at its
  administration number, so a gap widens the time axis instead of being closed up; without gaps this is
  exactly McAleavey's formula (the denominator ``sqrt(12 / (n (n^2 - 1)))`` is ``1 / sqrt(Sxx)`` for
  equally spaced points, and the general form ``1 / sqrt(Sxx)`` is used).
* **Elevated** means a score at or above a cut-off on the score scale (the elevated range is
  ``score >= cutoff``). :func:`elevated_cutoff` gives the scale's ``elevated_from`` from the mapping
  (default its closing threshold ``close_if_mean_last3_lt``: where the scale would not close, about the
  average new outpatient), or ``norm mean + z * norm SD`` for a chosen ``z``. The same cut-off decides
  the ``elevated`` interpretation, the elevated ``referenceRange``, crossing into or out of the elevated
  range and stagnation. A score without an elevated range (the alliance) passes ``cutoff=math.inf``.
* **Stagnation**: the last ``stagnation_window`` scored administrations (default 4, the current one
  included) are all elevated, and neither the RC from the first to the last score of that window nor the
  RTI over the window is reliable in either direction. Fewer scored administrations than the window:
  no stagnation yet. A reliable worsening is not stagnation; it is deterioration.
* Crossing into / out of the elevated range compares the current score with the previous scored one.
* When the current administration has no score for the scale, every comparison is ``None`` and every
  flag is ``False``: nothing is claimed about an administration that did not measure the scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fhir_norse.instruments.schema import Scale

__all__ = [
    "DEFAULT_CRITICAL",
    "DEFAULT_STAGNATION_WINDOW",
    "ChangeClass",
    "ScaleChange",
    "classify",
    "elevated_cutoff",
    "reliable_change",
    "reliable_trend_index",
    "scale_change",
    "scale_change_for",
    "standard_error_of_difference",
]

ChangeClass = Literal["reliably-deteriorated", "reliably-improved", "no-reliable-change"]

DEFAULT_CRITICAL = 1.96
DEFAULT_STAGNATION_WINDOW = 4


def _check(sd: float, r: float) -> None:
    if not sd > 0:
        raise ValueError(f"sd must be > 0 (got {sd!r})")
    if not 0 <= r < 1:
        raise ValueError(f"reliability r must be in [0, 1) (got {r!r})")


def standard_error_of_difference(sd: float, r: float) -> float:
    """``S_diff = sqrt(2) * SD * sqrt(1 - r)`` (Jacobson & Truax 1991)."""
    _check(sd, r)
    return math.sqrt(2) * sd * math.sqrt(1 - r)


def reliable_change(x1: float, x2: float, sd: float, r: float) -> float:
    """Reliable change index from ``x1`` (earlier) to ``x2`` (later): ``(x2 - x1) / S_diff``."""
    return (x2 - x1) / standard_error_of_difference(sd, r)


def reliable_trend_index(
    scores: Sequence[float], sd: float, r: float, *, times: Sequence[float] | None = None
) -> float | None:
    """McAleavey's Reliable Trend Index over ``scores`` (oldest first); ``None`` for fewer than 2.

    ``times`` are the administration numbers of the scores (default ``0, 1, ..., n-1``: equally
    spaced). The slope's standard error is ``SD * sqrt(1 - r) / sqrt(Sxx)``, which for equally spaced
    administrations is the published ``SD * sqrt(1 - r) * sqrt(12 / (n (n^2 - 1)))``.
    """
    _check(sd, r)
    n = len(scores)
    if n < 2:
        return None
    ts = [float(t) for t in times] if times is not None else [float(i) for i in range(n)]
    if len(ts) != n:
        raise ValueError("times must have one entry per score")
    t_mean = sum(ts) / n
    y_mean = sum(scores) / n
    sxx = sum((t - t_mean) ** 2 for t in ts)
    if sxx == 0:
        raise ValueError("times must not all be equal")
    slope = sum((t - t_mean) * (y - y_mean) for t, y in zip(ts, scores, strict=True)) / sxx
    return slope / (sd * math.sqrt(1 - r) / math.sqrt(sxx))


def classify(index: float, critical: float = DEFAULT_CRITICAL, higher_is_worse: bool = True) -> ChangeClass:
    """Classify an RC or RTI: reliable when ``|index| > critical`` (a value equal to it is not)."""
    if abs(index) <= critical:
        return "no-reliable-change"
    worse = index > 0 if higher_is_worse else index < 0
    return "reliably-deteriorated" if worse else "reliably-improved"


def elevated_cutoff(scale: Scale, *, z: float | None = None) -> float:
    """The lowest score of ``scale``'s elevated range (a score at or above it is elevated).

    Default: the mapping's ``elevated_from`` (itself defaulting to the closing threshold). With ``z``:
    ``norm mean + z * norm SD``.
    """
    if z is None:
        return scale.elevated_low
    return scale.norms.mean + z * scale.norms.sd


@dataclass(frozen=True)
class ScaleChange:
    """How one scale moved up to the current (last) administration of a series.

    ``rc_first``/``rc_previous`` compare the current score with the first and the previous scored
    administration; ``rti`` is the trend over all scored administrations. Classifications follow
    :func:`classify`. See the module docstring for missing scores, elevation and stagnation.
    """

    scale: str
    score: float | None
    first: float | None
    previous: float | None
    scored_administrations: int
    rc_first: float | None
    rc_previous: float | None
    rti: float | None
    change_first: ChangeClass | None
    change_previous: ChangeClass | None
    trend: ChangeClass | None
    cutoff: float
    elevated: bool
    crossed_into_elevated: bool
    crossed_out_of_elevated: bool
    stagnation: bool


def _stagnates(
    scored: list[tuple[int, float]],
    *,
    sd: float,
    r: float,
    cutoff: float,
    critical: float,
    window: int,
) -> bool:
    if len(scored) < window:
        return False
    last = scored[-window:]
    if not all(score >= cutoff for _, score in last):
        return False
    rc = reliable_change(last[0][1], last[-1][1], sd, r)
    rti = reliable_trend_index([s for _, s in last], sd, r, times=[t for t, _ in last])
    reliable = abs(rc) > critical or (rti is not None and abs(rti) > critical)
    return not reliable


def scale_change(
    scale: str,
    scores: Sequence[float | None],
    *,
    sd: float,
    r: float,
    cutoff: float,
    critical: float = DEFAULT_CRITICAL,
    higher_is_worse: bool = True,
    stagnation_window: int = DEFAULT_STAGNATION_WINDOW,
) -> ScaleChange:
    """Change statistics for ``scale`` at the last administration of ``scores`` (oldest first).

    ``None`` marks an administration without a score for the scale; it is skipped.
    """
    _check(sd, r)
    if stagnation_window < 2:
        raise ValueError("stagnation_window must be >= 2")
    scored = [(i, s) for i, s in enumerate(scores) if s is not None]
    current = scores[-1] if scores else None
    if current is None:
        return ScaleChange(
            scale=scale,
            score=None,
            first=scored[0][1] if scored else None,
            previous=scored[-1][1] if scored else None,
            scored_administrations=len(scored),
            rc_first=None,
            rc_previous=None,
            rti=None,
            change_first=None,
            change_previous=None,
            trend=None,
            cutoff=cutoff,
            elevated=False,
            crossed_into_elevated=False,
            crossed_out_of_elevated=False,
            stagnation=False,
        )

    earlier = scored[:-1]
    first = earlier[0][1] if earlier else None
    previous = earlier[-1][1] if earlier else None
    rc_first = reliable_change(first, current, sd, r) if first is not None else None
    rc_previous = reliable_change(previous, current, sd, r) if previous is not None else None
    rti = reliable_trend_index([s for _, s in scored], sd, r, times=[t for t, _ in scored])
    elevated = current >= cutoff
    was_elevated = previous >= cutoff if previous is not None else None

    def cls(index: float | None) -> ChangeClass | None:
        return None if index is None else classify(index, critical, higher_is_worse)

    return ScaleChange(
        scale=scale,
        score=current,
        first=first,
        previous=previous,
        scored_administrations=len(scored),
        rc_first=rc_first,
        rc_previous=rc_previous,
        rti=rti,
        change_first=cls(rc_first),
        change_previous=cls(rc_previous),
        trend=cls(rti),
        cutoff=cutoff,
        elevated=elevated,
        crossed_into_elevated=was_elevated is False and elevated,
        crossed_out_of_elevated=was_elevated is True and not elevated,
        stagnation=_stagnates(scored, sd=sd, r=r, cutoff=cutoff, critical=critical, window=stagnation_window),
    )


def scale_change_for(
    scale: Scale,
    scores: Sequence[float | None],
    *,
    cutoff: float | None = None,
    critical: float = DEFAULT_CRITICAL,
    stagnation_window: int = DEFAULT_STAGNATION_WINDOW,
) -> ScaleChange:
    """:func:`scale_change` with SD, r and (unless given) the cut-off taken from the mapping's scale."""
    return scale_change(
        scale.code,
        scores,
        sd=scale.norms.sd,
        r=scale.reliability.value,
        cutoff=elevated_cutoff(scale) if cutoff is None else cutoff,
        critical=critical,
        higher_is_worse=True,
        stagnation_window=stagnation_window,
    )
