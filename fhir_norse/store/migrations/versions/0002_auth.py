"""authorization server: signing keys, backend clients, used assertion ids

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_signing_key",
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("alg", sa.String(length=16), nullable=False),
        sa.Column("private_key_pem", sa.Text(), nullable=False),
        sa.Column("public_jwk", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("retire_after", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("kid"),
    )
    op.create_table(
        "auth_client",
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("jwks", sa.JSON(), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("client_id"),
    )
    op.create_table(
        "auth_used_jti",
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("jti", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["client_id"], ["auth_client.client_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("client_id", "jti"),
    )
    with op.batch_alter_table("auth_used_jti", schema=None) as batch_op:
        batch_op.create_index("ix_auth_used_jti_expires", ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("auth_used_jti", schema=None) as batch_op:
        batch_op.drop_index("ix_auth_used_jti_expires")
    op.drop_table("auth_used_jti")
    op.drop_table("auth_client")
    op.drop_table("auth_signing_key")
