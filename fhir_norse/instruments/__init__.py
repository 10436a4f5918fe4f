"""Instrument content: mapping schemas, the FHIR content builder and the content check.

Content is data (see ``DESIGN.md``): Questionnaires live in ``questionnaires/``, scoring and adaptive
rules, norms and reliabilities in ``mappings/``. This package only knows their *shape*.
"""

from fhir_norse.instruments.schema import (
    ContentError,
    InstrumentMapping,
    SumScoreMapping,
    load_any_mapping,
    load_mapping,
    load_sum_score_mapping,
)

__all__ = [
    "ContentError",
    "InstrumentMapping",
    "SumScoreMapping",
    "load_any_mapping",
    "load_mapping",
    "load_sum_score_mapping",
]
