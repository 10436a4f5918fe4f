"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 05:37:37.676395
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "resource",
        sa.Column(
            "pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("res_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.DateTime(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column(
            "body",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("res_type", "res_id", name="uq_resource_type_id"),
    )
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.create_index("ix_resource_type_updated", ["res_type", "last_updated", "pk"], unique=False)
        batch_op.create_index("ix_resource_updated", ["last_updated", "pk"], unique=False)

    op.create_table(
        "resource_history",
        sa.Column(
            "pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("res_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.DateTime(), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column(
            "body",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("res_type", "res_id", "version", name="uq_history_type_id_version"),
    )
    with op.batch_alter_table("resource_history", schema=None) as batch_op:
        batch_op.create_index("ix_history_type_updated", ["res_type", "last_updated", "pk"], unique=False)
        batch_op.create_index("ix_history_updated", ["last_updated", "pk"], unique=False)

    op.create_table(
        "idx_composite",
        sa.Column(
            "pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("resource_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("c1_system", sa.String(length=512), nullable=True),
        sa.Column("c1_code", sa.String(length=512), nullable=True),
        sa.Column("c2_system", sa.String(length=512), nullable=True),
        sa.Column("c2_code", sa.String(length=512), nullable=True),
        sa.Column("c2_low", sa.Float(), nullable=True),
        sa.Column("c2_high", sa.Float(), nullable=True),
        sa.Column("c2_date_low", sa.DateTime(), nullable=True),
        sa.Column("c2_date_high", sa.DateTime(), nullable=True),
        sa.Column("c2_string", sa.String(length=512), nullable=True),
        sa.ForeignKeyConstraint(["resource_pk"], ["resource.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
    )
    with op.batch_alter_table("idx_composite", schema=None) as batch_op:
        batch_op.create_index("ix_composite_code", ["res_type", "param", "c1_code"], unique=False)
        batch_op.create_index("ix_composite_resource", ["resource_pk"], unique=False)

    op.create_table(
        "idx_date",
        sa.Column(
            "pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("resource_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("low", sa.DateTime(), nullable=False),
        sa.Column("high", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["resource_pk"], ["resource.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
    )
    with op.batch_alter_table("idx_date", schema=None) as batch_op:
        batch_op.create_index("ix_date_range", ["res_type", "param", "low", "high"], unique=False)
        batch_op.create_index("ix_date_resource", ["resource_pk", "param"], unique=False)

    op.create_table(
        "idx_number",
        sa.Column(
            "pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("resource_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("low", sa.Float(), nullable=False),
        sa.Column("high", sa.Float(), nullable=False),
        sa.Column("system", sa.String(length=512), nullable=True),
        sa.Column("code", sa.String(length=128), nullable=True),
        sa.Column("unit", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(["resource_pk"], ["resource.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
    )
    with op.batch_alter_table("idx_number", schema=None) as batch_op:
        batch_op.create_index("ix_number_range", ["res_type", "param", "low", "high"], unique=False)
        batch_op.create_index("ix_number_resource", ["resource_pk"], unique=False)

    op.create_table(
        "idx_reference",
        sa.Column(
            "pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("resource_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=64), nullable=True),
        sa.Column("target_id", sa.String(length=64), nullable=True),
        sa.Column("target_version", sa.String(length=64), nullable=True),
        sa.Column("url", sa.String(length=1024), nullable=True),
        sa.Column("canonical_version", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(["resource_pk"], ["resource.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
    )
    with op.batch_alter_table("idx_reference", schema=None) as batch_op:
        batch_op.create_index("ix_reference_resource", ["resource_pk"], unique=False)
        batch_op.create_index("ix_reference_reverse", ["target_type", "target_id"], unique=False)
        batch_op.create_index(
            "ix_reference_target",
            ["res_type", "param", "target_id", "target_type", "resource_pk"],
            unique=False,
        )
        batch_op.create_index("ix_reference_url", ["res_type", "param", "url"], unique=False)

    op.create_table(
        "idx_string",
        sa.Column(
            "pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("resource_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=512), nullable=False),
        sa.Column("exact", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["resource_pk"], ["resource.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
    )
    with op.batch_alter_table("idx_string", schema=None) as batch_op:
        batch_op.create_index("ix_string_resource", ["resource_pk"], unique=False)
        batch_op.create_index(
            "ix_string_value",
            ["res_type", "param", "value", "resource_pk"],
            unique=False,
            postgresql_ops={"value": "varchar_pattern_ops"},
        )

    op.create_table(
        "idx_token",
        sa.Column(
            "pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("resource_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("system", sa.String(length=512), nullable=True),
        sa.Column("code", sa.String(length=512), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["resource_pk"], ["resource.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
    )
    with op.batch_alter_table("idx_token", schema=None) as batch_op:
        batch_op.create_index(
            "ix_token_code", ["res_type", "param", "code", "system", "resource_pk"], unique=False
        )
        batch_op.create_index("ix_token_resource", ["resource_pk"], unique=False)

    op.create_table(
        "idx_uri",
        sa.Column(
            "pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("resource_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=1024), nullable=False),
        sa.ForeignKeyConstraint(["resource_pk"], ["resource.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pk"),
    )
    with op.batch_alter_table("idx_uri", schema=None) as batch_op:
        batch_op.create_index("ix_uri_resource", ["resource_pk"], unique=False)
        batch_op.create_index(
            "ix_uri_value",
            ["res_type", "param", "value"],
            unique=False,
            postgresql_ops={"value": "varchar_pattern_ops"},
        )


def downgrade() -> None:

    with op.batch_alter_table("idx_uri", schema=None) as batch_op:
        batch_op.drop_index("ix_uri_value")
        batch_op.drop_index("ix_uri_resource")

    op.drop_table("idx_uri")
    with op.batch_alter_table("idx_token", schema=None) as batch_op:
        batch_op.drop_index("ix_token_resource")
        batch_op.drop_index("ix_token_code")

    op.drop_table("idx_token")
    with op.batch_alter_table("idx_string", schema=None) as batch_op:
        batch_op.drop_index("ix_string_value")
        batch_op.drop_index("ix_string_resource")

    op.drop_table("idx_string")
    with op.batch_alter_table("idx_reference", schema=None) as batch_op:
        batch_op.drop_index("ix_reference_url")
        batch_op.drop_index("ix_reference_target")
        batch_op.drop_index("ix_reference_reverse")
        batch_op.drop_index("ix_reference_resource")

    op.drop_table("idx_reference")
    with op.batch_alter_table("idx_number", schema=None) as batch_op:
        batch_op.drop_index("ix_number_resource")
        batch_op.drop_index("ix_number_range")

    op.drop_table("idx_number")
    with op.batch_alter_table("idx_date", schema=None) as batch_op:
        batch_op.drop_index("ix_date_resource")
        batch_op.drop_index("ix_date_range")

    op.drop_table("idx_date")
    with op.batch_alter_table("idx_composite", schema=None) as batch_op:
        batch_op.drop_index("ix_composite_resource")
        batch_op.drop_index("ix_composite_code")

    op.drop_table("idx_composite")
    with op.batch_alter_table("resource_history", schema=None) as batch_op:
        batch_op.drop_index("ix_history_updated")
        batch_op.drop_index("ix_history_type_updated")

    op.drop_table("resource_history")
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.drop_index("ix_resource_updated")
        batch_op.drop_index("ix_resource_type_updated")

    op.drop_table("resource")
