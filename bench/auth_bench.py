"""Issue 3 benchmark: the cost of authorization per request.

- token verification (``TokenVerifier.verify``) with the key set cached in memory: a token seen
  for the first time (signature checked) and the same token again (verified-token cache);
- the audit write: storing one BALP AuditEvent in its own committed transaction, as every read
  and search does (``FhirService.record_now``), on SQLite and PostgreSQL.

    python -m bench.auth_bench [--n 2000]

Prints a JSON object and a Markdown table (figures in ms per call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench import common
from fhir_norse.api.app import create_app
from fhir_norse.auth.caller import Caller
from fhir_norse.config import Settings
from fhir_norse.server.context import RequestContext
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine

AUDIENCE = "http://127.0.0.1:8080/fhir"


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered) * 1000, 4),
        "p99": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 4),
        "mean": round(statistics.fmean(ordered) * 1000, 4),
    }


def _app(url: str) -> Any:
    engine = create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return create_app(Settings(database_url=url, base_url=AUDIENCE, mode="development"))


def verification(app: Any, n: int) -> dict[str, Any]:
    service, verifier = app.state.token_service, app.state.token_verifier
    tokens = [
        "Bearer "
        + service.issue(subject="bench", client_id="bench", scope="system/*.cruds", audience=AUDIENCE)[0]
        for _ in range(n)
    ]
    verifier.verify(tokens[0], AUDIENCE)  # key set loaded and cached
    first, again = [], []
    for token in tokens[1:]:
        t0 = time.perf_counter()
        verifier.verify(token, AUDIENCE)
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        verifier.verify(token, AUDIENCE)
        again.append(time.perf_counter() - t0)
    return {"first_sight": _percentiles(first), "cached": _percentiles(again)}


def audit_write(app: Any, n: int) -> dict[str, Any]:
    service = app.state.service
    ctx = RequestContext(
        caller=Caller(client_id="bench", scopes=frozenset({"system/*.cruds"}), token_id="j1"),
        base_url=AUDIENCE,
        source_address="127.0.0.1",
        request_id="bench",
    )
    build, write = [], []
    for i in range(n):
        t0 = time.perf_counter()
        # What the repository builds for a successful read (``Repository.audit``).
        event = service.audit.event(
            interaction="read",
            outcome="success",
            caller=ctx.caller,
            resource_type="Observation",
            resource_id=f"obs-{i}",
            version="1",
            patients=["pat-1"],
            source_address=ctx.source_address,
            request_id=ctx.request_id,
        )
        t1 = time.perf_counter()
        service.record_now(event)
        t2 = time.perf_counter()
        build.append(t1 - t0)
        write.append(t2 - t1)
    return {"build_event": _percentiles(build), "store_and_commit": _percentiles(write)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = _app(f"sqlite:///{Path(tmp) / 'auth.sqlite3'}")
        results["verify"] = verification(sqlite, args.n)
        results["audit_sqlite"] = audit_write(sqlite, args.n)
        sqlite.state.service.storage.engine.dispose()
    admin = sa.create_engine(common.PG_SERVER, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS bench_auth CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA bench_auth")
    pg = _app(f"{common.PG_SERVER}?options=-csearch_path%3Dbench_auth")
    results["audit_postgresql"] = audit_write(pg, args.n)
    pg.state.service.storage.engine.dispose()
    with admin.connect() as conn:
        conn.exec_driver_sql("DROP SCHEMA bench_auth CASCADE")
    admin.dispose()
    print(json.dumps(results, indent=1))
    v, a, p = results["verify"], results["audit_sqlite"], results["audit_postgresql"]
    print("\n| Measure | p50 ms | p99 ms |\n|---|---|---|")
    print(
        f"| token verification, first sight (signature) | {v['first_sight']['p50']} "
        f"| {v['first_sight']['p99']} |"
    )
    print(f"| token verification, cached | {v['cached']['p50']} | {v['cached']['p99']} |")
    for name, r in (("SQLite", a), ("PostgreSQL", p)):
        print(
            f"| audit: build the AuditEvent ({name}) | {r['build_event']['p50']} "
            f"| {r['build_event']['p99']} |"
        )
        print(
            f"| audit: store + commit ({name}) | {r['store_and_commit']['p50']} "
            f"| {r['store_and_commit']['p99']} |"
        )


if __name__ == "__main__":
    main()
