"""Issue 14, lever 5: does any PostgreSQL plan depend on fresh statistics?

    python -m bench.pg_plan_bench [--responses N] [--patients P] [--window W] [--slow-ms MS]
                                  [--no-maintenance] [--json OUT]

A private database (``BENCH_F_DB``, default ``bench_f``, dropped and recreated on the server of
``BENCH_PG_URL``), migrated, every table with ``autovacuum_enabled = false``; the real app in process
(one sequential client, as :mod:`bench.ingest_bench` drives it); P Patients with an active
EpisodeOfCare, then ``ANALYZE`` once (the statistics now describe an almost empty database, as on a
server where autovacuum is off or lags), then N full-length NF 2.1 responses with scoring, round-robin
over the patients. Printed: the ingest rate per window of W responses, and every statement slower than
MS ms (its text, once, with the count and the worst time) with its plan (``EXPLAIN ANALYZE``) at the
end. ``--no-maintenance`` turns the server's own statistics upkeep off
(:mod:`fhir_norse.store.maintenance`), to see the collapse it prevents.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from bench import common
from bench.ingest_bench import bearer, build_app, create_patients, workload
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine

DB = os.environ.get("BENCH_F_DB", "bench_f")


def fresh_database() -> str:
    server = make_url(common.PG_SERVER)
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{DB}"')
    admin.dispose()
    url = server.set(database=DB).render_as_string(hide_password=False)
    engine = create_engine(url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        tables = conn.exec_driver_sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        ).scalars()
        for table in list(tables):
            conn.exec_driver_sql(f'ALTER TABLE "{table}" SET (autovacuum_enabled = false)')
    engine.dispose()
    return url


class SlowLog:
    """Statements slower than a threshold, by text: count, worst time and the parameters of the worst."""

    def __init__(self, engine: sa.Engine, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self.seen: dict[str, dict[str, Any]] = {}
        sa.event.listen(engine, "before_cursor_execute", self._before)
        sa.event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, _cursor: Any, _statement: str, _params: Any, *_rest: Any) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def _after(self, conn: Any, _cursor: Any, statement: str, params: Any, *_rest: Any) -> None:
        took = time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter())
        if took < self.threshold_s or statement.lstrip().upper().startswith(("ANALYZE", "SELECT PG_")):
            return
        entry = self.seen.setdefault(statement, {"count": 0, "worst_ms": 0.0, "params": None})
        entry["count"] += 1
        if took * 1000 > entry["worst_ms"]:
            entry["worst_ms"] = took * 1000
            entry["params"] = params


def explain(engine: sa.Engine, statement: str, params: Any) -> str:
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cur = raw.cursor()
        try:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
            text = "\n".join(str(row[0]) for row in cur.fetchall())
        finally:
            cur.close()
        conn.rollback()
    return text


def run(responses: int, patients: int, window: int, slow_ms: float, maintenance: bool) -> dict[str, Any]:
    url = fresh_database()
    os.environ["FHIR_NORSE_DB_STATISTICS_INTERVAL_S"] = "60" if maintenance else "0"
    app = build_app(url)
    engine: sa.Engine = app.state.service.storage.engine
    rates: list[dict[str, float]] = []
    with TestClient(app, raise_server_exceptions=True) as client:
        headers = bearer(app)
        ids = create_patients(client, headers, patients, "F")
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
        rng = random.Random(14)
        bodies = workload(rng, ids, -(-responses // patients))[:responses]
        slow = SlowLog(engine, slow_ms / 1000)
        started = time.perf_counter()
        t0 = started
        for index, (_depth, body) in enumerate(bodies, start=1):
            answer = client.post("/fhir/QuestionnaireResponse", content=body, headers=headers)
            if answer.status_code != 201:
                raise SystemExit(f"{answer.status_code} {answer.text[:1000]}")
            if index % window == 0:
                now = time.perf_counter()
                rate = window / (now - t0)
                rates.append({"after": index, "per_s": round(rate, 2)})
                print(f"after {index:6d}: {rate:6.1f} responses/s  slow statements so far {len(slow.seen)}")
                t0 = now
        total = time.perf_counter() - started
    plans = []
    for statement, entry in sorted(slow.seen.items(), key=lambda kv: -kv[1]["worst_ms"])[:5]:
        plans.append({**entry, "statement": statement, "params": repr(entry["params"])[:400]})
        try:
            plans[-1]["plan_now"] = explain(engine, statement, entry["params"])
        except Exception as exc:
            plans[-1]["plan_now"] = f"(not explained: {exc})"
    engine.dispose()
    return {
        "responses": responses,
        "patients": patients,
        "maintenance": maintenance,
        "overall_per_s": round(responses / total, 2),
        "rates": rates,
        "slow": plans,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--responses", type=int, default=2500)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--slow-ms", type=float, default=50.0)
    parser.add_argument("--no-maintenance", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.responses, args.patients, args.window, args.slow_ms, not args.no_maintenance)
    for entry in result["slow"]:
        print(
            f"\n-- {entry['count']} x, worst {entry['worst_ms']:.0f} ms\n"
            f"{entry['statement']}\n{entry['params']}"
        )
        print(entry["plan_now"])
    first, last = result["rates"][0]["per_s"], result["rates"][-1]["per_s"]
    print(
        f"\nrate after {result['rates'][0]['after']}: {first}/s; "
        f"after {result['rates'][-1]['after']}: {last}/s"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
