"""Issue 12, item 19: does a read hold up writes? (SQLite ran every read in a write transaction.)

    python -m bench.read_audit_bench sqlite|postgresql [--patients 2000] [--per-patient 50]
        [--clients 20] [--seconds 20] [--database PATH-OR-SCHEMA] [--no-load] [--out FILE]

Loads ``bench.dataset`` (bulk mode) into its own database (SQLite ``var/bench/read-audit.sqlite3``,
PostgreSQL schema ``bench_read_audit``), starts ``fhir-norse serve`` on it (``bench.http_bench.Server``)
and measures over HTTP:

1. **A slow search against creates.** One client runs a search that takes seconds (three sort keys and
   an accurate total over every Observation); 0.2 s later a second client sends creates one after the
   other until the search has answered. Reported: the search's time, and the latency of the creates
   sent while it ran (the first one's is how long a write was held up by the read).
2. **Mixed load.** ``--clients`` clients at once for ``--seconds``, each a loop of a read by id (50 %),
   a patient's newest Observations (30 %) and a create (20 %). Reported: p50/p95/p99/max per kind and
   the requests per second; and the AuditEvents written against the requests answered (a read answered
   must be a read recorded).

Run it from a tree with ``PYTHONPATH=<tree>`` to measure that tree's server (``--no-load --database``
to reuse a database loaded before, so two trees are measured on the same data).
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from bench import common, dataset, load
from bench.http_bench import Server

FHIR_JSON = {"Content-Type": "application/fhir+json"}
SLOW_SEARCH = {
    "value-quantity": "ne5",
    "_sort": "-value-quantity,date,code",
    "_total": "accurate",
    "_count": "10",
}


def _audit_events(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        count = conn.execute(
            sa.text("SELECT count(*) FROM resource WHERE res_type = 'AuditEvent'")
        ).scalar_one()
    engine.dispose()
    return int(count)


def _client(server: Server) -> httpx.Client:
    return httpx.Client(
        base_url=server.base, headers={"Authorization": f"Bearer {server.token}"}, timeout=300
    )


def _new_observation(rng: random.Random, patients: int) -> dict[str, Any]:
    return dataset.observation(dataset.patient_id(rng.randrange(patients)), rng)


def slow_search_against_creates(server: Server, patients: int) -> dict[str, Any]:
    """Phase 1 (module doc)."""
    searched: dict[str, float] = {}
    done = threading.Event()

    def search() -> None:
        with _client(server) as client:
            started = time.perf_counter()
            answer = client.get("/Observation", params=SLOW_SEARCH)
            searched["seconds"] = time.perf_counter() - started
            searched["status"] = answer.status_code
        done.set()

    thread = threading.Thread(target=search)
    thread.start()
    time.sleep(0.2)
    rng = random.Random(19)
    latencies: list[float] = []
    with _client(server) as client:
        while not done.is_set():
            started = time.perf_counter()
            answer = client.post("/Observation", json=_new_observation(rng, patients), headers=FHIR_JSON)
            latencies.append(time.perf_counter() - started)
            assert answer.status_code == 201, answer.text
    thread.join()
    return {
        "search_seconds": round(searched["seconds"], 2),
        "search_status": searched["status"],
        "creates_during_search": len(latencies),
        "first_create_ms": round(latencies[0] * 1000, 1) if latencies else None,
        "creates_ms": common.stats_ms(latencies),
    }


def _next_request(
    client: httpx.Client, rng: random.Random, patients: int, per_patient: int
) -> tuple[str, httpx.Request]:
    """A read by id (50 %), a patient's newest Observations (30 %) or a create (20 %)."""
    roll = rng.random()
    if roll < 0.5:
        oid = dataset.observation_id(rng.randrange(patients), rng.randrange(per_patient))
        return "read", client.build_request("GET", f"/Observation/{oid}")
    if roll < 0.8:
        query = {"patient": dataset.patient_id(rng.randrange(patients)), "_sort": "-date", "_count": "20"}
        return "search", client.build_request("GET", "/Observation", params=query)
    body = _new_observation(rng, patients)
    return "create", client.build_request("POST", "/Observation", json=body, headers=FHIR_JSON)


def mixed_load(
    server: Server, url: str, patients: int, per_patient: int, clients: int, seconds: float
) -> dict[str, Any]:
    """Phase 2 (module doc)."""
    samples: dict[str, list[float]] = {"read": [], "search": [], "create": []}
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)
    audits_before = _audit_events(url)

    def work(n: int) -> None:
        rng = random.Random(n)
        mine: dict[str, list[float]] = {k: [] for k in samples}
        with _client(server) as client:
            barrier.wait()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                kind, request = _next_request(client, rng, patients, per_patient)
                started = time.perf_counter()
                answer = client.send(request)
                mine[kind].append(time.perf_counter() - started)
                if answer.status_code >= 300:
                    with lock:
                        failures.append(f"{kind} {answer.status_code}")
        with lock:
            for kind, values in mine.items():
                samples[kind].extend(values)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    answered = sum(len(v) for v in samples.values())
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "requests_per_second": round(answered / wall, 1),
        "failures": failures[:10],
        "failure_count": len(failures),
        "requests": answered,
        "audit_events_written": _audit_events(url) - audits_before,
        **{kind: common.stats_ms(values) for kind, values in samples.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("kind", choices=["sqlite", "postgresql"])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--per-patient", type=int, default=50)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--database", help="SQLite file or PostgreSQL schema (default: its own)")
    parser.add_argument("--no-load", action="store_true", help="reuse a database loaded before")
    parser.add_argument("--out", default=None, help="results file under bench/results/")
    args = parser.parse_args(argv)
    if args.kind == "sqlite":
        common.SQLITE_PATH = Path(args.database or common.ROOT / "var" / "bench" / "read-audit.sqlite3")
    else:
        common.PG_SCHEMA = args.database or "bench_read_audit"
    if not args.no_load:
        load.load(args.kind, args.patients, args.per_patient, validate="none", mode="bulk")
    url = common.database_url(args.kind)
    server = Server(url, common.ROOT / "var" / "bench" / f"read-audit-{args.kind}.log")
    try:
        common.log("phase 1: a slow search against creates")
        slow = slow_search_against_creates(server, args.patients)
        common.log(f"  {slow}")
        common.log(f"phase 2: {args.clients} clients for {args.seconds:g} s")
        mixed = mixed_load(server, url, args.patients, args.per_patient, args.clients, args.seconds)
        common.log(f"  {mixed}")
    finally:
        server.stop()
    result = {"code": common.code_version(), "kind": args.kind, "slow_search": slow, "mixed": mixed}
    path = common.write_json(args.out or f"read-audit-{args.kind}.json", result)
    common.log(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
