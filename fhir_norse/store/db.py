"""Engines for SQLite (embedded default) and PostgreSQL.

SQLite runs in WAL mode so readers never block the writer. Write transactions start
with ``BEGIN IMMEDIATE`` so two writers queue on the database lock (up to the busy
timeout) instead of failing with SQLITE_BUSY when a read lock is upgraded; read-only
transactions start ``DEFERRED`` with ``PRAGMA query_only``, so they never take it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Mapping
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


# SQLite settings every connection gets (besides WAL, ``synchronous`` and the busy timeout), chosen by
# bench/db_settings_bench.py (figures in BENCHMARKS.md). ``page_size`` takes effect only when the
# database file is created (it is set before anything else touches it).
DEFAULT_SQLITE_PRAGMAS: dict[str, int | str] = {
    "page_size": 4096,
    # Per connection, in KiB when negative: the hot index pages stay in the process.
    "cache_size": -32_768,
    # Reads through a memory map of the file instead of read() calls (shared by the connections and
    # the workers, and reclaimable: the kernel's page cache). Pages past the map are read into each
    # connection's own cache instead: with 256 MiB, once the database outgrew it, the caches filled
    # and emptied (a write elsewhere resets them) 32 MiB at a time and left a 1-worker server 400 MB
    # of fragmented heap in 20 s of the mixed soak (BENCHMARKS.md, "Soak memory"). Just under
    # SQLite's usual compile-time ceiling (0x7fff0000), which would lower a bigger value silently.
    "mmap_size": 2000 * 1024 * 1024,
    # Sorts and temporary b-trees of a search in memory, not in temporary files.
    "temp_store": "MEMORY",
    # Checkpoint the WAL after this many pages (SQLite's default): a larger WAL slows readers.
    "wal_autocheckpoint": 1000,
}
_SQLITE_PRAGMA_VALUE = {"temp_store": ("DEFAULT", "FILE", "MEMORY")}
# psycopg prepares a statement on a connection after it ran this many times (psycopg's default);
# None turns server-side prepared statements off.
DEFAULT_PREPARE_THRESHOLD: int | None = 5


def create_engine(
    url: str,
    *,
    synchronous: str = "FULL",
    busy_timeout_ms: int = 30_000,
    pool_size: int = 5,
    sqlite_pragmas: Mapping[str, int | str] | None = None,
    prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD,
    pool_pre_ping: bool = True,
) -> sa.Engine:
    """An engine on ``url``. SQLite: ``synchronous`` (FULL by default: durable, see
    :func:`_configure_sqlite`) and ``sqlite_pragmas`` (default :data:`DEFAULT_SQLITE_PRAGMAS`) on every
    connection. PostgreSQL: a pool of ``pool_size`` connections (and as many more under a burst) per
    process, statements prepared after ``prepare_threshold`` runs."""
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
        pragmas = dict(DEFAULT_SQLITE_PRAGMAS if sqlite_pragmas is None else sqlite_pragmas)
        _configure_sqlite(engine, synchronous, busy_timeout_ms, pragmas)
        return engine
    engine = sa.create_engine(
        url,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pool_pre_ping,
        connect_args={"prepare_threshold": prepare_threshold},
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


def sqlite_pragma_statements(pragmas: Mapping[str, int | str]) -> list[str]:
    """``PRAGMA name=value`` for each setting, values checked (they are spliced into SQL)."""
    out = []
    for name, value in pragmas.items():
        if not name.isidentifier():
            raise ValueError(f"not a pragma name: {name!r}")
        if name in _SQLITE_PRAGMA_VALUE:
            if str(value).upper() not in _SQLITE_PRAGMA_VALUE[name]:
                raise ValueError(f"PRAGMA {name}: {value!r}")
            out.append(f"PRAGMA {name}={str(value).upper()}")
        else:
            out.append(f"PRAGMA {name}={int(value)}")
    return out


def _configure_sqlite(
    engine: sa.Engine, synchronous: str, busy_timeout_ms: int, pragmas: Mapping[str, int | str]
) -> None:
    """Every connection: WAL, ``synchronous``, the busy timeout, foreign keys and ``pragmas``.

    Durability in WAL: ``synchronous=FULL`` syncs the WAL file at every commit, so a transaction that
    committed survives a power cut as well as a killed process. ``NORMAL`` syncs only at checkpoints: the
    database stays consistent and a killed process (kill -9) loses nothing, since the commit is in the WAL
    in the operating system's cache, but a power cut or OS crash may undo the last commits. ``EXTRA``
    also syncs the directory. FULL is the default; NORMAL is a setting an operator chooses.
    """
    if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"PRAGMA synchronous: {synchronous!r}")
    statements = sqlite_pragma_statements(pragmas)
    page_size = [s for s in statements if s.startswith("PRAGMA page_size=")]
    others = [s for s in statements if not s.startswith("PRAGMA page_size=")]

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take over transaction control from the sqlite3 module so BEGIN is ours to choose.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # Before anything writes the file's header (no effect on an existing database).
        for statement in page_size:
            cur.execute(statement)
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        # Index values are folded already; a case-sensitive LIKE lets a prefix search use the index.
        cur.execute("PRAGMA case_sensitive_like=ON")
        for statement in others:
            cur.execute(statement)
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
