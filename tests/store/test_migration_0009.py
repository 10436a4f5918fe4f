"""Revision 0009: the SMART App Launch tables and the app columns of auth_client appear on upgrade and
go on downgrade; existing clients become backend clients (SQLite, PostgreSQL)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from fhir_norse.auth.smart_tables import SMART_TABLES
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine

NAMES = {t.name for t in SMART_TABLES}
APP_COLUMNS = {"kind", "redirect_uris", "launch_types"}


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def _client_columns(engine: sa.Engine) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns("auth_client")}


def test_upgrade_and_downgrade(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        migrate.downgrade(engine, "0008")
        assert not NAMES & _tables(engine) and not APP_COLUMNS & _client_columns(engine)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO auth_client (client_id, name, jwks, scopes, created_at) "
                    "VALUES ('c1', 'EHR', '{\"keys\": []}', 'system/*.rs', :at)"
                ),
                {"at": datetime(2026, 1, 1)},
            )
        migrate.upgrade(engine, "0009")
        assert migrate.current_revision(engine) == "0009"
        inspector = sa.inspect(engine)
        for table in SMART_TABLES:
            assert {c["name"] for c in inspector.get_columns(table.name)} == {c.name for c in table.columns}
            indexes = {i["name"]: bool(i["unique"]) for i in inspector.get_indexes(table.name)}
            assert {i.name: i.unique for i in table.indexes}.items() <= indexes.items(), table.name
        with engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT kind, redirect_uris FROM auth_client WHERE client_id = 'c1'")
            ).one()
        assert row.kind == "backend" and row.redirect_uris in ([], "[]")
        migrate.downgrade(engine, "0008")
        assert not NAMES & _tables(engine) and not APP_COLUMNS & _client_columns(engine)
    finally:
        migrate.upgrade(engine)
        try:
            assert _tables(engine) >= NAMES
        finally:
            engine.dispose()
