"""Tables of SMART App Launch (issue 16): the people's sign-in sessions at this server, the
authorization requests in flight, authorization codes, refresh tokens and the grants (token
families) they belong to, and EHR launch handles.

Like the personal links, these are credentials, not clinical records: rows of their own, never FHIR
resources. Only SHA-256 hashes (hex) of every secret a browser or an app holds are stored (session
cookie, code, refresh token, launch handle), so a copy of the database opens nothing. A national
identity number or HPR number is never stored: only the Patient or Practitioner it matched.

They live in :data:`fhir_norse.store.tables.METADATA` beside the other tables and are created by the
Alembic revision ``0009``, which also adds the app columns of ``auth_client``. Timestamps are naive UTC.
"""

from __future__ import annotations

import sqlalchemy as sa

from fhir_norse.store.tables import METADATA

__all__ = [
    "AUTH_CODE",
    "AUTH_GRANT",
    "AUTH_LAUNCH",
    "AUTH_REFRESH",
    "AUTH_REQUEST",
    "AUTH_SESSION",
    "SMART_TABLES",
]

# A person signed in at this server through a national login (short, server-side, sliding).
AUTH_SESSION = sa.Table(
    "auth_session",
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    # SHA-256 (hex) of the secret in the browser's sign-in cookie.
    sa.Column("secret_hash", sa.String(64), nullable=False),
    # "patient" (citizen login) or "clinician" (health-sector login).
    sa.Column("role", sa.String(16), nullable=False),
    # The login provider's name in the settings, and its subject (``sub``) for the person.
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("subject", sa.String(255), nullable=False),
    # What the verified identity matched here: "Patient/<id>" or "Practitioner/<id>".
    sa.Column("person", sa.String(128), nullable=False),
    sa.Column("auth_time", sa.DateTime(), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("expires_at", sa.DateTime(), nullable=False),
    sa.Column("ended_at", sa.DateTime(), nullable=True),
    sa.Index("ux_auth_session_secret_hash", "secret_hash", unique=True),
)

# One /auth/authorize request on its way through sign-in, patient choice and consent.
AUTH_REQUEST = sa.Table(
    "auth_request",
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    # SHA-256 (hex) of the secret in the browser's request cookie (binds the steps to one browser).
    sa.Column("secret_hash", sa.String(64), nullable=False),
    # The ``state`` sent to the login provider (random; matched on its callback), its ``nonce`` and
    # our PKCE verifier towards it.
    sa.Column("login_state", sa.String(64), nullable=True),
    sa.Column("login_nonce", sa.String(64), nullable=True),
    sa.Column("login_verifier", sa.String(128), nullable=True),
    # The app's request, as checked: client_id, redirect_uri, scope, state, code_challenge, nonce,
    # launch context (JSON object).
    sa.Column("client_id", sa.String(64), nullable=False),
    sa.Column("params", sa.JSON(), nullable=False),
    # "patient" or "clinician": who must sign in.
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("session_id", sa.String(64), nullable=True),
    # The patient in context once known (launch, the person themself, or the clinician's choice).
    sa.Column("patient_id", sa.String(64), nullable=True),
    sa.Column("encounter_id", sa.String(64), nullable=True),
    # "login", "pick", "consent", "done", "refused".
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("expires_at", sa.DateTime(), nullable=False),
    sa.Index("ux_auth_request_secret_hash", "secret_hash", unique=True),
    sa.Index("ux_auth_request_login_state", "login_state", unique=True),
)

# A grant: everything issued from one authorization (its code, its refresh tokens and their access
# tokens, which carry the grant id). Revoking the grant revokes the whole family.
AUTH_GRANT = sa.Table(
    "auth_grant",
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("client_id", sa.String(64), nullable=False),
    sa.Column("person", sa.String(128), nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=True),
    # The sign-in session an online_access grant lives no longer than.
    sa.Column("session_id", sa.String(64), nullable=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("revoked_at", sa.DateTime(), nullable=True),
    sa.Column("revoked_reason", sa.String(255), nullable=True),
    sa.Index("ix_auth_grant_revoked", "revoked_at"),
    sa.Index("ix_auth_grant_session", "session_id"),
)

# A short-lived, single-use authorization code.
AUTH_CODE = sa.Table(
    "auth_code",
    METADATA,
    sa.Column("code_hash", sa.String(64), primary_key=True),
    sa.Column("grant_id", sa.String(64), sa.ForeignKey("auth_grant.id", ondelete="CASCADE"), nullable=False),
    sa.Column("client_id", sa.String(64), nullable=False),
    sa.Column("redirect_uri", sa.Text(), nullable=False),
    sa.Column("code_challenge", sa.String(128), nullable=False),
    # Granted scopes (space-separated), and the launch context the token response carries (JSON).
    sa.Column("scope", sa.Text(), nullable=False),
    sa.Column("context", sa.JSON(), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("expires_at", sa.DateTime(), nullable=False),
    sa.Column("used_at", sa.DateTime(), nullable=True),
)

# A refresh token; rotated on every use (the old one is marked, and a second use of it revokes the grant).
AUTH_REFRESH = sa.Table(
    "auth_refresh",
    METADATA,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("grant_id", sa.String(64), sa.ForeignKey("auth_grant.id", ondelete="CASCADE"), nullable=False),
    sa.Column("client_id", sa.String(64), nullable=False),
    sa.Column("scope", sa.Text(), nullable=False),
    sa.Column("context", sa.JSON(), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("expires_at", sa.DateTime(), nullable=False),
    sa.Column("rotated_at", sa.DateTime(), nullable=True),
    sa.Index("ix_auth_refresh_grant", "grant_id"),
)

# An EHR launch handle (POST /auth/launch): the EHR's patient, encounter and clinician for one app launch.
AUTH_LAUNCH = sa.Table(
    "auth_launch",
    METADATA,
    sa.Column("handle_hash", sa.String(64), primary_key=True),
    # The backend client (the EHR) that created it, and the app it is for (NULL: any registered app).
    sa.Column("created_by", sa.String(64), nullable=False),
    sa.Column("client_id", sa.String(64), nullable=True),
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("encounter_id", sa.String(64), nullable=True),
    sa.Column("practitioner_id", sa.String(64), nullable=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("expires_at", sa.DateTime(), nullable=False),
    sa.Column("used_at", sa.DateTime(), nullable=True),
)

SMART_TABLES: tuple[sa.Table, ...] = (
    AUTH_SESSION,
    AUTH_REQUEST,
    AUTH_GRANT,
    AUTH_CODE,
    AUTH_REFRESH,
    AUTH_LAUNCH,
)
