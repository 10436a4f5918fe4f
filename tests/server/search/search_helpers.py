"""Test helpers for search: a private database per backend and direct inserts of index rows.

The rows are written straight into the index tables (not through the extractor) so the search
tests pin down the query side on its own. On PostgreSQL every engine works in its own schema,
because other test runs share the database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
import sqlalchemy as sa

from fhir_norse.server.search.parse import parse_search
from fhir_norse.store.rows import (
    CompositeRow,
    DateRow,
    IndexRow,
    NumberRow,
    ReferenceRow,
    StringRow,
    TokenRow,
    UriRow,
)
from fhir_norse.store.search.engine import SearchPage, StoredRow, execute_search
from fhir_norse.store.search.request import SearchRequest
from fhir_norse.store.storage import _row_values as store_row_values
from fhir_norse.store.tables import (
    METADATA,
    CompositeIndex,
    DateIndex,
    NumberIndex,
    ReferenceIndex,
    ResourceRow,
    StringIndex,
    TokenIndex,
    UriIndex,
)

PG_URL = os.environ.get("FHIR_NORSE_TEST_POSTGRES_URL")
BASE_TIME = datetime(2024, 1, 1, 12, 0, 0)

_TABLES: dict[type, sa.Table] = {
    TokenRow: TokenIndex.__table__,  # type: ignore[attr-defined]
    StringRow: StringIndex.__table__,  # type: ignore[attr-defined]
    DateRow: DateIndex.__table__,  # type: ignore[attr-defined]
    NumberRow: NumberIndex.__table__,  # type: ignore[attr-defined]
    ReferenceRow: ReferenceIndex.__table__,  # type: ignore[attr-defined]
    UriRow: UriIndex.__table__,  # type: ignore[attr-defined]
    CompositeRow: CompositeIndex.__table__,  # type: ignore[attr-defined]
}
RESOURCE: sa.Table = ResourceRow.__table__  # type: ignore[attr-defined]


@contextmanager
def sqlite_engine(directory: Path) -> Iterator[sa.Engine]:
    engine = sa.create_engine(f"sqlite:///{directory / 'search.db'}")
    METADATA.create_all(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def postgres_engine(url: str) -> Iterator[sa.Engine]:
    """An engine whose connections see only a fresh schema, dropped afterwards."""
    schema = f"t_search_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    engine = sa.create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
    try:
        METADATA.create_all(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


class Seeder:
    """Inserts resources with hand-written index rows; ``last_updated`` advances by one second."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn
        self.clock = BASE_TIME

    def add(
        self,
        res_type: str,
        res_id: str,
        *rows: IndexRow,
        last_updated: datetime | None = None,
        body: dict[str, Any] | None = None,
    ) -> int:
        if last_updated is None:
            self.clock += timedelta(seconds=1)
            last_updated = self.clock
        document = body or {"resourceType": res_type, "id": res_id}
        pk = self.conn.execute(
            sa.insert(RESOURCE)
            .values(
                res_type=res_type,
                res_id=res_id,
                version=1,
                last_updated=last_updated,
                deleted=False,
                body=document,
            )
            .returning(RESOURCE.c.pk)
        ).scalar_one()
        for row in rows:
            table = _TABLES[type(row)]
            # The store's own mapping (bounded strings, hash columns), as every write does.
            self.conn.execute(sa.insert(table).values(**store_row_values(pk, res_type, row)))
        return int(pk)

    def delete(self, res_type: str, res_id: str) -> None:
        """Delete as the store does: keep the resource row (deleted, no body), drop the index rows."""
        pk = self.conn.execute(
            sa.select(RESOURCE.c.pk).where(RESOURCE.c.res_type == res_type, RESOURCE.c.res_id == res_id)
        ).scalar_one()
        for table in _TABLES.values():
            self.conn.execute(sa.delete(table).where(table.c.resource_pk == pk))
        self.conn.execute(
            sa.update(RESOURCE)
            .where(RESOURCE.c.pk == pk)
            .values(deleted=True, body=None, version=RESOURCE.c.version + 1)
        )


def request(res_type: str, query: str, *, strict: bool = True, now: datetime | None = None) -> SearchRequest:
    return parse_search(res_type, parse_qsl(query, keep_blank_values=True), strict=strict, now=now)


def search(
    conn: sa.Connection, res_type: str, query: str = "", *, strict: bool = True, now: datetime | None = None
) -> SearchPage:
    return execute_search(conn, request(res_type, query, strict=strict, now=now))


def ids(rows: SearchPage | Sequence[StoredRow]) -> list[str]:
    """The ids of the matches (in order) of a page or of a list of stored rows."""
    items = rows.matches if isinstance(rows, SearchPage) else rows
    return [r.res_id for r in items]


def id_set(page: SearchPage) -> set[str]:
    return set(ids(page))


def body(row: StoredRow) -> dict[str, Any]:
    parsed: dict[str, Any] = orjson.loads(row.body_text)
    return parsed
