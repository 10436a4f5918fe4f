"""Planner statistics kept fresh by the server itself (PostgreSQL).

PostgreSQL plans from statistics that only ``ANALYZE`` refreshes; autovacuum runs it, but a server may
run with autovacuum off or lagging. A table whose rows changed by more than :data:`ANALYZE_SHARE` of its
size (plus :data:`ANALYZE_BASE` rows) since its last analyze (``pg_stat_user_tables.n_mod_since_analyze``,
counted whether autovacuum runs or not) is analyzed again:

* by :func:`analyze_stale`, one check: a query of the statistics views, then ``ANALYZE`` of the stale
  tables of the current schema, in one process at a time (a session advisory lock, tried, never waited
  for: a worker that finds it taken skips the round);
* by a :class:`StatisticsKeeper`, a daemon thread that runs the check every ``interval`` seconds on a
  connection of its own (opened and closed per check), and ends once the server's engine is gone.

``ANALYZE`` takes a lock that neither reads nor writes wait for. On SQLite nothing is done: its planner
does not depend on statistics that go stale (there are none unless ``ANALYZE`` is run, and the server
never runs it).
"""

from __future__ import annotations

import logging
import threading
import weakref

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

# Analyze a table once rows changed since its last analyze exceed ANALYZE_BASE + ANALYZE_SHARE x rows
# (autovacuum's defaults are 50 + 10 %; a larger base spares the tiny tables).
ANALYZE_SHARE = 0.10
ANALYZE_BASE = 1000
DEFAULT_INTERVAL_S = 60.0
# pg_try_advisory_lock key of the check (session level, released after it): "fhirstat" as a bigint.
LOCK_KEY = 0x6668697273746174

_STALE = sa.text(
    """
    SELECT s.relname
    FROM pg_stat_user_tables s
    JOIN pg_class c ON c.oid = s.relid
    WHERE s.schemaname = current_schema()
      AND s.n_mod_since_analyze > :base + :share * greatest(c.reltuples, 0)
    ORDER BY s.relname
    """
)


def stale_tables(conn: sa.Connection, *, share: float = ANALYZE_SHARE, base: int = ANALYZE_BASE) -> list[str]:
    """Tables of the current schema whose statistics are older than the changes since (PostgreSQL)."""
    return [str(name) for name in conn.execute(_STALE, {"share": share, "base": base}).scalars()]


def analyze_stale(
    engine: sa.Engine, *, share: float = ANALYZE_SHARE, base: int = ANALYZE_BASE
) -> list[str] | None:
    """Analyze the stale tables (see the module doc); the tables analyzed, or None when another process
    holds the check's lock (or on SQLite)."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as raw:
        conn = raw.execution_options(isolation_level="AUTOCOMMIT")
        if not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar_one():
            return None
        try:
            tables = stale_tables(conn, share=share, base=base)
            for table in tables:
                quoted = conn.dialect.identifier_preparer.quote(table)
                conn.exec_driver_sql(f"ANALYZE {quoted}")
            return tables
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})


class StatisticsKeeper:
    """Runs :func:`analyze_stale` every ``interval`` seconds in a daemon thread (PostgreSQL only).

    It holds the server's engine weakly and checks through an engine of its own without a pool (one
    connection per check, closed after it), so it keeps no connection open between checks and stops
    when the server's engine is collected or :meth:`stop` is called."""

    def __init__(
        self,
        engine: sa.Engine,
        interval: float = DEFAULT_INTERVAL_S,
        *,
        share: float = ANALYZE_SHARE,
        base: int = ANALYZE_BASE,
    ) -> None:
        self.interval = interval
        self.share = share
        self.base = base
        self._engine = weakref.ref(engine)
        self._url = engine.url
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StatisticsKeeper:
        engine = self._engine()
        if engine is None or engine.dialect.name != "postgresql" or self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="fhir-norse-statistics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self._engine() is None:
                return
            own = sa.create_engine(self._url, poolclass=NullPool)
            try:
                analyzed = analyze_stale(own, share=self.share, base=self.base)
                if analyzed:
                    log.info("statistics refreshed: ANALYZE %s", ", ".join(analyzed))
            except sa.exc.SQLAlchemyError as exc:
                log.warning("statistics check failed: %s", exc)
            finally:
                own.dispose()
