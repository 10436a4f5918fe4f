"""Database settings (issue 14, lever 5): the SQLite pragmas every connection gets, per setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from fhir_norse.config import Settings
from fhir_norse.store.db import DEFAULT_SQLITE_PRAGMAS, create_engine, sqlite_pragma_statements


def _pragma(engine: sa.Engine, name: str) -> object:
    with engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


def test_new_sqlite_connection_has_the_chosen_pragmas(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        assert _pragma(engine, "journal_mode") == "wal"
        assert _pragma(engine, "synchronous") == 2  # FULL: durable by default
        assert _pragma(engine, "page_size") == DEFAULT_SQLITE_PRAGMAS["page_size"]
        assert _pragma(engine, "cache_size") == DEFAULT_SQLITE_PRAGMAS["cache_size"]
        assert _pragma(engine, "mmap_size") == DEFAULT_SQLITE_PRAGMAS["mmap_size"]
        assert _pragma(engine, "temp_store") == 2  # MEMORY
        assert _pragma(engine, "wal_autocheckpoint") == DEFAULT_SQLITE_PRAGMAS["wal_autocheckpoint"]
        assert _pragma(engine, "busy_timeout") == 30_000
        assert _pragma(engine, "foreign_keys") == 1
    finally:
        engine.dispose()


def test_every_pooled_connection_gets_them(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        with engine.connect() as one, engine.connect() as two:
            for conn in (one, two):
                assert (
                    conn.exec_driver_sql("PRAGMA cache_size").scalar() == DEFAULT_SQLITE_PRAGMAS["cache_size"]
                )
                assert conn.exec_driver_sql("PRAGMA temp_store").scalar() == 2
    finally:
        engine.dispose()


@pytest.mark.parametrize(("setting", "expected"), [("FULL", 2), ("NORMAL", 1), ("EXTRA", 3)])
def test_synchronous_follows_the_setting(tmp_path: Path, setting: str, expected: int) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}", synchronous=setting)
    try:
        assert _pragma(engine, "synchronous") == expected
    finally:
        engine.dispose()


@pytest.mark.parametrize("mode", ["development", "production"])
def test_durable_in_every_mode_unless_chosen_otherwise(mode: str) -> None:
    settings = Settings.model_validate(
        {"mode": mode, "key_passphrase": "a passphrase long enough for production mode 123"}
    )
    assert settings.sqlite_synchronous == "FULL"


def test_page_size_applies_to_a_new_database_only(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    engine = create_engine(f"sqlite:///{path}", sqlite_pragmas={"page_size": 8192})
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    assert _pragma(engine, "page_size") == 8192
    engine.dispose()
    # An existing WAL database keeps its page size whatever a later engine asks for.
    again = create_engine(f"sqlite:///{path}", sqlite_pragmas={"page_size": 16384})
    try:
        assert _pragma(again, "page_size") == 8192
    finally:
        again.dispose()


def test_explicit_pragmas_replace_the_defaults(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}", sqlite_pragmas={"cache_size": -4096})
    try:
        assert _pragma(engine, "cache_size") == -4096
        assert _pragma(engine, "mmap_size") == 0  # SQLite's default: not asked for
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "pragmas", [{"cache_size": "1; DROP TABLE resource"}, {"temp_store": "DISK"}, {"x; y": 1}]
)
def test_pragma_values_are_checked(pragmas: dict[str, int | str]) -> None:
    with pytest.raises(ValueError):
        sqlite_pragma_statements(pragmas)


def test_synchronous_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        create_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}", synchronous="FULL; DROP TABLE resource")
