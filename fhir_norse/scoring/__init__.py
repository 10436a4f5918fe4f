"""Pure scoring: a response's answers and an instrument mapping in, frozen score models out.

No database and no HTTP here (see ``DESIGN.md``); every item id, threshold and norm comes from ``mappings/``.
"""

from fhir_norse.scoring.engine import (
    AllianceScore,
    AllianceScores,
    Nf21Scores,
    PreferenceValue,
    ScaleScore,
    SingleItemScore,
    answers_from_response,
    score_nf21,
)
from fhir_norse.scoring.sums import SumAlert, SumScore, score_sum, submitted_total, total_link_id

__all__ = [
    "AllianceScore",
    "AllianceScores",
    "Nf21Scores",
    "PreferenceValue",
    "ScaleScore",
    "SingleItemScore",
    "SumAlert",
    "SumScore",
    "answers_from_response",
    "score_nf21",
    "score_sum",
    "submitted_total",
    "total_link_id",
]
