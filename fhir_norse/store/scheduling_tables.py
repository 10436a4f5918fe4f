"""The scheduler's own state: its lease, the messages it still has to send, and every sending attempt
(issue 15; revision ``0008``).

What the scheduler and the dispatcher must remember across restarts and between workers lives here,
in the database, never in memory:

* ``scheduler_lease``: one row per named job; the worker whose ``holder`` is written there and whose
  ``expires_at`` lies ahead runs the job. Taken with one ``UPDATE ... WHERE expires_at < now OR
  holder = me`` (atomic on SQLite and PostgreSQL alike).
* ``message_dispatch``: one row per ``CommunicationRequest`` the server has to send, with when it is due
  and how many attempts it has made (the retry backoff).
* ``message_attempt``: one row per sending attempt (one ``Communication``). It is committed as
  ``sending`` *before* the gateway is called, so an attempt found still ``sending`` after a crash is
  known to have possibly reached the gateway and is never repeated.

Timestamps are naive UTC, as elsewhere.
"""

from __future__ import annotations

import sqlalchemy as sa

from fhir_norse.store.tables import METADATA

__all__ = ["MESSAGE_ATTEMPT", "MESSAGE_DISPATCH", "SCHEDULER_LEASE"]

SCHEDULER_LEASE = sa.Table(
    "scheduler_lease",
    METADATA,
    sa.Column("name", sa.String(32), primary_key=True),
    # "<pid>-<random>" of the worker holding the lease ("" when nobody has taken it yet).
    sa.Column("holder", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.DateTime(), nullable=False),
)

MESSAGE_DISPATCH = sa.Table(
    "message_dispatch",
    METADATA,
    # The CommunicationRequest's id.
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=False),
    # invitation | reminder
    sa.Column("kind", sa.String(16), nullable=False),
    # pending (waits for due_at) | sending (an attempt is with the gateway) | done | revoked
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("due_at", sa.DateTime(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Index("ix_message_dispatch_state_due", "state", "due_at"),
)

MESSAGE_ATTEMPT = sa.Table(
    "message_attempt",
    METADATA,
    # The Communication's id (also in the delivery report's callback URL).
    sa.Column("communication_id", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    # sending | sent | failed | unknown | settled
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("channel", sa.String(8), nullable=False),
    sa.Column("provider", sa.String(32), nullable=True),
    sa.Column("message_id", sa.String(255), nullable=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("updated_at", sa.DateTime(), nullable=False),
    sa.UniqueConstraint("request_id", "attempt", name="uq_message_attempt_request"),
    sa.Index("ix_message_attempt_state", "state", "created_at"),
)
