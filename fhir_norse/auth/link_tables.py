"""Tables of the patient's personal links and the short browser sessions they open (issue 15).

Links and sessions are access credentials, not clinical records, so they are rows of their own
rather than FHIR resources (:mod:`fhir_norse.auth.links`). Only SHA-256 hashes of the link token,
the session secret and the one-time code are stored: a copy of the database opens nothing.

They live in :data:`fhir_norse.store.tables.METADATA` beside the other tables and are created by the
Alembic revision ``0007``. Timestamps are naive UTC, as elsewhere.
"""

from __future__ import annotations

import sqlalchemy as sa

from fhir_norse.store.tables import METADATA

__all__ = ["LINK_SESSION", "LINK_TABLES", "PERSONAL_LINK"]

PERSONAL_LINK = sa.Table(
    "personal_link",
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    # SHA-256 (hex) of the token sent to the patient.
    sa.Column("token_hash", sa.String(64), nullable=False),
    # The Task the link answers, and the patient it is for (Task.for).
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("expires_at", sa.DateTime(), nullable=False),
    sa.Column("revoked_at", sa.DateTime(), nullable=True),
    # The Task was answered: the link is used up.
    sa.Column("completed_at", sa.DateTime(), nullable=True),
    sa.Index("ux_personal_link_token_hash", "token_hash", unique=True),
    sa.Index("ix_personal_link_task", "task_id"),
)

LINK_SESSION = sa.Table(
    "link_session",
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    # SHA-256 (hex) of the secret in the browser's cookie.
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column(
        "link_id",
        sa.String(64),
        sa.ForeignKey("personal_link.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    # Slides forward with use, never past the link's own expiry.
    sa.Column("expires_at", sa.DateTime(), nullable=False),
    # The site's second step (date of birth, one-time code) passed, or none is configured.
    sa.Column("verified", sa.Boolean(), nullable=False),
    # The language the patient chose ("nb", "en"); NULL: not chosen yet.
    sa.Column("language", sa.String(16), nullable=True),
    # The pending one-time code: SHA-256 (hex) of the session id and the code, its expiry, the
    # guesses made at it.
    sa.Column("code_hash", sa.String(64), nullable=True),
    sa.Column("code_expires_at", sa.DateTime(), nullable=True),
    sa.Column("code_tries", sa.Integer(), nullable=False),
    sa.Index("ux_link_session_secret_hash", "secret_hash", unique=True),
    sa.Index("ix_link_session_link", "link_id"),
)

LINK_TABLES: tuple[sa.Table, ...] = (PERSONAL_LINK, LINK_SESSION)
