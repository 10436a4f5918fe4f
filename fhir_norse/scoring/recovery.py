"""Expected-recovery curves and the "not on track" signal (issue 19; pure: plain values in and out).

**The model.** For one scale (or the alliance total), the expected score at administration ``k`` of an
episode given the intake score ``x`` (the score at ``k = 1``) is

    ``E[score_k | x] = b0 + b1 ln k + b2 x + b3 x ln k``   (k >= 2),

a linear model in log(administration) with an intake interaction: the shape of the published
expected-recovery curves of Lambert et al. (OQ-45 "expected treatment response", Finch, Lambert &
Schaalje 2001, https://doi.org/10.1002/cpp.286, fitted there with a log-linear HLM), here fitted by
ordinary least squares over every scored administration ``k >= 2`` of the sample's episodes (no random
effects: the band below carries the patients' spread). At ``k = 1`` the curve is the intake score itself.
Beyond the highest administration number of the sample the curve stays at its value there (no
extrapolation past the data).

**The band.** The 10th and 90th percentiles of the fit's residuals (by default; nearest-rank on the
sorted residuals), one pair per scale: a score above ``expected + high`` is a worse course than 90 % of
the sample's scores at the same administration and intake; for a score where higher is better (the
alliance) a score below ``expected + low`` is.

**The signal** (:func:`check`): the scale is *outside* its band at an administration ``k >= 2`` when its
score is past the band's bad side; it is *not on track* when it is outside at this administration and
at the previous scored one of the episode (two consecutive administrations, both after intake), and it
is back inside (the alert resolves) as soon as a score is inside the band again.

**The sample.** Episodes, each a series of the scale's scores by administration number (``None`` where
the scale was not scored); an episode counts when its intake is scored and at least two later
administrations are (``MIN_ADMINISTRATIONS`` = 3 scored in all); a model is fitted only when at least
``DEFAULT_MIN_EPISODES`` (30) episodes count (:func:`fit`). This is a signal for the clinician's
attention, fitted on the clinic's own data, not a diagnosis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from fhir_norse.instruments.schema import ANSWER_RANGE, ExpectedRecovery

__all__ = [
    "DEFAULT_BAND_PERCENTILES",
    "DEFAULT_MIN_EPISODES",
    "FORM",
    "MIN_ADMINISTRATIONS",
    "SCORE_RANGE",
    "Episode",
    "RecoveryCheck",
    "RecoveryModel",
    "check",
    "counted",
    "fit",
    "mapping_block",
    "model_of",
    "outside_band",
]

# The range of every scale score and alliance mean a mapping's curve describes (the answer scale).
SCORE_RANGE = (float(ANSWER_RANGE[0]), float(ANSWER_RANGE[1]))
FORM = "score_k = b0 + b1 ln(k) + b2 intake + b3 intake ln(k), k >= 2 (OLS); band: residual percentiles"
DEFAULT_MIN_EPISODES = 30
MIN_ADMINISTRATIONS = 3
DEFAULT_BAND_PERCENTILES = (10.0, 90.0)


@dataclass(frozen=True)
class Episode:
    """One episode of care of one patient: the scale's scores by administration number (1 = intake)."""

    patient: str
    scores: Sequence[float | None]


@dataclass(frozen=True)
class RecoveryModel:
    """A fitted expected-recovery curve and its tolerance band (module doc)."""

    intercept: float
    log_k: float
    intake: float
    intake_log_k: float
    band_low: float
    band_high: float
    higher_is_worse: bool
    max_administration: int
    n_patients: int = 0
    n_episodes: int = 0
    n_scores: int = 0
    fitted: date | None = None
    percentiles: tuple[float, float] = DEFAULT_BAND_PERCENTILES
    # The scores possible (the answer scale's ends): a linear curve leaves them for an intake far from the
    # sample's, and no patient can be expected beyond them.
    score_range: tuple[float, float] | None = None

    def expected(self, k: int, intake: float) -> float:
        """The expected score at administration ``k`` (1-based) for an episode that started at ``intake``,
        within ``score_range``."""
        if k < 1:
            raise ValueError(f"administration numbers start at 1 (got {k})")
        if k == 1:
            return intake
        lk = math.log(min(k, self.max_administration))
        mid = self.intercept + self.log_k * lk + self.intake * intake + self.intake_log_k * intake * lk
        if self.score_range is not None:
            mid = min(max(mid, self.score_range[0]), self.score_range[1])
        return mid

    def band(self, k: int, intake: float) -> tuple[float, float]:
        """The tolerance band (low, high) around the expected score at ``k``."""
        mid = self.expected(k, intake)
        return mid + self.band_low, mid + self.band_high


def outside_band(model: RecoveryModel, k: int, intake: float, score: float) -> bool:
    """Whether ``score`` at administration ``k >= 2`` is past the band on its bad side."""
    low, high = model.band(k, intake)
    return score > high if model.higher_is_worse else score < low


@dataclass(frozen=True)
class RecoveryCheck:
    """The current administration against the expected curve. ``outside_previous`` is None when no
    earlier administration after intake scored the scale."""

    k: int
    intake: float
    expected: float
    low: float
    high: float
    outside: bool
    outside_previous: bool | None

    @property
    def not_on_track(self) -> bool:
        """Outside the band at this administration and at the previous scored one."""
        return self.outside and self.outside_previous is True


def check(model: RecoveryModel, scores: Sequence[float | None]) -> RecoveryCheck | None:
    """The signal at the last administration of ``scores`` (the episode so far, intake first).

    None when it cannot be judged: no intake score, the current administration is the intake, or the
    scale was not scored now.
    """
    if len(scores) < 2 or scores[0] is None or scores[-1] is None:
        return None
    intake = scores[0]
    k = len(scores)
    current = scores[-1]
    previous: bool | None = None
    for j in range(k - 1, 1, -1):  # administrations k-1 .. 2 (1-based), latest first
        earlier = scores[j - 1]
        if earlier is not None:
            previous = outside_band(model, j, intake, earlier)
            break
    low, high = model.band(k, intake)
    return RecoveryCheck(
        k=k,
        intake=intake,
        expected=model.expected(k, intake),
        low=low,
        high=high,
        outside=outside_band(model, k, intake, current),
        outside_previous=previous,
    )


# --- fitting --------------------------------------------------------------------------------------


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when the system is singular."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                factor = m[r][col] / m[col][col]
                if factor:
                    m[r] = [x - factor * y for x, y in zip(m[r], m[col], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile by nearest rank of already sorted values."""
    n = len(sorted_values)
    rank = max(1, math.ceil(p / 100 * n))
    return sorted_values[min(n, rank) - 1]


def counted(episode: Episode) -> bool:
    """Whether an episode counts for the fit: intake scored and at least two later scores."""
    return (
        bool(episode.scores)
        and episode.scores[0] is not None
        and sum(s is not None for s in episode.scores) >= MIN_ADMINISTRATIONS
    )


def fit(
    episodes: Iterable[Episode],
    *,
    higher_is_worse: bool = True,
    min_episodes: int = DEFAULT_MIN_EPISODES,
    percentiles: tuple[float, float] = DEFAULT_BAND_PERCENTILES,
    fitted: date | None = None,
    score_range: tuple[float, float] | None = None,
) -> tuple[RecoveryModel | None, int]:
    """The model fitted on the counted ``episodes`` and how many counted; the model is None when fewer
    than ``min_episodes`` count (or the design is singular, such as every intake the same)."""
    lo_p, hi_p = percentiles
    if not 0 <= lo_p < hi_p <= 100:
        raise ValueError(f"band percentiles must satisfy 0 <= low < high <= 100 (got {percentiles})")
    xtx = [[0.0] * 4 for _ in range(4)]
    xty = [0.0] * 4
    rows: list[tuple[float, float, float]] = []  # (ln k, intake, score)
    patients: set[str] = set()
    n_episodes = 0
    max_k = 0
    for episode in episodes:
        if not counted(episode):
            continue
        n_episodes += 1
        patients.add(episode.patient)
        intake = episode.scores[0]
        assert intake is not None
        for k, score in enumerate(episode.scores[1:], start=2):
            if score is None:
                continue
            max_k = max(max_k, k)
            lk = math.log(k)
            rows.append((lk, intake, score))
            x = (1.0, lk, intake, intake * lk)
            for i in range(4):
                xi = x[i]
                xty[i] += xi * score
                row = xtx[i]
                for j in range(i, 4):
                    row[j] += xi * x[j]
    if n_episodes < max(min_episodes, 1):
        return None, n_episodes
    for i in range(4):
        for j in range(i):
            xtx[i][j] = xtx[j][i]
    beta = _solve(xtx, xty)
    if beta is None:
        return None, n_episodes
    b0, b1, b2, b3 = beta
    residuals = sorted(s - (b0 + b1 * lk + b2 * x + b3 * x * lk) for lk, x, s in rows)
    return (
        RecoveryModel(
            intercept=b0,
            log_k=b1,
            intake=b2,
            intake_log_k=b3,
            band_low=_percentile(residuals, lo_p),
            band_high=_percentile(residuals, hi_p),
            higher_is_worse=higher_is_worse,
            max_administration=max_k,
            n_patients=len(patients),
            n_episodes=n_episodes,
            n_scores=len(rows),
            fitted=fitted,
            percentiles=percentiles,
            score_range=score_range,
        ),
        n_episodes,
    )


# --- the mapping's ``expected_recovery`` block ---------------------------------------------------------


def model_of(block: ExpectedRecovery) -> RecoveryModel:
    """The model a mapping's ``expected_recovery`` block states."""
    c = block.coefficients
    return RecoveryModel(
        intercept=c.intercept,
        log_k=c.log_k,
        intake=c.intake,
        intake_log_k=c.intake_log_k,
        band_low=block.band.low,
        band_high=block.band.high,
        higher_is_worse=block.higher_is_worse,
        max_administration=block.max_administration,
        n_patients=block.n_patients,
        n_episodes=block.n_episodes,
        n_scores=block.n_scores,
        fitted=block.fitted,
        percentiles=block.band.percentiles,
        score_range=SCORE_RANGE,
    )


def mapping_block(model: RecoveryModel, sample: str) -> dict[str, Any]:
    """The ``expected_recovery`` block of a mapping file for ``model`` (coefficients to 4 decimals)."""
    if model.fitted is None:
        raise ValueError("a model written to a mapping needs its fit date")
    lo, hi = model.percentiles
    return {
        "form": FORM,
        "coefficients": {
            "intercept": round(model.intercept, 4),
            "log_k": round(model.log_k, 4),
            "intake": round(model.intake, 4),
            "intake_log_k": round(model.intake_log_k, 4),
        },
        "band": {
            "low": round(min(model.band_low, 0.0), 4),
            "high": round(max(model.band_high, 0.0), 4),
            "percentiles": [lo, hi],
        },
        "higher_is_worse": model.higher_is_worse,
        "max_administration": model.max_administration,
        "n_patients": model.n_patients,
        "n_episodes": model.n_episodes,
        "n_scores": model.n_scores,
        "fitted": model.fitted.isoformat(),
        "sample": sample,
    }
