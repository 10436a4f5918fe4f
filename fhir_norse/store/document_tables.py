"""Which version of each feedback-report DiagnosticReport has its PDF document (issue 17; revision ``0010``).

The renderer (:mod:`fhir_norse.web.report.documents`) gives every scored ``rom-report``
DiagnosticReport its report as a PDF (``presentedForm``, a Binary and a DocumentReference). It must
find the reports still without one cheaply, on every scheduler tick, without reading bodies: one row
per DiagnosticReport here says which **version** of it carries the current document (the version the
renderer's own update wrote). A DiagnosticReport whose current version differs (new, or re-scored
since: scoring writes a new version without ``presentedForm``) is pending. The row also remembers
failures (how many in a row, and when to try again) so that one report that cannot be rendered is
retried later without holding up the others.

Timestamps are naive UTC, as elsewhere.
"""

from __future__ import annotations

import sqlalchemy as sa

from fhir_norse.store.tables import METADATA

__all__ = ["REPORT_DOCUMENT"]

REPORT_DOCUMENT = sa.Table(
    "report_document",
    METADATA,
    # The DiagnosticReport's id.
    sa.Column("report_id", sa.String(64), primary_key=True),
    # The DiagnosticReport version that carries the current document (0: none yet), or that was judged
    # to need none (not final or amended).
    sa.Column("version", sa.Integer(), nullable=False),
    # The current document's DocumentReference and Binary ids (NULL while there is none).
    sa.Column("document_id", sa.String(64), nullable=True),
    sa.Column("binary_id", sa.String(64), nullable=True),
    # Failed attempts since the last success, and when to try again (NULL: at once).
    sa.Column("failures", sa.Integer(), nullable=False),
    sa.Column("retry_at", sa.DateTime(), nullable=True),
    sa.Column("updated_at", sa.DateTime(), nullable=False),
)
