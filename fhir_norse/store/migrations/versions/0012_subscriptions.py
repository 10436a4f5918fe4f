"""topic-based Subscriptions: delivery state, outbox of events, cache generation (Subscriptions Backport)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-09 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # fhir_norse/store/subscription_tables.py
    op.create_table(
        "subscription_state",
        sa.Column("subscription_id", sa.String(length=64), nullable=False),
        sa.Column("owner_client_id", sa.String(length=255), nullable=False),
        sa.Column("owner_scopes", sa.Text(), nullable=False),
        sa.Column("headers_sealed", sa.Text(), nullable=True),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("delivered", sa.BigInteger(), nullable=False),
        sa.Column("handshake_done", sa.Boolean(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("retry_at", sa.DateTime(), nullable=False),
        sa.Column("last_sent_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id"),
    )
    op.create_table(
        "subscription_event",
        sa.Column("subscription_id", sa.String(length=64), nullable=False),
        sa.Column("event_number", sa.BigInteger(), nullable=False),
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("focus_type", sa.String(length=64), nullable=False),
        sa.Column("focus_id", sa.String(length=64), nullable=False),
        sa.Column("focus_version", sa.Integer(), nullable=False),
        sa.Column("interaction", sa.String(length=16), nullable=False),
        sa.Column("occurred_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id", "event_number"),
    )
    op.create_table(
        "subscription_generation",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    # The Subscription resources stay; their secrets and undelivered events are gone with the tables.
    op.drop_table("subscription_generation")
    op.drop_table("subscription_event")
    op.drop_table("subscription_state")
