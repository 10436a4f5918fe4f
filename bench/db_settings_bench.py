"""Issue 14, lever 5: database settings, each candidate measured on the repository's own statements.

    python -m bench.db_settings_bench [--database sqlite|postgres|both] [--writes N] [--reads N]

Per candidate, a fresh database (SQLite: a file under ``var/bench/settings/``; PostgreSQL: the database
``BENCH_F_SETTINGS_DB``, default ``bench_f_settings``, on the server of ``BENCH_PG_URL``), migrated with
the candidate's engine (so a page size applies), then:

* writes/s: N Observations, each saved with its search-index rows in a write transaction of its own
  (one commit each, so the cost of ``synchronous`` shows);
* reads/s: N reads by id of random stored Observations, each in a read-only transaction, one thread;
* reads/s (4 threads): the same split over four threads (pool contention, WAL readers).

Every candidate runs once per round (``--rounds``, the order reversed every other round, since the
machine is shared); one Markdown row per candidate with the medians. No server code is changed:
the candidates are arguments of
:func:`fhir_norse.store.db.create_engine`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from bench import common
from fhir_norse.server.search.extract import default_extractor
from fhir_norse.store import migrate
from fhir_norse.store.db import DEFAULT_SQLITE_PRAGMAS, create_engine
from fhir_norse.store.storage import Storage

SQLITE_DIR = common.ROOT / "var" / "bench" / "settings"
PG_DB = os.environ.get("BENCH_F_SETTINGS_DB", "bench_f_settings")

BASELINE_SQLITE: dict[str, int | str] = {}  # the settings before issue 14: SQLite's defaults
SQLITE_CANDIDATES: dict[str, dict[str, int | str]] = {
    "defaults (before)": BASELINE_SQLITE,
    "cache 32 MB": {"cache_size": -32768},
    "mmap 256 MB": {"mmap_size": 256 * 1024 * 1024},
    "temp_store memory": {"temp_store": "MEMORY"},
    "page 8 KB": {"page_size": 8192},
    "page 16 KB": {"page_size": 16384},
    "wal_autocheckpoint 4000": {"wal_autocheckpoint": 4000},
    "chosen (DEFAULT_SQLITE_PRAGMAS)": dict(DEFAULT_SQLITE_PRAGMAS),
}


def observation(patient: str, i: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": str(uuid.uuid4()),
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": f"{8000 + i % 40}-{i % 10}"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T10:00:00Z",
        "valueQuantity": {
            "value": i % 300,
            "unit": "kg",
            "system": "http://unitsofmeasure.org",
            "code": "kg",
        },
        "note": [{"text": "x" * 600}],
    }


def measure(engine: sa.Engine, writes: int, reads: int) -> dict[str, float]:
    storage = Storage(engine)
    extractor = default_extractor()
    ids: list[str] = []
    rng = random.Random(14)
    bodies = [observation(f"p{i % 200}", i) for i in range(writes)]
    started = time.perf_counter()
    for body in bodies:
        with storage.write() as uow:
            uow.save(
                res_type="Observation",
                res_id=body["id"],
                body=body,
                version=1,
                last_updated=datetime.now(UTC).replace(tzinfo=None),
                method="create",
                previous=None,
                index_rows=extractor.extract(body),
            )
        ids.append(body["id"])
    write_s = time.perf_counter() - started

    def read(n: int, seed: int) -> None:
        local = random.Random(seed)
        for _ in range(n):
            with storage.read_only() as uow:
                found = uow.current("Observation", local.choice(ids))
                assert found is not None

    started = time.perf_counter()
    read(reads, rng.randint(0, 1 << 30))
    read_s = time.perf_counter() - started
    threads = [threading.Thread(target=read, args=(reads // 4, k)) for k in range(4)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read4_s = time.perf_counter() - started
    return {
        "writes_per_s": round(writes / write_s, 1),
        "reads_per_s": round(reads / read_s, 1),
        "reads4_per_s": round((reads // 4) * 4 / read4_s, 1),
    }


def sqlite_candidate(sync: str, pragmas: dict[str, int | str], writes: int, reads: int) -> dict[str, float]:
    SQLITE_DIR.mkdir(parents=True, exist_ok=True)
    path = SQLITE_DIR / "candidate.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    engine = create_engine(f"sqlite:///{path}", synchronous=sync, sqlite_pragmas=pragmas)
    migrate.upgrade(engine)
    figures = measure(engine, writes, reads)
    engine.dispose()
    return figures


def median_rows(runs: dict[str, list[dict[str, float]]]) -> list[tuple[str, dict[str, float]]]:
    out = []
    for name, figures in runs.items():
        row = {k: statistics.median(f[k] for f in figures) for k in figures[0]}
        out.append((name, row))
        print(f"| {name} | {row['writes_per_s']} | {row['reads_per_s']} | {row['reads4_per_s']} |")
    return out


def sqlite_run(
    writes: int, reads: int, synchronous: Sequence[str], rounds: int
) -> list[tuple[str, dict[str, float]]]:
    """Every candidate once per round, the order reversed every other round; the median of the rounds."""
    cases = [(s, n, p) for s in synchronous for n, p in SQLITE_CANDIDATES.items()]
    runs: dict[str, list[dict[str, float]]] = {}
    for r in range(rounds):
        for sync, name, pragmas in cases if r % 2 == 0 else reversed(cases):
            figures = sqlite_candidate(sync, pragmas, writes, reads)
            runs.setdefault(f"SQLite synchronous={sync}, {name}", []).append(figures)
    return median_rows(runs)


PG_CANDIDATES: dict[str, dict[str, Any]] = {
    "no prepared statements, pool 10 (before)": {"prepare_threshold": None, "pool_size": 10},
    "prepare after 5 runs (psycopg default), pool 10": {"prepare_threshold": 5, "pool_size": 10},
    "prepare after 1 run, pool 10": {"prepare_threshold": 1, "pool_size": 10},
    "prepare after 5 runs, pool 4": {"prepare_threshold": 5, "pool_size": 4},
    "prepare after 5 runs, pool 10, no pre-ping": {
        "prepare_threshold": 5,
        "pool_size": 10,
        "pool_pre_ping": False,
    },
    "chosen (defaults)": {},
}


def pg_run(writes: int, reads: int, rounds: int) -> list[tuple[str, dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {}
    for r in range(rounds):
        names = list(PG_CANDIDATES) if r % 2 == 0 else list(reversed(PG_CANDIDATES))
        for name in names:
            runs.setdefault(f"PostgreSQL, {name}", []).append(
                pg_candidate(PG_CANDIDATES[name], writes, reads)
            )
    return median_rows(runs)


def pg_candidate(kwargs: dict[str, Any], writes: int, reads: int) -> dict[str, float]:
    server = make_url(common.PG_SERVER)
    url = server.set(database=PG_DB).render_as_string(hide_password=False)
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{PG_DB}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{PG_DB}"')
    admin.dispose()
    engine = create_engine(url, **kwargs)
    migrate.upgrade(engine)
    figures = measure(engine, writes, reads)
    engine.dispose()
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--reads", type=int, default=8000)
    parser.add_argument("--synchronous", nargs="+", default=["FULL", "NORMAL"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print("| candidate | writes/s | reads/s (1 thread) | reads/s (4 threads) |\n|---|---|---|---|")
    if args.database in ("sqlite", "both"):
        sqlite_run(args.writes, args.reads, args.synchronous, args.rounds)
    if args.database in ("postgres", "both"):
        pg_run(args.writes, args.reads, args.rounds)


if __name__ == "__main__":
    main()
