"""the feedback report's PDF documents: which DiagnosticReport version has one (issue 17)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # fhir_norse/store/document_tables.py: per rom-report DiagnosticReport, the version carrying its PDF.
    op.create_table(
        "report_document",
        sa.Column("report_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document_id", sa.String(length=64), nullable=True),
        sa.Column("binary_id", sa.String(length=64), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("retry_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("report_id"),
    )


def downgrade() -> None:
    # The documents themselves (Binary, DocumentReference, presentedForm) stay; an upgrade renders the
    # reports again, each under a new version of its DiagnosticReport.
    op.drop_table("report_document")
