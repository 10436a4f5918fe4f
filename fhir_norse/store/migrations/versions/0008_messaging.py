"""the scheduler's lease and message dispatch state (issue 15)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # fhir_norse/store/scheduling_tables.py: one scheduler tick at a time across workers, the messages
    # still to send, and every attempt (recorded as "sending" before the gateway is called).
    op.create_table(
        "scheduler_lease",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "message_dispatch",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("due_at", sa.DateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_index("ix_message_dispatch_state_due", "message_dispatch", ["state", "due_at"])
    op.create_table(
        "message_attempt",
        sa.Column("communication_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=True),
        sa.Column("message_id", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("communication_id"),
        sa.UniqueConstraint("request_id", "attempt", name="uq_message_attempt_request"),
    )
    op.create_index("ix_message_attempt_state", "message_attempt", ["state", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_message_attempt_state", table_name="message_attempt")
    op.drop_table("message_attempt")
    op.drop_index("ix_message_dispatch_state_due", table_name="message_dispatch")
    op.drop_table("message_dispatch")
    op.drop_table("scheduler_lease")
