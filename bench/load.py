"""Load the synthetic set (``bench.dataset``) into a database, timing it and its peak memory.

    python -m bench.load sqlite|postgresql [--patients N] [--per-patient M] [--batch 1000]
                         [--validate all|sample|none] [--mode uow|bulk] [--out FILE]

The schema is dropped and recreated first (SQLite: ``var/bench/bench.sqlite3``; PostgreSQL:
schema ``bench``) with the real Alembic migrations. Every resource goes through the server's
write preparation: ``stamp_meta`` then the real index extractor (``default_extractor``).

``--mode uow`` (default) stores each resource with ``UnitOfWork.save``, exactly the server's
write path (resource row, history row, index rows), ``--batch`` resources per transaction.
``--mode bulk`` writes the same rows (same ``_row_values`` mapping) with one multi-row INSERT
per table per batch: the cost of a dedicated bulk importer.

``--validate all`` runs ``validate_resource`` on every resource as the server does;
``sample`` validates the first 1,000 and every 100th after (the set is generated from one
template per type, so this checks the shapes while keeping the load time down); ``none``.

ANALYZE runs at the end (PostgreSQL: VACUUM ANALYZE of the benchmark tables).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Any

import sqlalchemy as sa

from bench import common, dataset
from fhir_norse.server.resources import now_ms, stamp_meta
from fhir_norse.server.search.extract import default_extractor
from fhir_norse.server.validation import validate_resource
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from fhir_norse.store.storage import _INDEX_TABLE, H, R, Storage, _row_values


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _bulk_batch(conn: sa.Connection, batch: list[tuple[str, str, dict[str, Any], Any, list[Any]]]) -> None:
    res = conn.execute(
        sa.insert(R).returning(R.c.pk, sort_by_parameter_order=True),
        [
            {"res_type": t, "res_id": i, "version": 1, "last_updated": lu, "deleted": False, "body": b}
            for t, i, b, lu, _ in batch
        ],
    )
    pks = [row[0] for row in res]
    conn.execute(
        sa.insert(H),
        [
            {
                "res_type": t,
                "res_id": i,
                "version": 1,
                "last_updated": lu,
                "method": "create",
                "deleted": False,
                # The current version's body is stored in ``resource`` only (issue 14).
                "body": None,
            }
            for t, i, _b, lu, _ in batch
        ],
    )
    grouped: dict[sa.Table, list[dict[str, Any]]] = {}
    for pk, (t, _i, _b, _lu, rows) in zip(pks, batch, strict=True):
        for row in rows:
            grouped.setdefault(_INDEX_TABLE[type(row)], []).append(_row_values(pk, t, row))
    for table, values in grouped.items():
        conn.execute(sa.insert(table), values)


def load(
    kind: str,
    patients: int,
    per_patient: int,
    batch_size: int = 1000,
    validate: str = "sample",
    mode: str = "uow",
    progress_every: int = 50_000,
) -> dict[str, Any]:
    url = common.database_url(kind)
    started = time.perf_counter()
    common.reset(kind)
    engine = create_engine(url)
    migrate.upgrade(engine)
    repo = Storage(engine)
    extractor = default_extractor()
    total = patients * (1 + per_patient)
    timings = {"validate": 0.0, "stamp_extract": 0.0, "store": 0.0}
    counts = {"resources": 0, "validated": 0, "index_rows": 0}
    t_load = time.perf_counter()
    last_report = t_load

    def prepared(
        chunk: list[tuple[str, str, dict[str, Any]]],
    ) -> list[tuple[str, str, dict[str, Any], Any, list[Any]]]:
        out: list[tuple[str, str, dict[str, Any], Any, list[Any]]] = []
        for res_type, res_id, body in chunk:
            n = counts["resources"] + len(out)
            if validate == "all" or (validate == "sample" and (n < 1000 or n % 100 == 0)):
                t0 = time.perf_counter()
                validate_resource(body, expected_type=res_type)
                timings["validate"] += time.perf_counter() - t0
                counts["validated"] += 1
            t0 = time.perf_counter()
            lu = now_ms()
            stamped = stamp_meta(body, res_id, 1, lu)
            rows = extractor.extract(stamped)
            timings["stamp_extract"] += time.perf_counter() - t0
            counts["index_rows"] += len(rows)
            out.append((res_type, res_id, stamped, lu, rows))
        return out

    def store(items: list[tuple[str, str, dict[str, Any], Any, list[Any]]]) -> None:
        t0 = time.perf_counter()
        with repo.write() as uow:
            if mode == "bulk":
                _bulk_batch(uow.conn, items)
            else:
                for res_type, res_id, stamped, lu, rows in items:
                    uow.save(
                        res_type=res_type,
                        res_id=res_id,
                        body=stamped,
                        version=1,
                        last_updated=lu,
                        method="create",
                        previous=None,
                        index_rows=rows,
                    )
        timings["store"] += time.perf_counter() - t0

    chunk: list[tuple[str, str, dict[str, Any]]] = []
    for item in dataset.generate(patients, per_patient):
        chunk.append(item)
        if len(chunk) >= batch_size:
            store(prepared(chunk))
            counts["resources"] += len(chunk)
            chunk = []
            if counts["resources"] % progress_every < batch_size or time.perf_counter() - last_report > 60:
                last_report = time.perf_counter()
                el = last_report - t_load
                print(
                    f"[load {kind}] {counts['resources']:,}/{total:,} in {el:.0f} s "
                    f"({counts['resources'] / el:,.0f}/s), peak RSS {peak_rss_mb():.0f} MB",
                    flush=True,
                )
    if chunk:
        store(prepared(chunk))
        counts["resources"] += len(chunk)
    load_s = time.perf_counter() - t_load

    t0 = time.perf_counter()
    common.analyze(kind, engine, checkpoint=True)
    analyze_s = time.perf_counter() - t0

    with engine.connect() as conn:
        if kind == "sqlite":
            size = common.SQLITE_PATH.stat().st_size
        else:
            size = conn.exec_driver_sql(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = %(s)s AND c.relkind = 'r'",
                {"s": common.PG_SCHEMA},
            ).scalar_one()
        table_rows = {
            t: conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one()
            for t in ("resource", "idx_token", "idx_reference", "idx_date", "idx_number", "idx_composite")
        }
    engine.dispose()
    result = {
        "database": kind,
        "patients": patients,
        "per_patient": per_patient,
        "resources": counts["resources"],
        "batch": batch_size,
        "mode": mode,
        "validate": validate,
        "validated": counts["validated"],
        "index_rows": counts["index_rows"],
        "table_rows": table_rows,
        "load_s": load_s,
        "analyze_s": analyze_s,
        "total_s": time.perf_counter() - started,
        "rate_per_s": counts["resources"] / load_s,
        "phases_s": timings,
        "peak_rss_mb": peak_rss_mb(),
        "db_bytes": int(size or 0),
    }
    print(
        f"[load {kind}] done: {counts['resources']:,} resources in {load_s:.1f} s "
        f"({result['rate_per_s']:,.0f}/s), ANALYZE {analyze_s:.1f} s, "
        f"peak RSS {result['peak_rss_mb']:.0f} MB, "
        f"phases { ({k: round(v, 1) for k, v in timings.items()}) }",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load")
    p.add_argument("database", choices=["sqlite", "postgresql"])
    p.add_argument("--patients", type=int, default=10_000)
    p.add_argument("--per-patient", type=int, default=100)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--validate", choices=["all", "sample", "none"], default="sample")
    p.add_argument("--mode", choices=["uow", "bulk"], default="uow")
    p.add_argument("--out", help="result JSON file name under bench/results/")
    args = p.parse_args(argv)
    result = load(args.database, args.patients, args.per_patient, args.batch, args.validate, args.mode)
    path = common.write_json(args.out or f"load-{args.database}.json", result)
    print(f"[load {args.database}] results in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
