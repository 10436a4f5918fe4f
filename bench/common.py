"""Shared helpers: database URLs, schema reset, result files."""

from __future__ import annotations

import json
import os
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
