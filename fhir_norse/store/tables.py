"""The storage schema: one resource table, one history table, typed search-index tables.

The resource table holds the current version of every resource (a deleted one keeps its
row with ``deleted = true`` and no body, so a later read can answer 410). The history
table has a row for every version, the current one included, but a body only for versions
that were superseded: the current body is stored once, in the resource table. Index rows
point at the resource row by its surrogate key and are rewritten in the same transaction as
the write.

Timestamps are naive UTC. Open date bounds are stored as the sentinels below, so that
range comparisons need no NULL handling.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlmodel import Field, SQLModel

DATE_MIN = datetime(1, 1, 1)
DATE_MAX = datetime(9999, 12, 31, 23, 59, 59, 999999)

# Surrogate keys: BIGINT on PostgreSQL; INTEGER on SQLite so it is the rowid alias.
PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# The resource body: JSONB on PostgreSQL, JSON text on SQLite.
BODY = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def _pk() -> Any:
    return Field(default=None, sa_column=sa.Column(PK, primary_key=True, autoincrement=True))


def _resource_fk() -> Any:
    return Field(sa_column=sa.Column(PK, sa.ForeignKey("resource.pk", ondelete="CASCADE"), nullable=False))


class ResourceRow(SQLModel, table=True):
    __tablename__ = "resource"
    __table_args__ = (
        sa.UniqueConstraint("res_type", "res_id", name="uq_resource_type_id"),
        sa.Index("ix_resource_type_updated", "res_type", "last_updated", "pk"),
        sa.Index("ix_resource_updated", "last_updated", "pk"),
    )

    pk: int | None = _pk()
    res_type: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    res_id: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    version: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    last_updated: datetime = Field(sa_column=sa.Column(sa.DateTime, nullable=False))
    deleted: bool = Field(sa_column=sa.Column(sa.Boolean, nullable=False, default=False))
    body: Any = Field(default=None, sa_column=sa.Column(BODY, nullable=True))


class HistoryRow(SQLModel, table=True):
    __tablename__ = "resource_history"
    __table_args__ = (
        sa.UniqueConstraint("res_type", "res_id", "version", name="uq_history_type_id_version"),
        sa.Index("ix_history_updated", "last_updated", "pk"),
        sa.Index("ix_history_type_updated", "res_type", "last_updated", "pk"),
    )

    pk: int | None = _pk()
    res_type: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    res_id: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    version: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    last_updated: datetime = Field(sa_column=sa.Column(sa.DateTime, nullable=False))
    # create | update | patch | delete: the Bundle.entry.request.method of a history entry.
    method: str = Field(sa_column=sa.Column(sa.String(8), nullable=False))
    deleted: bool = Field(sa_column=sa.Column(sa.Boolean, nullable=False, default=False))
    # NULL for a deletion and for the current version (its body is in ``resource``); set when a later
    # version supersedes it (fhir_norse/store/storage.py).
    body: Any = Field(default=None, sa_column=sa.Column(BODY, nullable=True))


class TokenIndex(SQLModel, table=True):
    __tablename__ = "idx_token"
    # Narrow indexes on 64-bit hashes (fhir_norse/store/rows.py, "hash columns"); searches re-check the text.
    __table_args__ = (
        sa.Index("ix_token_hash_sys_code", "hash_sys_code", "resource_pk"),
        sa.Index("ix_token_hash_code", "hash_code", "resource_pk"),
        sa.Index("ix_token_hash_identity", "hash_identity", "resource_pk"),
        sa.Index("ix_token_resource", "resource_pk"),
    )

    pk: int | None = _pk()
    resource_pk: int = _resource_fk()
    res_type: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    param: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    hash_identity: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    hash_code: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    hash_sys_code: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    system: str | None = Field(default=None, sa_column=sa.Column(sa.String(512)))
    code: str | None = Field(default=None, sa_column=sa.Column(sa.String(512)))
    text: str | None = Field(default=None, sa_column=sa.Column(sa.Text))


class StringIndex(SQLModel, table=True):
    __tablename__ = "idx_string"
    __table_args__ = (
        # Pattern ops: PostgreSQL uses the index for the prefix LIKE of string search in any collation.
        sa.Index(
            "ix_string_value",
            "res_type",
            "param",
            "value",
            "resource_pk",
            postgresql_ops={"value": "varchar_pattern_ops"},
        ),
        sa.Index("ix_string_resource", "resource_pk"),
    )

    pk: int | None = _pk()
    resource_pk: int = _resource_fk()
    res_type: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    param: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    value: str = Field(sa_column=sa.Column(sa.String(512), nullable=False))
    exact: str = Field(sa_column=sa.Column(sa.Text, nullable=False))


class DateIndex(SQLModel, table=True):
    __tablename__ = "idx_date"
    __table_args__ = (
        sa.Index("ix_date_range", "res_type", "param", "low", "high"),
        sa.Index("ix_date_resource", "resource_pk", "param"),
    )

    pk: int | None = _pk()
    resource_pk: int = _resource_fk()
    res_type: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    param: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    low: datetime = Field(sa_column=sa.Column(sa.DateTime, nullable=False))
    high: datetime = Field(sa_column=sa.Column(sa.DateTime, nullable=False))


class NumberIndex(SQLModel, table=True):
    """``number`` and ``quantity`` parameters."""

    __tablename__ = "idx_number"
    __table_args__ = (
        sa.Index("ix_number_range", "res_type", "param", "low", "high"),
        sa.Index("ix_number_resource", "resource_pk"),
    )

    pk: int | None = _pk()
    resource_pk: int = _resource_fk()
    res_type: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    param: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    value: float = Field(sa_column=sa.Column(sa.Float, nullable=False))
    low: float = Field(sa_column=sa.Column(sa.Float, nullable=False))
    high: float = Field(sa_column=sa.Column(sa.Float, nullable=False))
    system: str | None = Field(default=None, sa_column=sa.Column(sa.String(512)))
    code: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))
    unit: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))


class ReferenceIndex(SQLModel, table=True):
    __tablename__ = "idx_reference"
    __table_args__ = (
        sa.Index("ix_reference_hash_target", "hash_target", "resource_pk"),
        sa.Index("ix_reference_hash_url", "hash_identity", "url"),
        sa.Index("ix_reference_reverse", "target_type", "target_id"),
        sa.Index("ix_reference_resource", "resource_pk"),
    )

    pk: int | None = _pk()
    resource_pk: int = _resource_fk()
    res_type: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    param: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    hash_identity: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    hash_target: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    target_type: str | None = Field(default=None, sa_column=sa.Column(sa.String(64)))
    target_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(64)))
    target_version: str | None = Field(default=None, sa_column=sa.Column(sa.String(64)))
    url: str | None = Field(default=None, sa_column=sa.Column(sa.String(1024)))
    canonical_version: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))


class UriIndex(SQLModel, table=True):
    __tablename__ = "idx_uri"
    __table_args__ = (
        sa.Index(
            "ix_uri_value", "res_type", "param", "value", postgresql_ops={"value": "varchar_pattern_ops"}
        ),
        sa.Index("ix_uri_resource", "resource_pk"),
    )

    pk: int | None = _pk()
    resource_pk: int = _resource_fk()
    res_type: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    param: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    value: str = Field(sa_column=sa.Column(sa.String(1024), nullable=False))


class CompositeIndex(SQLModel, table=True):
    __tablename__ = "idx_composite"
    __table_args__ = (
        sa.Index("ix_composite_code", "res_type", "param", "c1_code"),
        sa.Index("ix_composite_resource", "resource_pk"),
    )

    pk: int | None = _pk()
    resource_pk: int = _resource_fk()
    res_type: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    param: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    c1_system: str | None = Field(default=None, sa_column=sa.Column(sa.String(512)))
    c1_code: str | None = Field(default=None, sa_column=sa.Column(sa.String(512)))
    c2_system: str | None = Field(default=None, sa_column=sa.Column(sa.String(512)))
    c2_code: str | None = Field(default=None, sa_column=sa.Column(sa.String(512)))
    c2_low: float | None = Field(default=None, sa_column=sa.Column(sa.Float))
    c2_high: float | None = Field(default=None, sa_column=sa.Column(sa.Float))
    c2_date_low: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime))
    c2_date_high: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime))
    c2_string: str | None = Field(default=None, sa_column=sa.Column(sa.String(512)))


INDEX_TABLES: tuple[sa.Table, ...] = tuple(
    m.__table__  # type: ignore[union-attr]
    for m in (TokenIndex, StringIndex, DateIndex, NumberIndex, ReferenceIndex, UriIndex, CompositeIndex)
)
METADATA = SQLModel.metadata
