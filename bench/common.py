"""Shared helpers: database URLs, schema reset, result files, percentiles, the code measured."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SQLITE_PATH = Path(os.environ.get("BENCH_SQLITE_PATH", str(ROOT / "var" / "bench" / "bench.sqlite3")))
PG_SERVER = os.environ.get("BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_SCHEMA = os.environ.get("BENCH_PG_SCHEMA", "bench")


def database_url(kind: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{SQLITE_PATH}"
    if kind == "postgresql":
        return f"{PG_SERVER}?options=-csearch_path%3D{PG_SCHEMA}"
    raise ValueError(kind)


def reset(kind: str) -> None:
    """Drop and recreate the benchmark database (SQLite file, or PostgreSQL schema ``bench``)."""
    if kind == "sqlite":
        SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{SQLITE_PATH}{suffix}").unlink(missing_ok=True)
        return
    engine = sa.create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
        conn.exec_driver_sql(f"CREATE SCHEMA {PG_SCHEMA}")
    engine.dispose()


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def percentiles(samples_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds (nearest-rank)."""
    if not samples_s:
        return {}
    xs = sorted(samples_s)
    n = len(xs)

    def rank(p: float) -> float:
        return xs[min(n - 1, max(0, round(p / 100 * n + 0.5) - 1))] * 1000

    return {
        "n": n,
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": xs[-1] * 1000,
        "mean": sum(xs) / n * 1000,
    }


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def quantile(xs: Sequence[float], p: float) -> float:
    """The p-th percentile by nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def stats_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """n, p50/p95/p99 (nearest rank), max and mean, in ms."""
    if not samples_s:
        return {"n": 0}
    return {
        "n": len(samples_s),
        "p50": quantile(samples_s, 50) * 1000,
        "p95": quantile(samples_s, 95) * 1000,
        "p99": quantile(samples_s, 99) * 1000,
        "max": max(samples_s) * 1000,
        "mean": statistics.fmean(samples_s) * 1000,
    }


def code_version() -> dict[str, Any]:
    """The commit measured and the server files changed in the working tree at the start."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.rstrip()
        except OSError:
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "subject": git("log", "-1", "--format=%s"),
        "changed": [ln[3:] for ln in git("status", "--porcelain", "--", "fhir_norse").splitlines()],
    }


def analyze(kind: str, engine: sa.Engine, *, checkpoint: bool = False) -> None:
    """Fresh planner statistics after a bulk load: ``ANALYZE`` on SQLite (and, with ``checkpoint``, the
    WAL folded into the database file), ``VACUUM ANALYZE`` of the resource and index tables on
    PostgreSQL (what autovacuum would do on a live server)."""
    from fhir_norse.store.tables import INDEX_TABLES

    if kind == "sqlite":
        raw = engine.raw_connection()  # autocommit (the engine leaves BEGIN to us)
        try:
            cur = raw.cursor()
            cur.execute("ANALYZE")
            if checkpoint:
                cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            cur.close()
        finally:
            raw.close()
    else:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in ("resource", "resource_history", *(t.name for t in INDEX_TABLES)):
                conn.exec_driver_sql(f"VACUUM ANALYZE {PG_SCHEMA}.{table}")
