"""HTTP benchmark of a loaded database (see ``bench.load``), plus raw SQL and an in-process profile.

    python -m bench.http_bench sqlite|postgresql [--patients N] [--per-patient M] [--n 2000]
                               [--creates 2000] [--transactions 30] [--out FILE]

Starts ``fhir-norse serve`` (one uvicorn worker) on a free port against the benchmark database,
warms up, then sends sequential requests over one persistent httpx connection:

* ``GET Observation?patient=X&code=http://loinc.org|Y&_sort=-date&_count=20`` (random X, Y);
* ``GET Observation/{id}`` (random id);
* ``POST Observation`` (sequential creates; throughput = creates / wall time);
* ``POST /`` transaction Bundles of 100 Observation creates.

Then, with the server stopped: the same queries as raw SQL through the DB-API driver on one
connection (a hand-written query, and the exact SQL the server emits), and an in-process
profile of the search and create paths (phase timings and cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from bench import common, dataset

FHIR_JSON = "application/fhir+json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Server:
    def __init__(self, url: str, log: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        # Development mode: the built-in key passphrase; the port makes minted tokens' audience right.
        env = dict(
            os.environ,
            FHIR_NORSE_LOG_LEVEL="WARNING",
            FHIR_NORSE_MODE="development",
            FHIR_NORSE_PORT=str(self.port),
        )
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fhir_norse.cli",
                "serve",
                "--database-url",
                url,
                "--port",
                str(self.port),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=common.ROOT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(f"{self.base}/metadata", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"server did not start; see {log}")
        # Every FHIR request carries a bearer token, as in production (authorization is always on).
        minted = subprocess.run(
            [
                sys.executable,
                "-m",
                "fhir_norse.cli",
                "token",
                "--scope",
                "system/*.cruds",
                "--database-url",
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=common.ROOT,
        )
        self.token = minted.stdout.strip().splitlines()[-1]

    def stop(self) -> float | None:
        rss = _peak_rss_mb(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return rss


def hot_params(rng: random.Random, patients: int) -> tuple[str, str]:
    return dataset.patient_id(rng.randrange(patients)), rng.choice(dataset.CODES)[0]


def hot_query(pid: str, code: str) -> dict[str, str]:
    return {"patient": pid, "code": f"{dataset.LOINC}|{code}", "_sort": "-date", "_count": "20"}


def transaction_bundle(rng: random.Random, patients: int, size: int = 100) -> dict[str, Any]:
    entries = []
    for _ in range(size):
        pid = dataset.patient_id(rng.randrange(patients))
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128))}",
                "resource": dataset.observation(pid, rng),
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def timed(fn: Any, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------- HTTP
def http_part(
    url: str, patients: int, per_patient: int, n: int, creates: int, transactions: int, log: Path
) -> dict[str, Any]:
    server = Server(url, log)
    errors: dict[str, Any] = {}
    out: dict[str, Any] = {"errors": errors}
    try:
        client = httpx.Client(
            base_url=server.base,
            timeout=120,
            headers={
                "Accept": FHIR_JSON,
                "Content-Type": FHIR_JSON,
                "Authorization": f"Bearer {server.token}",
            },
        )
        rng = random.Random(1)

        def check(name: str, r: httpx.Response, ok: tuple[int, ...] = (200,)) -> None:
            if r.status_code not in ok:
                errors.setdefault(name, {"count": 0, "first": f"{r.status_code} {r.text[:500]}"})
                errors[name]["count"] += 1

        # Warm-up (also checks that the hot query finds what it should).
        r = client.get("/Observation", params=hot_query(dataset.patient_id(0), dataset.CODES[0][0]))
        check("search", r)
        if r.status_code == 200:
            out["sample_hot_query_entries"] = len(r.json().get("entry", []))
        for _ in range(min(200, n)):
            check("search", client.get("/Observation", params=hot_query(*hot_params(rng, patients))))
            check(
                "read",
                client.get(
                    "/Observation/"
                    + dataset.observation_id(rng.randrange(patients), rng.randrange(per_patient))
                ),
            )

        matched: list[int] = []
        # The JSON parse of the answer is not timed: time only the request.
        lat = []
        for _ in range(n):
            params = hot_query(*hot_params(rng, patients))
            t0 = time.perf_counter()
            r = client.get("/Observation", params=params)
            _ = r.content
            lat.append(time.perf_counter() - t0)
            check("search", r)
            if r.status_code == 200 and len(matched) < 200:
                matched.append(len(r.json().get("entry", [])))
        out["search"] = common.percentiles(lat)
        out["search"]["mean_entries"] = sum(matched) / len(matched) if matched else None

        lat = []
        for _ in range(n):
            path = (
                f"/Observation/{dataset.observation_id(rng.randrange(patients), rng.randrange(per_patient))}"
            )
            t0 = time.perf_counter()
            r = client.get(path)
            _ = r.content
            lat.append(time.perf_counter() - t0)
            check("read", r)
        out["read"] = common.percentiles(lat)

        # The floor of the HTTP stack: uvicorn + FastAPI + the app's middleware + httpx, no FHIR work.
        health = f"http://127.0.0.1:{server.port}/health"
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.get(health)
            _ = r.content
            lat.append(time.perf_counter() - t0)
            check("health", r)
        out["health"] = common.percentiles(lat)

        bodies = [
            dataset.observation(dataset.patient_id(rng.randrange(patients)), rng) for _ in range(creates + 50)
        ]
        payloads = [httpx.Request("POST", "x", json=b).content for b in bodies]  # encode outside the timing
        for p in payloads[creates:]:
            check("create", client.post("/Observation", content=p), (201,))
        lat = []
        t_all = time.perf_counter()
        for p in payloads[:creates]:
            t0 = time.perf_counter()
            r = client.post("/Observation", content=p)
            _ = r.content
            lat.append(time.perf_counter() - t0)
            check("create", r, (201,))
        wall = time.perf_counter() - t_all
        out["create"] = common.percentiles(lat)
        out["create"]["per_s"] = creates / wall if wall else None

        bundles = [
            httpx.Request("POST", "x", json=transaction_bundle(rng, patients)).content
            for _ in range(transactions + 2)
        ]
        for b in bundles[transactions:]:
            check("transaction", client.post("", content=b))
        lat = []
        for b in bundles[:transactions]:
            t0 = time.perf_counter()
            r = client.post("", content=b)
            _ = r.content
            lat.append(time.perf_counter() - t0)
            check("transaction", r)
        out["transaction"] = common.percentiles(lat)
        client.close()
    finally:
        out["server_peak_rss_mb"] = server.stop()
    return out


# ---------------------------------------------------------------------------- raw SQL
def _hand_sql(sqlite: bool) -> tuple[str, str]:
    p = "?" if sqlite else "%s"
    hot = (
        "SELECT r.pk, r.res_id, r.version, r.last_updated, CAST(r.body AS TEXT), d.high "
        "FROM resource r JOIN idx_date d ON d.resource_pk = r.pk AND d.param = 'date' "
        "WHERE r.res_type = 'Observation' "
        "AND r.pk IN (SELECT resource_pk FROM idx_reference WHERE res_type = 'Observation' "
        f"AND param = 'patient' AND target_type = 'Patient' AND target_id = {p}) "
        "AND r.pk IN (SELECT resource_pk FROM idx_token WHERE res_type = 'Observation' "
        f"AND param = 'code' AND system = 'http://loinc.org' AND code = {p}) "
        "ORDER BY d.high DESC, r.pk DESC LIMIT 21"
    )
    read = (
        "SELECT pk, res_type, res_id, version, last_updated, deleted, CAST(body AS TEXT) "
        f"FROM resource WHERE res_type = 'Observation' AND res_id = {p}"
    )
    return hot, read


def _substitute(params: Any, mapping: dict[Any, Any]) -> Any:
    if isinstance(params, dict):
        return {k: mapping.get(v, v) if isinstance(v, str) else v for k, v in params.items()}
    return type(params)(mapping.get(v, v) if isinstance(v, str) else v for v in params)


def server_sql(url: str, patients: int) -> tuple[list[tuple[str, Any]], str, str]:
    """The statements the server runs for one hot query (captured in process)."""
    service, _ctx = _service(url)
    captured: list[tuple[str, Any]] = []

    def before(_conn: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, _many: bool) -> None:
        captured.append((statement, parameters))

    pid, code = dataset.patient_id(patients // 2), dataset.CODES[3][0]
    sa.event.listen(service.storage.engine, "before_cursor_execute", before)
    from fhir_norse.server.search.parse import parse_search
    from fhir_norse.store.search import engine as search_engine

    with service.storage.read() as view:
        request = parse_search(
            "Observation", list(hot_query(pid, code).items()), strict=False, registry=service.registry
        )
        search_engine.execute_search(view.conn, request)
    sa.event.remove(service.storage.engine, "before_cursor_execute", before)
    service.storage.engine.dispose()
    return [c for c in captured if "idx_" in c[0] or "resource" in c[0]], pid, code


def raw_part(url: str, patients: int, per_patient: int, n: int, hand: bool = True) -> dict[str, Any]:
    """Raw SQL timings; ``hand=False`` leaves out the hand-written query (written for the schema before
    issue 14's hash columns: on that schema it scans the token index)."""
    from fhir_norse.store.db import create_engine

    engine = create_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    hot, read = _hand_sql(sqlite)
    statements, pid0, code0 = server_sql(url, patients)
    out: dict[str, Any] = {
        "hand_sql_hot": hot,
        "hand_sql_read": read,
        "server_sql_hot": [s for s, _ in statements],
    }
    raw = engine.raw_connection()
    dbapi = raw.driver_connection
    assert dbapi is not None
    if not sqlite:
        dbapi.autocommit = True
    cur = dbapi.cursor()
    rng = random.Random(2)
    for _ in range(200 if hand else 0):
        pid, code = hot_params(rng, patients)
        cur.execute(hot, (pid, code))
        cur.fetchall()

    def run_hand(_: int) -> None:
        pid, code = hot_params(rng, patients)
        cur.execute(hot, (pid, code))
        cur.fetchall()

    if hand:
        out["hot_hand"] = common.percentiles(timed(run_hand, n))

    def run_server_sql(_: int) -> None:
        pid, code = hot_params(rng, patients)
        mapping = {pid0: pid, f"Patient/{pid0}": f"Patient/{pid}", code0: code}
        for statement, params in statements:
            cur.execute(statement, _substitute(params, mapping))
            cur.fetchall()

    out["hot_server_sql"] = common.percentiles(timed(run_server_sql, n))

    def run_read(_: int) -> None:
        cur.execute(read, (dataset.observation_id(rng.randrange(patients), rng.randrange(per_patient)),))
        cur.fetchall()

    timed(run_read, 200)
    out["read"] = common.percentiles(timed(run_read, n))

    # Plans of the server's hot query.
    statement, params = statements[-1]
    try:
        if sqlite:
            cur.execute("EXPLAIN QUERY PLAN " + statement, params)
            out["plan_server_sql"] = "\n".join(str(r) for r in cur.fetchall())
            if hand:
                cur.execute("EXPLAIN QUERY PLAN " + hot, (pid0, code0))
                out["plan_hand_sql"] = "\n".join(str(r) for r in cur.fetchall())
        else:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
            out["plan_server_sql"] = "\n".join(r[0] for r in cur.fetchall())
            if hand:
                cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + hot, (pid0, code0))
                out["plan_hand_sql"] = "\n".join(r[0] for r in cur.fetchall())
    except Exception as exc:
        out["plan_error"] = repr(exc)
    cur.close()
    raw.close()
    engine.dispose()
    return out


# ---------------------------------------------------------------------------- in-process profile
def _service(url: str) -> tuple[Any, Any]:
    from fhir_norse.auth.caller import Caller
    from fhir_norse.compose import build_service
    from fhir_norse.config import load_settings
    from fhir_norse.server.context import RequestContext

    service = build_service(load_settings(database_url=url, log_level="WARNING", mode="development"))
    return service, RequestContext(caller=Caller.operator(), base_url="http://127.0.0.1/fhir")


def _top(profile: cProfile.Profile, limit: int = 18) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(profile, stream=buf)
    stats.sort_stats("tottime").print_stats(limit)
    text = buf.getvalue()
    start = text.find("   ncalls")
    return text[start:] if start >= 0 else text


def profile_part(url: str, patients: int, n: int) -> dict[str, Any]:
    from fhir_norse.server import searching
    from fhir_norse.server.interactions import InteractionRequest, match
    from fhir_norse.server.resources import new_id, now_ms, stamp_meta
    from fhir_norse.server.search.parse import parse_search
    from fhir_norse.server.validation import validate_resource
    from fhir_norse.store.search import engine as search_engine

    service, ctx = _service(url)
    eng = service.storage.engine
    sql_time = [0.0]
    started: list[float] = []

    def before(*_a: Any) -> None:
        started.append(time.perf_counter())

    def after(*_a: Any) -> None:
        sql_time[0] += time.perf_counter() - started.pop()

    sa.event.listen(eng, "before_cursor_execute", before)
    sa.event.listen(eng, "after_cursor_execute", after)
    rng = random.Random(3)
    phases: dict[str, list[float]] = {
        k: [] for k in ("parse", "execute_search", "execute_sql_cursor", "bundle", "total")
    }
    out_errors: dict[str, str] = {}
    for i in range(n + 50):
        params = list(hot_query(*hot_params(rng, patients)).items())
        t0 = time.perf_counter()
        with service.storage.read() as view:
            t1 = time.perf_counter()
            request = parse_search("Observation", params, strict=False, registry=service.registry)
            t2 = time.perf_counter()
            sql_time[0] = 0.0
            page = search_engine.execute_search(view.conn, request)
            t3 = time.perf_counter()
            try:
                searching.search_bundle(ctx, request, page)
            except Exception as exc:
                out_errors.setdefault("bundle", repr(exc))
            t4 = time.perf_counter()
        t5 = time.perf_counter()
        if i >= 50:
            phases["parse"].append(t2 - t1)
            phases["execute_search"].append(t3 - t2)
            phases["execute_sql_cursor"].append(sql_time[0])
            phases["bundle"].append(t4 - t3)
            phases["total"].append(t5 - t0)
    out: dict[str, Any] = {
        "search_phases": {k: common.percentiles(v) for k, v in phases.items()},
        "errors": out_errors,
    }

    # The search interaction as a request runs it (``GET [base]/Observation?...``): in the caller's
    # repository session (access policy, search, AuditEvent, commit), then the searchset Bundle.
    found = match("GET", "Observation")
    assert found is not None
    search_interaction = found[0]

    def one_search() -> None:
        params = list(hot_query(*hot_params(rng, patients)).items())
        try:
            service.perform(ctx, search_interaction, InteractionRequest("Observation", params=params))
        except Exception as exc:
            out_errors.setdefault("search", repr(exc))
            with service.storage.read() as view:
                request = parse_search("Observation", params, strict=False, registry=service.registry)
                search_engine.execute_search(view.conn, request)

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        one_search()
    prof.disable()
    out["search_cprofile"] = _top(prof)

    cphases: dict[str, list[float]] = {
        k: [] for k in ("validate", "stamp_extract", "save_sql", "commit", "total")
    }
    for i in range(n + 50):
        body = dataset.observation(dataset.patient_id(rng.randrange(patients)), rng)
        t0 = time.perf_counter()
        validate_resource(body, expected_type="Observation")
        t1 = time.perf_counter()
        res_id, lu = new_id(), now_ms()
        stamped = stamp_meta(body, res_id, 1, lu)
        rows = service.kernel.extractor.extract(stamped)
        t2 = time.perf_counter()
        cm = service.storage.write()
        uow = cm.__enter__()
        uow.save(
            res_type="Observation",
            res_id=res_id,
            body=stamped,
            version=1,
            last_updated=lu,
            method="create",
            previous=None,
            index_rows=rows,
        )
        t3 = time.perf_counter()
        cm.__exit__(None, None, None)
        t4 = time.perf_counter()
        if i >= 50:
            for k, v in (
                ("validate", t1 - t0),
                ("stamp_extract", t2 - t1),
                ("save_sql", t3 - t2),
                ("commit", t4 - t3),
                ("total", t4 - t0),
            ):
                cphases[k].append(v)
    out["create_phases"] = {k: common.percentiles(v) for k, v in cphases.items()}

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        service.create(
            ctx, "Observation", dataset.observation(dataset.patient_id(rng.randrange(patients)), rng)
        )
    prof.disable()
    out["create_cprofile"] = _top(prof)

    rphases: list[float] = []
    for _ in range(n):
        oid = dataset.observation_id(rng.randrange(patients), 0)
        t0 = time.perf_counter()
        service.read(ctx, "Observation", oid)
        rphases.append(time.perf_counter() - t0)
    out["read_in_process"] = common.percentiles(rphases)
    sa.event.remove(eng, "before_cursor_execute", before)
    sa.event.remove(eng, "after_cursor_execute", after)
    eng.dispose()
    return out


def run(
    kind: str, patients: int, per_patient: int, n: int, creates: int, transactions: int, profile_n: int
) -> dict[str, Any]:
    url = common.database_url(kind)
    result: dict[str, Any] = {
        "database": kind,
        "url": url,
        "patients": patients,
        "per_patient": per_patient,
        "n": n,
        "creates": creates,
        "transactions": transactions,
    }
    parts: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = (
        ("raw", lambda: raw_part(url, patients, per_patient, n)),
        (
            "http",
            lambda: http_part(
                url,
                patients,
                per_patient,
                n,
                creates,
                transactions,
                common.ROOT / "var" / "bench" / f"server-{kind}.log",
            ),
        ),
        ("profile", lambda: profile_part(url, patients, profile_n)),
    )
    for name, fn in parts:
        t0 = time.perf_counter()
        print(f"[bench {kind}] {name} ...", flush=True)
        try:
            result[name] = fn()
        except Exception as exc:
            import traceback

            result[name] = {"failed": repr(exc), "traceback": traceback.format_exc()}
            print(f"[bench {kind}] {name} FAILED: {exc!r}", flush=True)
        print(f"[bench {kind}] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.http_bench")
    p.add_argument("database", choices=["sqlite", "postgresql"])
    p.add_argument("--patients", type=int, default=10_000)
    p.add_argument("--per-patient", type=int, default=100)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--creates", type=int, default=2000)
    p.add_argument("--transactions", type=int, default=30)
    p.add_argument("--profile-n", type=int, default=300)
    p.add_argument("--out")
    a = p.parse_args(argv)
    result = run(a.database, a.patients, a.per_patient, a.n, a.creates, a.transactions, a.profile_n)
    path = common.write_json(a.out or f"http-{a.database}.json", result)
    print(f"[bench {a.database}] results in {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
