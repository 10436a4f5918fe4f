"""Topic-based Subscriptions' delivery state and outbox (Subscriptions R5 Backport IG; revision ``0011``).

https://hl7.org/fhir/uv/subscriptions-backport/. What the server must remember about each Subscription
besides the resource itself lives here, never in memory, so any worker can deliver and a crash loses
nothing:

* ``subscription_state``: one row per Subscription: the client that created it (its owner, whose scopes
  bound what a ``full-resource`` notification carries), the ``channel.header`` values **encrypted**
  (they are never part of the stored resource), the event counter (``events``: the number of the last
  event written, updated in the transaction of the change that caused it, so numbers are gapless and
  in commit order), the last event acknowledged with a 2xx (``delivered``), consecutive failures and
  when to try again, and when the last notification reached the endpoint (for heartbeats).
* ``subscription_event``: the outbox: one row per event and Subscription, written in the transaction
  of the change (its focus resource's type, id and version), kept for ``$events`` after delivery.
* ``subscription_generation``: one counter row bumped by every Subscription write, so each process
  knows cheaply when its cache of the active Subscriptions per topic is stale.

Timestamps are naive UTC, as elsewhere.
"""

from __future__ import annotations

import sqlalchemy as sa

from fhir_norse.store.tables import METADATA

__all__ = ["SUBSCRIPTION_EVENT", "SUBSCRIPTION_GENERATION", "SUBSCRIPTION_STATE"]

SUBSCRIPTION_STATE = sa.Table(
    "subscription_state",
    METADATA,
    sa.Column("subscription_id", sa.String(64), primary_key=True),
    # The client that created the Subscription and the scopes its token had.
    sa.Column("owner_client_id", sa.String(255), nullable=False),
    sa.Column("owner_scopes", sa.Text(), nullable=False),
    # The channel.header values, sealed (fhir_norse/auth/sealed.py); NULL: none.
    sa.Column("headers_sealed", sa.Text(), nullable=True),
    # Event numbers: the last written (events-since-subscription-start) and the last acknowledged.
    sa.Column("events", sa.BigInteger(), nullable=False),
    sa.Column("delivered", sa.BigInteger(), nullable=False),
    # Whether the handshake reached the endpoint for the current activation.
    sa.Column("handshake_done", sa.Boolean(), nullable=False),
    # Failed attempts since the last success, and when the next attempt is due.
    sa.Column("failures", sa.Integer(), nullable=False),
    sa.Column("retry_at", sa.DateTime(), nullable=False),
    # When a notification last reached the endpoint (NULL: never).
    sa.Column("last_sent_at", sa.DateTime(), nullable=True),
    sa.Column("updated_at", sa.DateTime(), nullable=False),
)

SUBSCRIPTION_EVENT = sa.Table(
    "subscription_event",
    METADATA,
    sa.Column("subscription_id", sa.String(64), primary_key=True),
    sa.Column("event_number", sa.BigInteger(), primary_key=True),
    sa.Column("topic", sa.String(255), nullable=False),
    sa.Column("focus_type", sa.String(64), nullable=False),
    sa.Column("focus_id", sa.String(64), nullable=False),
    sa.Column("focus_version", sa.Integer(), nullable=False),
    # create | update (the interaction that triggered the event)
    sa.Column("interaction", sa.String(16), nullable=False),
    sa.Column("occurred_at", sa.DateTime(), nullable=False),
)

SUBSCRIPTION_GENERATION = sa.Table(
    "subscription_generation",
    METADATA,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("value", sa.BigInteger(), nullable=False),
)
