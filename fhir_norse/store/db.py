"""Engines for SQLite (embedded default) and PostgreSQL.

SQLite runs in WAL mode so readers never block the writer. Write transactions start
with ``BEGIN IMMEDIATE`` so two writers queue on the database lock (up to the busy
timeout) instead of failing with SQLITE_BUSY when a read lock is upgraded; read-only
transactions start ``DEFERRED`` with ``PRAGMA query_only``, so they never take it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def is_sqlite(engine: sa.Engine) -> bool:
    return engine.dialect.name == "sqlite"


def create_engine(
    url: str, *, synchronous: str = "FULL", busy_timeout_ms: int = 30_000, pool_size: int = 10
) -> sa.Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
            connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
        )
        _configure_sqlite(engine, synchronous, busy_timeout_ms)
        return engine
    engine = sa.create_engine(
        url,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
    )
    _configure_postgresql(engine)
    return engine


def _configure_postgresql(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Short OLTP queries: the planner's cost guesses for correlated sort keys can cross
        # jit_above_cost, and compiling then costs 15-40 ms for a query that runs in 1-2 ms.
        # psycopg prepares a statement after five runs; a generic plan cannot see how selective
        # a patient id or a code is and picks scans that are 20-30 times slower on 1M rows, so
        # every execution is planned with its values (the parse is still saved).
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        with dbapi_conn.cursor() as cur:
            cur.execute("SET jit = off")
            cur.execute("SET plan_cache_mode = force_custom_plan")
        dbapi_conn.autocommit = autocommit


def _configure_sqlite(engine: sa.Engine, synchronous: str, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take over transaction control from the sqlite3 module so BEGIN is ours to choose.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        # Index values are folded already; a case-sensitive LIKE lets a prefix search use the index.
        cur.execute("PRAGMA case_sensitive_like=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        options = conn.get_execution_options()
        # A read-only transaction refuses writes (what PostgreSQL's READ ONLY does); the pragma
        # belongs to the connection, so it is switched only when the kind of transaction changes.
        query_only = bool(options.get("sqlite_query_only", False))
        if conn.info.get("query_only", False) != query_only:
            conn.exec_driver_sql(f"PRAGMA query_only = {int(query_only)}")
            conn.info["query_only"] = query_only
        conn.exec_driver_sql(f"BEGIN {options.get('sqlite_begin', 'DEFERRED')}")


# SQLite calls the progress handler every this many virtual machine instructions (well under a
# millisecond), so a time limit is enforced within about that.
_PROGRESS_STEPS = 10_000


@contextmanager
def statement_time_limit(conn: sa.Connection, seconds: float) -> Iterator[None]:
    """Cancel the statements run in the block once they take longer than ``seconds``: PostgreSQL's
    ``statement_timeout`` (``SET LOCAL``: this transaction only, each statement), SQLite's progress
    handler (the block as a whole). A cancelled statement raises what :func:`was_cancelled` tells."""
    if conn.dialect.name == "sqlite":
        raw: sqlite3.Connection = conn.connection.dbapi_connection  # type: ignore[assignment]
        deadline = time.monotonic() + seconds
        raw.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_STEPS)
        try:
            yield
        finally:
            raw.set_progress_handler(None, 0)
        return
    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}")
    yield
    # Not reached after a cancellation: the transaction is aborted then, and ends with the error.
    conn.exec_driver_sql("SET LOCAL statement_timeout TO DEFAULT")


def was_cancelled(error: sa.exc.DBAPIError) -> bool:
    """Whether ``error`` is a statement stopped by :func:`statement_time_limit`."""
    if isinstance(error.orig, sqlite3.OperationalError):
        return str(error.orig) == "interrupted"
    return getattr(error.orig, "sqlstate", None) == "57014"  # query_canceled
