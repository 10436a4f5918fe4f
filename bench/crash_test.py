"""Crash test: every acknowledged write survives a SIGKILL of the server, and no response is ever found
scored by halves (issue 12).

    python -m bench.crash_test --database sqlite|postgres [--kills 20] [--writers 4] [--seed 12]
                               [--min-gap 0.5] [--max-gap 3.0] [--out FILE]

A child ``fhir-norse serve`` (development mode, a loopback port, its own database: SQLite
``var/bench/crash.sqlite3`` or PostgreSQL schema ``bench_crash``, both emptied first) takes concurrent
writes from ``--writers`` clients: new Patients, Observations, and completed QuestionnaireResponses
(PHQ-9 and NF 2.1) that the server scores in the same transaction. ``--kills`` times, after a random
``--min-gap``..``--max-gap`` seconds, the server is killed with SIGKILL wherever it is and started
again; the writers carry on against the new one. Then, on a last restart:

* every write answered ``201`` is read again by id (none may be missing);
* every request answered 2xx (the writes, and the reads by id that make a quarter of the operations) has
  its row in the audit trail, found by its ``X-Request-Id`` (no access goes unrecorded);
* every QuestionnaireResponse stored, acknowledged or not (a write can commit and die before it
  answers), has its full derived set: as many Observations ``derived-from`` it as the reference
  response of its Questionnaire scored before the first kill, and its DiagnosticReport, whose every
  ``result`` can be read;
* no scoring Observation is left without its response.

The exit status is 1 when anything is missing. Figures go to ``bench/results/crash-<database>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import sqlalchemy as sa

from bench import common
from bench.http_bench import Server
from fhir_norse.rom.intake import derived_id
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from tests.intake_support import NF21_STATIC, PHQ9, PHQ9_ITEMS, nf21_answers, response

FHIR_JSON = {"Content-Type": "application/fhir+json"}
PG_SCHEMA = "bench_crash"
# What each kind of response is answered with: the same answers always derive the same set.
TEMPLATES: dict[str, tuple[str, dict[str, Any]]] = {
    "phq9": (PHQ9, {item: "LA6568-5" for item in PHQ9_ITEMS}),
    "nf21": (NF21_STATIC, nf21_answers()),
}


def database_url(kind: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{common.ROOT / 'var' / 'bench' / 'crash.sqlite3'}"
    return f"{common.PG_SERVER}?options=-csearch_path%3D{PG_SCHEMA}"


def reset(kind: str) -> None:
    """An empty, migrated database (``fhir-norse serve`` would migrate it too, but only once it runs)."""
    if kind == "sqlite":
        path = common.ROOT / "var" / "bench" / "crash.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    else:
        admin = sa.create_engine(common.PG_SERVER, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
            conn.exec_driver_sql(f"CREATE SCHEMA {PG_SCHEMA}")
        admin.dispose()
    engine = create_engine(database_url(kind))
    migrate.upgrade(engine)
    engine.dispose()


@dataclass
class Run:
    """What the writers share: the server of the moment, and what it acknowledged."""

    server: Server
    up: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    patients: list[str] = field(default_factory=list)
    acknowledged: list[tuple[str, str]] = field(default_factory=list)
    responses: dict[str, str] = field(default_factory=dict)  # acknowledged response id -> template
    # X-Request-Id of every request answered 2xx (writes and reads): each must be in the audit trail.
    answered_requests: list[str] = field(default_factory=list)
    in_flight_lost: int = 0
    server_errors: list[str] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)


def _client(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {server.token}"}, timeout=60)


def _post(client: httpx.Client, path: str, body: dict[str, Any], rid: str | None = None) -> httpx.Response:
    return client.post(path, json=body, headers={**FHIR_JSON, **({"X-Request-Id": rid} if rid else {})})


def _read(run: Run, client: httpx.Client, rng: random.Random) -> None:
    """One read of something acknowledged; a 200 is a promise that the access is in the audit trail."""
    with run.lock:
        res_type, res_id = rng.choice(run.acknowledged)
    rid = f"crash-read-{uuid.UUID(int=rng.getrandbits(128)).hex}"
    answer = client.get(f"/{res_type}/{res_id}", headers={"X-Request-Id": rid})
    with run.lock:
        run.answers[f"read {answer.status_code}"] += 1
        if answer.status_code >= 500:
            run.server_errors.append(f"read {answer.status_code}: {answer.text[:200]}")
        if answer.status_code == 200:
            run.answered_requests.append(rid)


def _write(run: Run, client: httpx.Client, rng: random.Random) -> None:
    """One write, its answer recorded (a 201 is a promise the data is there after any crash); one in
    four operations is a read instead."""
    if rng.random() < 0.25:
        _read(run, client, rng)
        return
    roll = rng.random()
    rid = f"crash-write-{uuid.UUID(int=rng.getrandbits(128)).hex}"
    with run.lock:
        patient = rng.choice(run.patients)
    template = None
    body: dict[str, Any]
    if roll < 0.3:
        res_type, body = (
            "Patient",
            {"resourceType": "Patient", "name": [{"family": f"Crash{rng.randrange(10**6)}"}]},
        )
    elif roll < 0.5:
        res_type = "Observation"
        body = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "crash test"},
            "subject": {"reference": f"Patient/{patient}"},
            "valueQuantity": {"value": rng.randrange(100)},
        }
    else:
        res_type, template = "QuestionnaireResponse", rng.choice(sorted(TEMPLATES))
        canonical, answers = TEMPLATES[template]
        body = response(
            canonical, answers, patient=patient, identifier=f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128))}"
        )
    answer = _post(client, f"/{res_type}", body, rid)
    with run.lock:
        run.answers[f"{res_type} {answer.status_code}"] += 1
        if answer.status_code >= 500:
            run.server_errors.append(f"{res_type} {answer.status_code}: {answer.text[:200]}")
        if answer.status_code != 201:
            return
        res_id = answer.json()["id"]
        run.acknowledged.append((res_type, res_id))
        run.answered_requests.append(rid)
        if res_type == "Patient":
            run.patients.append(res_id)
        if template is not None:
            run.responses[res_id] = template


def writer(run: Run, seed: int) -> None:
    rng = random.Random(seed)
    while not run.stop.is_set():
        run.up.wait()
        server = run.server
        with _client(server) as client:
            while not run.stop.is_set() and run.server is server:
                try:
                    _write(run, client, rng)
                except (httpx.TransportError, httpx.DecodingError):
                    # Killed while the request was on its way: no answer, so no promise either way.
                    with run.lock:
                        run.in_flight_lost += 1
                    run.up.wait()
                    break


def references(client: httpx.Client, query: str) -> list[dict[str, Any]]:
    """Every resource of a search, following the next links."""
    out: list[dict[str, Any]] = []
    url: str | None = query
    while url:
        page = client.get(url)
        page.raise_for_status()
        bundle = page.json()
        out += [e["resource"] for e in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return out


def derived_set(client: httpx.Client, response_id: str) -> tuple[int, bool]:
    """The number of Observations derived from a response, and whether its report and all the report's
    results can be read."""
    derived = client.get(
        "/Observation", params={"derived-from": f"QuestionnaireResponse/{response_id}", "_summary": "count"}
    ).json()["total"]
    report = client.get(f"/DiagnosticReport/{derived_id(response_id, 'report')}")
    if report.status_code != 200:
        return int(derived), False
    results = [r["reference"] for r in report.json().get("result", [])]
    return int(derived), all(client.get(f"/{ref}").status_code == 200 for ref in results)


def verify(run: Run, expected: dict[str, int], kind: str) -> dict[str, Any]:
    """Everything acknowledged is there; every stored response has its full derived set; every request
    answered 2xx is in the audit trail (module doc)."""
    with _client(run.server) as client:
        missing = [f"{t}/{i}" for t, i in run.acknowledged if client.get(f"/{t}/{i}").status_code != 200]
        stored = references(client, "/QuestionnaireResponse?_count=500&_elements=questionnaire")
        incomplete = []
        for qr in stored:
            template = "phq9" if qr["questionnaire"].startswith(PHQ9.split("|")[0]) else "nf21"
            count, report_whole = derived_set(client, qr["id"])
            if count != expected[template] or not report_whole:
                incomplete.append(
                    f"QuestionnaireResponse/{qr['id']}: {count} Observations, report whole: {report_whole}"
                )
        derived_total = client.get(
            "/Observation", params={"derived-from:missing": "false", "_summary": "count"}
        ).json()["total"]
    stored_ids = {qr["id"] for qr in stored}
    engine = sa.create_engine(database_url(kind))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT extra FROM audit_log WHERE extra IS NOT NULL"))
        audited = {(json.loads(x) if isinstance(x, str) else x).get("rid") for (x,) in rows}
    engine.dispose()
    want_total = sum(
        expected["phq9" if qr["questionnaire"].startswith(PHQ9.split("|")[0]) else "nf21"] for qr in stored
    )
    return {
        "acknowledged_missing": missing,
        "answered_requests": len(run.answered_requests),
        "answered_not_audited": [rid for rid in run.answered_requests if rid not in audited][:50],
        "responses_stored": len(stored),
        "responses_acknowledged_not_stored": sorted(set(run.responses) - stored_ids),
        "responses_stored_not_acknowledged": len(stored_ids - set(run.responses)),
        "responses_incomplete": incomplete,
        "scoring_observations": derived_total,
        "scoring_observations_expected": want_total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument(
        "--min-gap", type=float, default=0.5, help="seconds of writing before a kill, at least"
    )
    parser.add_argument("--max-gap", type=float, default=3.0, help="... and at most")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    kind = args.database
    reset(kind)
    url = database_url(kind)
    log = common.ROOT / "var" / "bench" / f"crash-{kind}.log"
    rng = random.Random(args.seed)
    started = time.perf_counter()
    server = Server(url, log)
    # The content pack is published by the first start; restarts need not check it again.
    os.environ["FHIR_NORSE_PUBLISH_CONTENT"] = "false"
    run = Run(server)
    expected: dict[str, int] = {}
    with _client(server) as client:
        for _ in range(5):
            run.patients.append(_post(client, "/Patient", {"resourceType": "Patient"}).json()["id"])
        for name, (canonical, answers) in TEMPLATES.items():
            created = _post(
                client, "/QuestionnaireResponse", response(canonical, answers, patient=run.patients[0])
            )
            assert created.status_code == 201, created.text
            run.responses[created.json()["id"]] = name
            run.acknowledged.append(("QuestionnaireResponse", created.json()["id"]))
            expected[name] = derived_set(client, created.json()["id"])[0]
    common.log(f"{kind}: reference derived sets {expected}; {args.writers} writers, {args.kills} kills")
    run.up.set()
    threads = [threading.Thread(target=writer, args=(run, args.seed * 100 + n)) for n in range(args.writers)]
    for thread in threads:
        thread.start()
    restarts: list[float] = []
    for kill in range(args.kills):
        time.sleep(rng.uniform(args.min_gap, args.max_gap))
        run.up.clear()
        run.server.proc.kill()  # SIGKILL: no shutdown, no flush, whatever it was doing
        run.server.proc.wait()
        run.server.log.close()
        began = time.perf_counter()
        run.server = Server(url, log.with_name(f"crash-{kind}-{kill + 1}.log"))
        restarts.append(time.perf_counter() - began)
        run.up.set()
        with run.lock:
            done = f"{len(run.acknowledged)} acknowledged, {run.in_flight_lost} in flight lost"
        common.log(f"kill {kill + 1}/{args.kills}: {done}")
    time.sleep(rng.uniform(args.min_gap, args.max_gap))
    run.stop.set()
    for thread in threads:
        thread.join()
    run.server.proc.kill()
    run.server.proc.wait()
    run.server.log.close()
    run.server = Server(url, log.with_name(f"crash-{kind}-verify.log"))
    try:
        checked = verify(run, expected, kind)
    finally:
        run.server.stop()
    result = {
        "code": common.code_version(),
        "database": kind,
        "kills": args.kills,
        "writers": args.writers,
        "seconds": round(time.perf_counter() - started, 1),
        "acknowledged": dict(Counter(t for t, _ in run.acknowledged)),
        "answers": dict(run.answers),
        "in_flight_lost": run.in_flight_lost,
        "server_errors": run.server_errors[:20],
        "restart_seconds": common.stats_ms(restarts),
        "reference_derived_observations": expected,
        **checked,
    }
    path = common.write_json(args.out or f"crash-{kind}.json", result)
    failed = bool(
        checked["acknowledged_missing"]
        or checked["answered_not_audited"]
        or checked["responses_acknowledged_not_stored"]
        or checked["responses_incomplete"]
        or checked["scoring_observations"] != checked["scoring_observations_expected"]
        or run.server_errors
    )
    common.log(
        f"{kind}: {len(run.acknowledged)} writes acknowledged over {args.kills} kills, "
        f"{len(checked['acknowledged_missing'])} missing, {checked['answered_requests']} answered requests "
        f"of which {len(checked['answered_not_audited'])} not audited, "
        f"{checked['responses_stored']} responses stored, "
        f"{len(checked['responses_incomplete'])} with an incomplete derived set, "
        f"{len(run.server_errors)} server errors: {'FAILED' if failed else 'ok'} ({path})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
