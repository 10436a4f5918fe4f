"""bodies stored once: history keeps superseded versions (issue 14, lever 4)

The current version's body is stored in ``resource`` only; its ``resource_history`` row keeps the
version's key, method and timestamps with no body until a later write supersedes it
(:mod:`fhir_norse.store.storage`). Upgrading empties the body of every history row that duplicates
the current version; downgrading copies it back. Both run in batches of history keys, so that no
single statement rewrites the whole table. On SQLite the freed pages are reused by later writes (the
file shrinks only with ``VACUUM``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BATCH = 5_000

# The history row of the current version: same type, id and version as a resource row.
_CURRENT = (
    "SELECT {what} FROM resource r WHERE r.res_type = resource_history.res_type "
    "AND r.res_id = resource_history.res_id AND r.version = resource_history.version"
)
_UPGRADE = sa.text(
    "UPDATE resource_history SET body = NULL "
    "WHERE pk > :low AND pk <= :high AND body IS NOT NULL AND EXISTS (" + _CURRENT.format(what="1") + ")"
)
_DOWNGRADE = sa.text(
    "UPDATE resource_history SET body = (" + _CURRENT.format(what="r.body") + ") "
    "WHERE pk > :low AND pk <= :high AND body IS NULL AND deleted = false"
)


def _in_batches(statement: sa.TextClause) -> None:
    conn = op.get_bind()
    low, high = conn.execute(sa.text("SELECT min(pk), max(pk) FROM resource_history")).one()
    if low is None:
        return
    start = int(low) - 1
    while start < int(high):
        conn.execute(statement, {"low": start, "high": start + BATCH})
        start += BATCH


def upgrade() -> None:
    _in_batches(_UPGRADE)


def downgrade() -> None:
    _in_batches(_DOWNGRADE)
