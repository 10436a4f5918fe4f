"""personal links and their browser sessions (issue 15)

``personal_link``: one row per link sent to a patient for one Task (only the token's SHA-256 is
stored); ``link_session``: the short browser sessions a link opens (only the secret's SHA-256, and
the pending one-time code's). See :mod:`fhir_norse.auth.link_tables`. The downgrade drops both
(every link sent so far stops working).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "personal_link",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_personal_link_token_hash", "personal_link", ["token_hash"], unique=True)
    op.create_index("ix_personal_link_task", "personal_link", ["task_id"])
    op.create_table(
        "link_session",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("link_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("language", sa.String(length=16), nullable=True),
        sa.Column("code_hash", sa.String(length=64), nullable=True),
        sa.Column("code_expires_at", sa.DateTime(), nullable=True),
        sa.Column("code_tries", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["link_id"], ["personal_link.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_link_session_secret_hash", "link_session", ["secret_hash"], unique=True)
    op.create_index("ix_link_session_link", "link_session", ["link_id"])


def downgrade() -> None:
    op.drop_index("ix_link_session_link", table_name="link_session")
    op.drop_index("ux_link_session_secret_hash", table_name="link_session")
    op.drop_table("link_session")
    op.drop_index("ix_personal_link_task", table_name="personal_link")
    op.drop_index("ux_personal_link_token_hash", table_name="personal_link")
    op.drop_table("personal_link")
