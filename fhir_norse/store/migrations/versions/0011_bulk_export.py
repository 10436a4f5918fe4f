"""Bulk Data export jobs ($export): one row per kick-off, with its lease, progress and files

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-15 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # fhir_norse/store/bulk_tables.py
    op.create_table(
        "bulk_export_job",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("group_id", sa.String(length=64), nullable=True),
        sa.Column("request_url", sa.Text(), nullable=False),
        sa.Column("base_url", sa.String(length=1024), nullable=False),
        sa.Column("parameters", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("transaction_time", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("lease_holder", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("progress", sa.String(length=255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("output", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_bulk_export_job_state", "bulk_export_job", ["state", "lease_expires_at"])
    op.create_index("ix_bulk_export_job_expires", "bulk_export_job", ["expires_at"])


def downgrade() -> None:
    # The files of the jobs stay on disk; the sweep of a later upgrade no longer knows them.
    op.drop_index("ix_bulk_export_job_expires", table_name="bulk_export_job")
    op.drop_index("ix_bulk_export_job_state", table_name="bulk_export_job")
    op.drop_table("bulk_export_job")
