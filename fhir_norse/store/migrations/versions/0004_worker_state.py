"""state shared by server workers (issue 14, lever 2)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rate-limit counters of every worker (fhir_norse.auth.ratelimit.SharedRateLimiter): one row per
    # limiter, key and fixed window, incremented by an atomic upsert.
    op.create_table(
        "auth_rate_window",
        sa.Column("limiter", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("slot", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("limiter", "key", "slot"),
    )


def downgrade() -> None:
    op.drop_table("auth_rate_window")
