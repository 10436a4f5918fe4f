"""lean search index: hash columns, advertised parameters only (issue 14, lever 3)

The token and reference index tables gain 64-bit hash columns (fhir_norse/store/rows.py, "hash
columns"), filled for the existing rows in batches, and their wide text indexes are replaced by narrow
ones on the hashes. Which parameters are indexed at all is the server's (fhir_norse/store/search/
advertised.py): rows of parameters no longer advertised stay until ``fhir-norse reindex`` rewrites them
(nothing reads them).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Callable
from hashlib import blake2b
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BATCH = 5000


# A copy of fhir_norse.store.rows.index_hash as of this revision: a migration must not change when the
# code it runs under does (tests/store/search/test_hash_columns.py checks the two agree).
def _hash(*parts: str | None) -> int:
    text = "\x1f".join("\x00" if p is None else p for p in parts)
    return int.from_bytes(
        blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big", signed=True
    )


def _token_hashes(row: sa.Row[Any]) -> dict[str, int]:
    pk, res_type, param, system, code = tuple(row)
    return {
        "row_pk": pk,
        "hash_identity": _hash(res_type, param),
        "hash_code": _hash(res_type, param, "", code),
        "hash_sys_code": _hash(res_type, param, "|", system, code),
    }


def _reference_hashes(row: sa.Row[Any]) -> dict[str, int | None]:
    pk, res_type, param, target_id = tuple(row)
    return {
        "row_pk": pk,
        "hash_identity": _hash(res_type, param),
        "hash_target": None if target_id is None else _hash(res_type, param, "@", target_id),
    }


def _backfill(
    table: str, columns: list[str], hashed: list[str], convert: Callable[[sa.Row[Any]], dict[str, Any]]
) -> None:
    conn = op.get_bind()
    t = sa.table(table, *(sa.column(c) for c in ["pk", *columns, *hashed]))
    update = sa.update(t).where(t.c.pk == sa.bindparam("row_pk")).values({h: sa.bindparam(h) for h in hashed})
    after = 0
    while True:
        rows = conn.execute(
            sa.select(t.c.pk, *(t.c[c] for c in columns)).where(t.c.pk > after).order_by(t.c.pk).limit(BATCH)
        ).all()
        if not rows:
            return
        conn.execute(update, [convert(r) for r in rows])
        after = rows[-1][0]


def upgrade() -> None:
    for name in ("hash_identity", "hash_code", "hash_sys_code"):
        op.add_column("idx_token", sa.Column(name, sa.BigInteger(), nullable=True))
    for name in ("hash_identity", "hash_target"):
        op.add_column("idx_reference", sa.Column(name, sa.BigInteger(), nullable=True))
    _backfill(
        "idx_token",
        ["res_type", "param", "system", "code"],
        ["hash_identity", "hash_code", "hash_sys_code"],
        _token_hashes,
    )
    _backfill(
        "idx_reference",
        ["res_type", "param", "target_id"],
        ["hash_identity", "hash_target"],
        _reference_hashes,
    )
    op.drop_index("ix_token_code", table_name="idx_token")
    op.create_index("ix_token_hash_sys_code", "idx_token", ["hash_sys_code", "resource_pk"])
    op.create_index("ix_token_hash_code", "idx_token", ["hash_code", "resource_pk"])
    op.create_index("ix_token_hash_identity", "idx_token", ["hash_identity", "resource_pk"])
    op.drop_index("ix_reference_target", table_name="idx_reference")
    op.drop_index("ix_reference_url", table_name="idx_reference")
    op.create_index("ix_reference_hash_target", "idx_reference", ["hash_target", "resource_pk"])
    op.create_index("ix_reference_hash_url", "idx_reference", ["hash_identity", "url"])


def downgrade() -> None:
    op.drop_index("ix_reference_hash_url", table_name="idx_reference")
    op.drop_index("ix_reference_hash_target", table_name="idx_reference")
    op.create_index("ix_reference_url", "idx_reference", ["res_type", "param", "url"])
    op.create_index(
        "ix_reference_target",
        "idx_reference",
        ["res_type", "param", "target_id", "target_type", "resource_pk"],
    )
    op.drop_index("ix_token_hash_identity", table_name="idx_token")
    op.drop_index("ix_token_hash_code", table_name="idx_token")
    op.drop_index("ix_token_hash_sys_code", table_name="idx_token")
    op.create_index("ix_token_code", "idx_token", ["res_type", "param", "code", "system", "resource_pk"])
    with op.batch_alter_table("idx_reference") as batch_op:
        batch_op.drop_column("hash_target")
        batch_op.drop_column("hash_identity")
    with op.batch_alter_table("idx_token") as batch_op:
        batch_op.drop_column("hash_sys_code")
        batch_op.drop_column("hash_code")
        batch_op.drop_column("hash_identity")
