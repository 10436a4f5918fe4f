"""Subscription notification latency: from a scored response's commit to the subscriber's receipt.

    python -m bench.notification_latency [--base-url URL --token TOKEN | --spawn sqlite|postgres]
                                         [--source response|report] [--patients 1] [--rate 50]
                                         [--seconds 20] [--writers 8] [--max-count N]
                                         [--content id-only] [--json OUT]

Against a running server (``--base-url`` and a ``system/*.cruds`` ``--token``; the content pack
published, the delivery worker on: ``FHIR_NORSE_SUBSCRIPTION_INTERVAL_S`` > 0), or one this script
starts (``--spawn``: ``fhir-norse serve`` in development mode on ``var/bench/notify.sqlite3`` or the
PostgreSQL schema ``bench_notify``, both emptied first):

1. a subscriber: a threaded HTTP receiver on 127.0.0.1 (a random port) that notes the moment each
   notification arrives (``time.monotonic``) and the DiagnosticReports it names;
2. ``--patients`` Patients, and a Subscription to the ``scored-administration`` topic (filtered on the
   patient when there is one; unfiltered for several, the benchmark database holding only them), with
   the chosen content level and, with ``--max-count``, its ``backport-max-count`` (pending events share
   a notification up to that many); the handshake is awaited;
3. commits that fire the topic, posted open-loop at ``--rate`` per second for ``--seconds`` by
   ``--writers`` threads (each request is sent at its scheduled moment, late requests are not dropped):
   ``--source response`` (the default) posts completed PHQ-9 responses, which the server scores (the
   patients in turn: one patient's thousandth response reads a longer history than a clinic's), and
   the DiagnosticReport its scoring writes is known from the ``201`` (its id derives from the
   response's); ``--source report`` posts a rom DiagnosticReport itself, the same topic's trigger
   without the scoring, so that the delivery path is measured at rates the scoring cannot sustain on a
   small machine;
4. latency per report: receipt minus the moment the ``201`` arrived (the commit came before it, so this
   is slightly less than commit-to-receipt) and receipt minus the moment the POST was sent (more than
   commit-to-receipt): p50/p90/p99/max of both, the notifications missing after a 60 s grace, and the
   duplicates (at-least-once delivery may repeat one after a failure; none are expected here).

Prints Markdown; ``--json OUT`` writes the figures. The lead runs it for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from bench import common
from fhir_norse.rom.intake import derived_id
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from tests.intake_support import PHQ9, PHQ9_ITEMS, response

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
TOPIC = "http://fhir-norse.org/fhir/SubscriptionTopic/scored-administration"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
PG_SCHEMA = "bench_notify"
ROM_CODES = "http://fhir-norse.org/fhir/CodeSystem/rom-codes"


class Subscriber:
    """The receiving end: arrival moment per DiagnosticReport id, and every notification's type."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrived: dict[str, list[float]] = {}
        self.kinds: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                at = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                outer.note(at, body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def note(self, at: float, bundle: dict[str, Any]) -> None:
        params = bundle["entry"][0]["resource"]["parameter"]
        kind = next(p["valueCode"] for p in params if p["name"] == "type")
        focus = [
            part["valueReference"]["reference"].rsplit("/", 1)[-1]
            for p in params
            if p["name"] == "notification-event"
            for part in p["part"]
            if part["name"] == "focus"
        ]
        with self.lock:
            self.kinds.append(kind)
            for report_id in focus:
                self.arrived.setdefault(report_id, []).append(at)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _reset(kind: str) -> str:
    if kind == "sqlite":
        path = common.ROOT / "var" / "bench" / "notify.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    else:
        admin = sa.create_engine(common.PG_SERVER, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
            conn.exec_driver_sql(f"CREATE SCHEMA {PG_SCHEMA}")
        admin.dispose()
        url = f"{common.PG_SERVER}?options=-csearch_path%3D{PG_SCHEMA}"
    engine = create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


def _report(patient: str) -> dict[str, Any]:
    """A feedback report as the scoring writes it, as far as the topic looks: category ``rom``."""
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "category": [{"coding": [{"system": ROM_CODES, "code": "rom"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "issued": "2026-12-07T10:00:00+01:00",
    }


def run(
    base: str,
    token: str,
    *,
    rate: float,
    seconds: float,
    writers: int,
    content: str,
    source: str = "response",
    patients: int = 1,
    max_count: int | None = None,
) -> dict[str, Any]:
    subscriber = Subscriber()
    auth = {"Authorization": f"Bearer {token}", **FHIR_JSON}
    try:
        with httpx.Client(timeout=60, headers=auth) as client:
            ids = [
                client.post(f"{base}/Patient", json={"resourceType": "Patient"}).json()["id"]
                for _ in range(patients)
            ]
            subscription: dict[str, Any] = {
                "resourceType": "Subscription",
                "status": "requested",
                "reason": "notification latency benchmark",
                "criteria": TOPIC,
                "channel": {
                    "type": "rest-hook",
                    "endpoint": subscriber.url,
                    "payload": "application/fhir+json",
                    "_payload": {
                        "extension": [{"url": BACKPORT + "backport-payload-content", "valueCode": content}]
                    },
                },
            }
            if max_count is not None:
                subscription["channel"]["extension"] = [
                    {"url": BACKPORT + "backport-max-count", "valuePositiveInt": max_count}
                ]
            if patients == 1:
                # One patient: the subscription filters on it (several: unfiltered, the benchmark
                # database holds only these patients).
                filter_criteria = f"DiagnosticReport?patient=Patient/{ids[0]}"
                subscription["_criteria"] = {
                    "extension": [
                        {"url": BACKPORT + "backport-filter-criteria", "valueString": filter_criteria}
                    ]
                }
            created = client.post(f"{base}/Subscription", json=subscription)
            if created.status_code != 201:
                raise RuntimeError(f"the Subscription was refused: {created.text}")
            subscription_id = created.json()["id"]
            deadline = time.monotonic() + 30
            while "handshake" not in subscriber.kinds:
                if time.monotonic() > deadline:
                    raise RuntimeError("no handshake within 30 s: is the delivery worker on?")
                time.sleep(0.05)
            if source == "response":
                target = "QuestionnaireResponse"
                bodies = [response(PHQ9, {item: "LA6568-5" for item in PHQ9_ITEMS}, patient=p) for p in ids]
            else:
                target, bodies = "DiagnosticReport", [_report(p) for p in ids]
            total = int(rate * seconds)
            sent: dict[str, tuple[float, float]] = {}  # report id -> (sent, answered)
            failed = 0
            lock = threading.Lock()
            start = time.monotonic() + 0.5

            def post(n: int) -> None:
                nonlocal failed
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                began = time.monotonic()
                answer = client.post(f"{base}/{target}", json=bodies[n % len(bodies)])
                answered = time.monotonic()
                with lock:
                    if answer.status_code != 201:
                        failed += 1
                        return
                    made = answer.json()["id"]
                    sent[derived_id(made, "report") if source == "response" else made] = (began, answered)

            with ThreadPoolExecutor(writers) as pool:
                list(pool.map(post, range(total)))
            elapsed = time.monotonic() - start
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with subscriber.lock:
                    if all(r in subscriber.arrived for r in sent):
                        break
                time.sleep(0.05)
            client.delete(f"{base}/Subscription/{subscription_id}")
        with subscriber.lock:
            after_answer = [
                subscriber.arrived[r][0] - a for r, (_, a) in sent.items() if r in subscriber.arrived
            ]
            after_send = [
                subscriber.arrived[r][0] - s for r, (s, _) in sent.items() if r in subscriber.arrived
            ]
            duplicates = sum(len(subscriber.arrived[r]) - 1 for r in sent if r in subscriber.arrived)
            missing = sum(1 for r in sent if r not in subscriber.arrived)
    finally:
        subscriber.close()
    return {
        "target_rate": rate,
        "achieved_rate": round(len(sent) / elapsed, 1) if elapsed > 0 else 0.0,
        "source": source,
        "patients": patients,
        "max_count": max_count,
        "responses": len(sent),
        "failed_posts": failed,
        "missing": missing,
        "duplicates": duplicates,
        "content": content,
        "answer_to_receipt_ms": common.percentiles(after_answer),
        "send_to_receipt_ms": common.percentiles(after_send),
    }


def markdown(figures: dict[str, Any]) -> str:
    def row(name: str, p: dict[str, float]) -> str:
        cells = " | ".join(f"{p.get(k, 0):.1f}" for k in ("p50", "p90", "p99", "max"))
        return f"| {name} | {cells} |"

    return "\n".join(
        [
            f"Notification latency, {figures['responses']} "
            f"{'scored responses' if figures.get('source', 'response') == 'response' else 'rom reports'} at "
            f"{figures['achieved_rate']}/s (target {figures['target_rate']}/s), "
            f"content {figures['content']}; "
            f"missing {figures['missing']}, duplicates {figures['duplicates']}, "
            f"failed posts {figures['failed_posts']}",
            "",
            "| ms | p50 | p90 | p99 | max |",
            "| --- | ---: | ---: | ---: | ---: |",
            row("201 answered -> received", figures["answer_to_receipt_ms"]),
            row("POST sent -> received", figures["send_to_receipt_ms"]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base-url", default=os.environ.get("FHIR_NORSE_BENCH_BASE_URL"))
    parser.add_argument("--token", default=os.environ.get("FHIR_NORSE_BENCH_TOKEN"))
    parser.add_argument("--spawn", choices=["sqlite", "postgres"], default=None)
    parser.add_argument("--source", choices=["response", "report"], default="response")
    parser.add_argument("--patients", type=int, default=1)
    parser.add_argument("--max-count", type=int, default=None)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--content", choices=["empty", "id-only", "full-resource"], default="id-only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    server = None
    if args.spawn:
        from bench.http_bench import Server

        os.environ.setdefault("FHIR_NORSE_SUBSCRIPTION_INTERVAL_S", "0.05")
        os.environ.setdefault("FHIR_NORSE_SCHEDULER_INTERVAL_S", "0")
        url = _reset(args.spawn)
        server = Server(url, common.ROOT / "var" / "bench" / f"notify-{args.spawn}.log")
        base, token = server.base, server.token
    elif args.base_url and args.token:
        base, token = args.base_url.rstrip("/"), args.token
    else:
        parser.error("give --base-url and --token (or FHIR_NORSE_BENCH_BASE_URL/_TOKEN), or --spawn")
    try:
        figures = run(
            base,
            token,
            rate=args.rate,
            seconds=args.seconds,
            writers=args.writers,
            content=args.content,
            source=args.source,
            patients=args.patients,
            max_count=args.max_count,
        )
    finally:
        if server is not None:
            server.stop()
    print(markdown(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 1 if figures["missing"] or figures["failed_posts"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
