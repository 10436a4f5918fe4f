"""Alembic: one head; upgrade and downgrade work on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa

from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from fhir_norse.store.tables import METADATA


def test_single_head() -> None:
    assert len(migrate.heads()) == 1


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        assert migrate.current_revision(engine) == migrate.heads()[0]
        inspector = sa.inspect(engine)
        tables = set(inspector.get_table_names())
        assert set(METADATA.tables) <= tables
        for name, table in METADATA.tables.items():
            columns = {c["name"] for c in inspector.get_columns(name)}
            assert columns == {c.name for c in table.columns}, name
            indexes = {i["name"] for i in inspector.get_indexes(name)}
            assert {i.name for i in table.indexes} <= indexes, name
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_again(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        migrate.downgrade(engine, "base")
        assert "resource" not in sa.inspect(engine).get_table_names()
        migrate.upgrade(engine)
        assert "resource" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
