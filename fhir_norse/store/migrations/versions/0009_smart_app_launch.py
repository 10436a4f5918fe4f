"""SMART App Launch: apps, sign-in sessions, authorization requests, codes, refresh tokens, launches

``auth_client`` gains ``kind`` (backend / public / confidential-asymmetric), ``redirect_uris`` and
``launch_types``; existing clients are backend clients. New tables (see
:mod:`fhir_norse.auth.smart_tables`): ``auth_session`` (a person signed in through a national login),
``auth_request`` (an authorization on its way through sign-in and consent), ``auth_grant`` (a token
family), ``auth_code``, ``auth_refresh`` and ``auth_launch``. Only hashes of secrets are stored. The
downgrade drops them (every app session and refresh token ends) and the client columns.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 16:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("auth_client") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=32), nullable=False, server_default="backend"))
        batch.add_column(sa.Column("redirect_uris", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("launch_types", sa.JSON(), nullable=False, server_default="[]"))
    op.create_table(
        "auth_session",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("person", sa.String(length=128), nullable=False),
        sa.Column("auth_time", sa.DateTime(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_auth_session_secret_hash", "auth_session", ["secret_hash"], unique=True)
    op.create_table(
        "auth_request",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("login_state", sa.String(length=64), nullable=True),
        sa.Column("login_nonce", sa.String(length=64), nullable=True),
        sa.Column("login_verifier", sa.String(length=128), nullable=True),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("encounter_id", sa.String(length=64), nullable=True),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_auth_request_secret_hash", "auth_request", ["secret_hash"], unique=True)
    op.create_index("ux_auth_request_login_state", "auth_request", ["login_state"], unique=True)
    op.create_table(
        "auth_grant",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("person", sa.String(length=128), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("session_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_reason", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_auth_grant_revoked", "auth_grant", ["revoked_at"])
    op.create_index("ix_auth_grant_session", "auth_grant", ["session_id"])
    op.create_table(
        "auth_code",
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("grant_id", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("redirect_uri", sa.Text(), nullable=False),
        sa.Column("code_challenge", sa.String(length=128), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("context", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["grant_id"], ["auth_grant.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("code_hash"),
    )
    op.create_table(
        "auth_refresh",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("grant_id", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("context", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("rotated_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["grant_id"], ["auth_grant.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_index("ix_auth_refresh_grant", "auth_refresh", ["grant_id"])
    op.create_table(
        "auth_launch",
        sa.Column("handle_hash", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("encounter_id", sa.String(length=64), nullable=True),
        sa.Column("practitioner_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("handle_hash"),
    )


def downgrade() -> None:
    op.drop_table("auth_launch")
    op.drop_index("ix_auth_refresh_grant", table_name="auth_refresh")
    op.drop_table("auth_refresh")
    op.drop_table("auth_code")
    op.drop_index("ix_auth_grant_session", table_name="auth_grant")
    op.drop_index("ix_auth_grant_revoked", table_name="auth_grant")
    op.drop_table("auth_grant")
    op.drop_index("ux_auth_request_login_state", table_name="auth_request")
    op.drop_index("ux_auth_request_secret_hash", table_name="auth_request")
    op.drop_table("auth_request")
    op.drop_index("ux_auth_session_secret_hash", table_name="auth_session")
    op.drop_table("auth_session")
    with op.batch_alter_table("auth_client") as batch:
        batch.drop_column("launch_types")
        batch.drop_column("redirect_uris")
        batch.drop_column("kind")
