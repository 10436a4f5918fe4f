"""audit trail as narrow append-only rows (issue 14, lever 1)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 09:00:00.000000

``audit_log`` (one row per recorded access, what the AuditEvent is rendered from) and
``audit_patient`` (one row per patient concerned). AuditEvents stored as resources so far move into
``audit_log`` with their body in ``legacy_body`` and leave ``resource``, ``resource_history`` and the
``idx_*`` tables. The downgrade drops the new tables (events recorded since are not converted back).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op

from fhir_norse.store.audit_tables import legacy_columns

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_INDEX_TABLES = (
    "idx_token",
    "idx_string",
    "idx_date",
    "idx_number",
    "idx_reference",
    "idx_uri",
    "idx_composite",
)
_BATCH = 500


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("pk", _PK, autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("recorded", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("interaction", sa.String(length=80), nullable=True),
        sa.Column("outcome", sa.String(length=2), nullable=False),
        sa.Column("action", sa.String(length=1), nullable=True),
        sa.Column("client", sa.String(length=256), nullable=True),
        sa.Column("user_ref", sa.String(length=200), nullable=True),
        sa.Column("jti", sa.String(length=256), nullable=True),
        sa.Column("address", sa.String(length=256), nullable=True),
        sa.Column("entity_type", sa.String(length=64), nullable=True),
        sa.Column("entity_id", sa.String(length=64), nullable=True),
        sa.Column("entity_version", sa.String(length=64), nullable=True),
        sa.Column("patients", sa.Text(), nullable=True),
        sa.Column("query", sa.Text(), nullable=True),
        sa.Column("extra", sa.JSON(), nullable=True),
        sa.Column("legacy_body", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index("ux_audit_log_id", "audit_log", ["id"], unique=True)
    op.create_index("ix_audit_log_recorded", "audit_log", ["recorded", "pk"])
    op.create_index("ix_audit_log_entity", "audit_log", ["entity_type", "entity_id"])
    op.create_index("ix_audit_log_user", "audit_log", ["user_ref"])
    op.create_index("ix_audit_log_client", "audit_log", ["client"])
    op.create_index("ix_audit_log_jti", "audit_log", ["jti"])
    op.create_table(
        "audit_patient",
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("audit_pk", _PK, autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint("patient_id", "audit_pk"),
    )
    _move_audit_events(op.get_bind())


def _recorded(body: dict[str, Any], fallback: datetime) -> datetime:
    text = body.get("recorded")
    if isinstance(text, str):
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return fallback
        return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment
    return fallback


def _move_audit_events(conn: sa.Connection) -> None:
    """Each stored AuditEvent (current version: they are never changed) into ``audit_log``, in batches."""
    resource = sa.table(
        "resource",
        sa.column("pk", sa.Integer),
        sa.column("res_type", sa.String),
        sa.column("res_id", sa.String),
        sa.column("last_updated", sa.DateTime),
        sa.column("body", sa.JSON),
    )
    log = sa.table(
        "audit_log",
        *(
            sa.column(name)
            for name in (
                "id",
                "recorded",
                "kind",
                "interaction",
                "outcome",
                "action",
                "client",
                "user_ref",
                "jti",
                "address",
                "entity_type",
                "entity_id",
                "entity_version",
                "patients",
            )
        ),
        sa.column("legacy_body", sa.JSON),
        sa.column("pk", sa.Integer),
    )
    patient = sa.table("audit_patient", sa.column("patient_id"), sa.column("audit_pk"))
    after = -1
    while True:
        rows = conn.execute(
            sa.select(resource.c.pk, resource.c.res_id, resource.c.last_updated, resource.c.body)
            .where(resource.c.res_type == "AuditEvent", resource.c.pk > after)
            .order_by(resource.c.pk)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        after = rows[-1].pk
        for row in rows:
            body = row.body if isinstance(row.body, dict) else orjson.loads(row.body or "null")
            if not isinstance(body, dict):
                continue
            columns, patients = legacy_columns(body)
            values = {
                "id": row.res_id,
                "recorded": _recorded(body, row.last_updated),
                "legacy_body": body,
                **columns,
            }
            pk = conn.execute(sa.insert(log).values(values).returning(log.c.pk)).scalar_one()
            if patients:
                conn.execute(sa.insert(patient), [{"patient_id": p, "audit_pk": pk} for p in patients])
    for name in _INDEX_TABLES:
        conn.execute(sa.text(f"DELETE FROM {name} WHERE res_type = 'AuditEvent'"))
    conn.execute(sa.text("DELETE FROM resource_history WHERE res_type = 'AuditEvent'"))
    conn.execute(sa.text("DELETE FROM resource WHERE res_type = 'AuditEvent'"))


def downgrade() -> None:
    op.drop_table("audit_patient")
    op.drop_index("ix_audit_log_jti", table_name="audit_log")
    op.drop_index("ix_audit_log_client", table_name="audit_log")
    op.drop_index("ix_audit_log_user", table_name="audit_log")
    op.drop_index("ix_audit_log_entity", table_name="audit_log")
    op.drop_index("ix_audit_log_recorded", table_name="audit_log")
    op.drop_index("ux_audit_log_id", table_name="audit_log")
    op.drop_table("audit_log")
