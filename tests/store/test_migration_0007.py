"""Revision 0007: the personal-link tables appear on upgrade and go on downgrade (SQLite, PostgreSQL)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from fhir_norse.auth.link_tables import LINK_TABLES, PERSONAL_LINK
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine

NAMES = {t.name for t in LINK_TABLES}


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_and_downgrade(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        migrate.downgrade(engine, "0006")
        assert not NAMES & _tables(engine)
        assert "resource" in _tables(engine)

        migrate.upgrade(engine, "0007")
        assert migrate.current_revision(engine) == "0007"
        inspector = sa.inspect(engine)
        for table in LINK_TABLES:
            assert {c["name"] for c in inspector.get_columns(table.name)} == {c.name for c in table.columns}
            indexes = {i["name"]: bool(i["unique"]) for i in inspector.get_indexes(table.name)}
            assert {i.name: i.unique for i in table.indexes}.items() <= indexes.items(), table.name
        assert [fk["referred_table"] for fk in inspector.get_foreign_keys("link_session")] == [
            "personal_link"
        ]
        with engine.begin() as conn:
            conn.execute(
                sa.insert(PERSONAL_LINK).values(
                    id="l1",
                    token_hash="0" * 64,
                    task_id="t1",
                    patient_id="p1",
                    created_at=datetime(2026, 1, 1),
                    expires_at=datetime(2026, 1, 2),
                )
            )

        migrate.downgrade(engine, "0006")
        assert not NAMES & _tables(engine)
    finally:
        migrate.upgrade(engine)
        try:
            assert _tables(engine) >= NAMES
        finally:
            engine.dispose()
