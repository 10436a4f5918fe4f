"""Issue 12, the HTTP edge (items 6, 7, 8, 17, 18, 20), each failing on the code before the fix, on
SQLite and PostgreSQL: the token audience comes from configuration, not the ``Host`` header; failed
authentication throttles failing attempts only, per address and per token, with ``X-Forwarded-For``
believed from trusted proxies only; refusals without a verified credential are audited once per
address, kind and window with a count; form bodies of ``POST _search`` are held to the body limit;
a resource type that is not one is a 4xx, audited; a URL past the limit is a 414 OperationOutcome,
from the app and from ``fhir-norse serve``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from fhir_norse.api.app import create_app
from fhir_norse.auth.audit import AUTHENTICATION, TOKEN_GRANT, AuditRecorder
from fhir_norse.auth.build import build_token_service
from fhir_norse.auth.refusals import RefusalAudit
from fhir_norse.auth.tables import RateWindowRow
from fhir_norse.config import Settings
from fhir_norse.server.audit_log import render_row
from fhir_norse.store.audit_tables import AUDIT_LOG
from fhir_norse.store.db import create_engine
from fhir_norse.store.tables import ResourceRow
from tests.fhir_r4_client import parse_r4
from tests.tokens import bearer

FHIR = {"Content-Type": "application/fhir+json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
DCM = "http://dicom.nema.org/resources/ontology/DCM"
RESOURCES = ResourceRow.__table__  # type: ignore[attr-defined]


# -- helpers ----------------------------------------------------------------------------------------
@contextmanager
def app_with(database_url: str, **changes: Any) -> Iterator[FastAPI]:
    """An app on the test database with settings changed from the usual test ones."""
    settings: dict[str, Any] = {
        "database_url": database_url,
        "base_url": "http://testserver/fhir",
        "mode": "development",
        "publish_content": False,
        **changes,
    }
    app = create_app(Settings(**settings))
    try:
        yield app
    finally:
        app.state.service.storage.engine.dispose()


def audit_events(database_url: str) -> list[dict[str, Any]]:
    """Every stored AuditEvent, read from the database (a FHIR search would audit itself)."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(AUDIT_LOG).order_by(AUDIT_LOG.c.pk))
            return [orjson.loads(render_row(row)) for row in rows]
    finally:
        engine.dispose()


def refusal_events(database_url: str) -> list[dict[str, Any]]:
    """The AuditEvents of authentication: refused FHIR requests and token requests (DCM 110114)."""
    return [e for e in audit_events(database_url) if e["type"]["code"] == "110114"]


def kind_of(event: dict[str, Any]) -> str:
    """Which refusal an event of one refusal records: ``token-grant``, or the HTTP status."""
    return TOKEN_GRANT if event["subtype"][0]["code"] == "ITI-71" else str(event["outcomeDesc"])[:3]


def counted(event: dict[str, Any]) -> int | None:
    """The count of a summary event (``entity.detail`` ``count``), None for an event of one refusal."""
    for entity in event.get("entity", []):
        for detail in entity.get("detail", []):
            if detail["type"] == "count":
                return int(detail["valueString"])
    return None


def outcome_of(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome", response.text
    issue: dict[str, Any] = body["issue"][0]
    return issue


def bad_token(i: int) -> dict[str, str]:
    return {"Authorization": f"Bearer not{i}.a.token"}


# -- item 6: the audience ---------------------------------------------------------------------------
def test_the_token_audience_comes_from_configuration_not_the_host_header(database_url: str) -> None:
    """In production the FHIR base (the audience, the links) is base_url or http://<host>:<port>/fhir,
    whatever Host the request names; development without base_url still derives it, for convenience."""
    with app_with(database_url, base_url=None) as app, TestClient(app) as client:
        local, _ = app.state.token_service.issue(
            subject="x", client_id="x", scope="system/*.rs", audience="http://localhost:9999/fhir"
        )
        answer = client.get(
            "http://localhost:9999/fhir/Patient", headers={"Authorization": f"Bearer {local}"}
        )
        assert answer.status_code == 200

    engine = create_engine(database_url)
    with engine.begin() as conn:  # this app's keys are under a production passphrase of its own
        conn.exec_driver_sql("DELETE FROM auth_signing_key")
    engine.dispose()
    production = {"mode": "production", "key_passphrase": SecretStr("a long hospital-specific test secret")}
    with app_with(database_url, base_url=None, **production) as app, TestClient(app) as client:
        issue = app.state.token_service.issue
        foreign, _ = issue(
            subject="x", client_id="x", scope="system/*.rs", audience="http://evil.example/fhir"
        )
        refused = client.get(
            "http://evil.example/fhir/Patient", headers={"Authorization": f"Bearer {foreign}"}
        )
        assert refused.status_code == 401
        assert outcome_of(refused)["code"] == "login"  # its aud and iss name another server
        own, _ = issue(subject="x", client_id="x", scope="system/*.rs", audience="http://127.0.0.1:8080/fhir")
        accepted = client.get("http://evil.example/fhir/Patient", headers={"Authorization": f"Bearer {own}"})
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["link"][0]["url"] == "http://127.0.0.1:8080/fhir/Patient"
        discovery = client.get("http://evil.example/.well-known/smart-configuration").json()
        assert discovery["token_endpoint"] == "http://127.0.0.1:8080/auth/token"


# -- item 7: rate limits ----------------------------------------------------------------------------
def test_a_valid_token_is_accepted_after_bad_ones_from_its_address(app: FastAPI) -> None:
    """Only failing attempts are throttled: one client guessing does not lock out its neighbours."""
    with TestClient(app) as client:
        statuses = [client.get("/fhir/Patient", headers=bad_token(i)).status_code for i in range(25)]
        assert statuses == [401] * 20 + [429] * 5
        throttled = client.get("/fhir/Patient", headers=bad_token(99))
        assert outcome_of(throttled)["code"] == "throttled"
        assert "from this address" in outcome_of(throttled)["diagnostics"]
        assert int(throttled.headers["retry-after"]) >= 1
        valid = client.get("/fhir/Patient", headers=bearer(app))
        assert valid.status_code == 200, valid.text


def test_forwarded_addresses_are_believed_from_trusted_proxies_only(database_url: str) -> None:
    """X-Forwarded-For from an untrusted peer changes nothing; from a trusted proxy it names the client
    (limits and audit per forwarded address), and one bad token is limited from any address."""
    with app_with(database_url) as app, TestClient(app, client=("127.0.0.1", 40000)) as client:
        statuses = [
            client.get(
                "/fhir/Patient", headers={**bad_token(i), "X-Forwarded-For": f"198.51.100.{i}"}
            ).status_code
            for i in range(21)
        ]
        assert statuses == [401] * 20 + [429]

    before = len(refusal_events(database_url))
    # The failure counts are in the database (shared by workers, kept over a restart): a new window.
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.delete(RateWindowRow.__table__))  # type: ignore[attr-defined]
    engine.dispose()
    with app_with(database_url, trusted_proxies=["127.0.0.1"]) as app:
        with TestClient(app, client=("127.0.0.1", 40000)) as client:
            statuses = [
                client.get(
                    "/fhir/Patient", headers={**bad_token(i), "X-Forwarded-For": f"203.0.113.{i}"}
                ).status_code
                for i in range(25)
            ]
            assert statuses == [401] * 25
            same = [
                client.get("/fhir/Patient", headers={**bad_token(7), "X-Forwarded-For": f"192.0.2.{i}"})
                for i in range(21)
            ]
            assert [r.status_code for r in same] == [401] * 19 + [429] * 2
            assert "with this token" in outcome_of(same[-1])["diagnostics"]
        addresses = {
            e["agent"][0]["network"]["address"]
            for e in refusal_events(database_url)[before:]
            if counted(e) is None
        }
        assert {f"203.0.113.{i}" for i in range(25)} <= addresses
        assert "127.0.0.1" not in addresses


# -- items 7 and 8: the audit of refusals -----------------------------------------------------------
def test_refusals_without_a_verified_credential_are_audited_once_per_window_with_a_count(
    app: FastAPI, database_url: str
) -> None:
    """401s are audited (they were not at all) and, like 429s and refused token requests, once per
    address, kind and window: the first in full, the others as one event with their count."""
    with TestClient(app) as client:
        for _ in range(10):
            assert client.get("/fhir/Patient").status_code == 401
        statuses = [client.get("/fhir/Observation", headers=bad_token(i)).status_code for i in range(25)]
        assert statuses == [401] * 20 + [429] * 5
        for _ in range(30):
            refused = client.post("/auth/token", data={"grant_type": "client_credentials"})
            assert refused.status_code in (400, 401, 429)
        first = refusal_events(database_url)
        assert sorted(kind_of(e) for e in first) == ["401", "429", TOKEN_GRANT]
        login = next(e for e in first if kind_of(e) == "401")
        parse_r4(login)
        assert login["outcome"] == "4" and login["subtype"][0] == {
            "system": DCM,
            "code": "110122",
            "display": "Login",
        }
        assert login["outcomeDesc"].startswith("401: Authorization required")
        assert login["agent"][0]["network"]["address"] == "testclient"
        assert client.get("/fhir/Patient", headers=bearer(app)).status_code == 200
    # Shutting down records what was only counted.
    events = refusal_events(database_url)
    assert len(events) == 6
    summaries = {e["outcomeDesc"].split("(")[1].split(")")[0]: e for e in events if counted(e) is not None}
    assert {kind: counted(e) for kind, e in summaries.items()} == {
        AUTHENTICATION: 10 + 20 - 1,
        "throttled": 5 - 1,
        TOKEN_GRANT: 30 - 1,
    }
    for summary in summaries.values():
        parse_r4(summary)
        assert summary["outcome"] == "4" and summary["period"]["start"] <= summary["period"]["end"]
    assert "not0.a.token" not in orjson.dumps(events).decode()


def test_the_next_refusal_after_a_window_records_its_count(database_url: str) -> None:
    with app_with(database_url, refusal_audit_window_seconds=0.5) as app, TestClient(app) as client:
        for i in range(3):
            assert client.get("/fhir/Patient", headers=bad_token(i)).status_code == 401
        assert len(refusal_events(database_url)) == 1
        time.sleep(0.6)
        assert client.get("/fhir/Patient", headers=bad_token(3)).status_code == 401
        events = refusal_events(database_url)
        assert [counted(e) for e in events] == [None, 2, None]


class _Sink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def test_the_refusal_audit_is_bounded_in_memory() -> None:
    """Past ``max_sources`` open windows, new addresses share one window per kind ("other addresses")."""
    now = [0.0]
    sink = _Sink()
    recorder = AuditRecorder(sink, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    refusals = RefusalAudit(recorder, window=60, max_sources=3, clock=lambda: now[0])
    for i in range(10):
        for _ in range(2):
            refusals.write(refusals.authentication_refused(AUTHENTICATION, f"10.0.0.{i}", "401: no token"))
    assert refusals.open_windows == 4
    addresses = [e["agent"][0]["network"]["address"] for e in sink.events]
    assert addresses == ["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3"]  # the others' first in full
    # A refusal one window later closes every window that is over and records its count.
    now[0] = 120.0
    refusals.write(refusals.authentication_refused(AUTHENTICATION, "10.0.0.1", "401: no token"))
    summaries = [e for e in sink.events if counted(e) is not None]
    assert [counted(e) for e in summaries] == [1, 1, 1, 13]
    assert "from other addresses" in summaries[-1]["outcomeDesc"]
    assert counted(sink.events[-1]) is None and refusals.open_windows == 1
    assert refusals.flush() == []


def test_a_refusal_that_cannot_be_recorded_is_still_a_401(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_event: dict[str, Any]) -> None:
        raise RuntimeError("database down")

    app.state.refusal_audit.recorder = AuditRecorder(broken)
    with TestClient(app) as client:
        assert client.get("/fhir/Patient").status_code == 401
    assert "could not be recorded" in caplog.text


# -- item 17: the body limit on search forms --------------------------------------------------------
def test_a_search_form_is_held_to_the_body_limit(database_url: str) -> None:
    with app_with(database_url, max_body_bytes=64 * 1024) as app, TestClient(app) as client:
        client.headers.update(bearer(app))
        before = len(audit_events(database_url))
        large = b"name=" + b"a" * (100 * 1024)
        declared = client.post("/fhir/Patient/_search", content=large, headers=FORM)
        assert declared.status_code == 413
        assert (
            outcome_of(declared)["code"] == "too-costly"
            and "65536 bytes" in outcome_of(declared)["diagnostics"]
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b"name="
            for _ in range(100):
                yield b"a" * 1024

        streamed = client.post("/fhir/Patient/_search", content=chunks(), headers=FORM)
        assert streamed.status_code == 413 and outcome_of(streamed)["code"] == "too-costly"
        long_value = client.post("/fhir/Patient/_search", content=b"name=" + b"a" * 20_000, headers=FORM)
        assert long_value.status_code == 400 and outcome_of(long_value)["code"] == "too-costly"
        assert len(long_value.content) < 1000  # the value is not echoed
        operation = client.post(
            "/fhir/Patient/$validate", content=b"{" + b" " * (100 * 1024) + b"}", headers=FHIR
        )
        assert operation.status_code == 413
        assert len(audit_events(database_url)) == before  # refused before any interaction
        assert client.post("/fhir/Patient/_search", content=b"name=a", headers=FORM).status_code == 200


# -- item 18: a resource type that is not one --------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/fhir/patient/1",
        "/fhir/0",
        "/fhir/patient?name=x",
        "/fhir/patient/1/_history",
        "/fhir/patient/1/_history/1",
    ],
)
def test_a_malformed_resource_type_is_a_4xx_and_audited(
    system_client: TestClient, database_url: str, path: str
) -> None:
    word = path.split("/")[2].split("?")[0]
    answer = system_client.get(path)
    assert answer.status_code in (400, 404), answer.text
    assert f"'{word}'" in outcome_of(answer)["diagnostics"]
    refused = [e for e in audit_events(database_url) if e["outcome"] == "4"]
    assert refused and f"'{word}'" in refused[-1]["outcomeDesc"]
    assert all(
        not entity.get("what", {}).get("reference", "").startswith(word)
        for entity in refused[-1].get("entity", [])
    )


def test_a_malformed_resource_type_in_a_batch_is_a_404_entry(system_client: TestClient) -> None:
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "patient/1"}}],
    }
    answer = system_client.post("/fhir", json=batch, headers=FHIR)
    assert answer.status_code == 200, answer.text
    assert answer.json()["entry"][0]["response"]["status"].startswith("404")


# -- item 20: the URL length ------------------------------------------------------------------------
def test_a_url_past_the_limit_is_a_414_operation_outcome(app: FastAPI) -> None:
    with TestClient(app) as client:
        too_long = client.get("/fhir/Patient?name=" + "a" * (16 * 1024), headers=bearer(app))
        assert too_long.status_code == 414
        assert outcome_of(too_long)["code"] == "too-costly" and "16384" in outcome_of(too_long)["diagnostics"]
        assert too_long.headers["x-request-id"]
        assert client.get("/fhir/Patient?name=" + "a" * (16 * 1024)).status_code == 414  # before the token
        assert (
            client.get("/fhir/Patient?name=" + "a" * (16 * 1024 - 40), headers=bearer(app)).status_code == 200
        )


# -- items 7 and 20 through `fhir-norse serve` -------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _raw_get(port: int, target: bytes) -> tuple[int, bytes, bytes]:
    """Send a request line as is (httpx refuses URLs past 64 KiB); status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head.lower(), body


@dataclass(frozen=True)
class Served:
    port: int
    stop: Callable[[], int]  # gracefully (SIGTERM, as a service manager does); the exit code


@contextmanager
def serving(database_url: str) -> Iterator[Served]:
    """``fhir-norse serve`` on a free loopback port, in development mode, on a migrated database."""
    port = _free_port()
    env = {
        **os.environ,
        "FHIR_NORSE_MODE": "development",
        "FHIR_NORSE_PUBLISH_CONTENT": "false",
        "FHIR_NORSE_LOG_LEVEL": "WARNING",
        "FHIR_NORSE_PORT": str(port),
        # One process: the refusal counts below are aggregated per worker.
        "FHIR_NORSE_WORKERS": "1",
    }
    env.pop("FHIR_NORSE_BASE_URL", None)
    command = [
        sys.executable,
        "-m",
        "fhir_norse.cli",
        "serve",
        "--no-migrate",
        "--database-url",
        database_url,
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop() -> int:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
        return process.returncode

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()[1].decode()
                assert time.monotonic() < deadline, "the server did not start within 60 s"
                time.sleep(0.2)
        yield Served(port, stop)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)


def test_serve_answers_a_long_url_with_a_414_operation_outcome(database_url: str) -> None:
    """uvicorn's parser limit is above max_url_length, so the app's 414 is the answer clients see."""
    with serving(database_url) as server:
        for length in (20 * 1024, 60 * 1024):
            status, head, body = _raw_get(server.port, b"/fhir/Patient?name=" + b"a" * length)
            assert status == 414, body[:200]
            assert b"content-type: application/fhir+json" in head
            assert orjson.loads(body)["issue"][0]["code"] == "too-costly"


def test_serve_believes_no_forwarded_address_by_default(database_url: str) -> None:
    """uvicorn's default believes X-Forwarded-For from loopback, so rotating it escaped the limits;
    ``fhir-norse serve`` believes it from ``trusted_proxies`` only. The refusals' counts are recorded
    when the server is stopped."""
    with serving(database_url) as server:
        base = f"http://127.0.0.1:{server.port}/fhir"
        statuses = [
            httpx.get(
                f"{base}/Patient", headers={**bad_token(i), "X-Forwarded-For": f"198.51.100.{i}"}
            ).status_code
            for i in range(21)
        ]
        assert statuses == [401] * 20 + [429]
        settings = Settings(database_url=database_url, mode="development")
        engine = create_engine(database_url)
        token, _ = build_token_service(settings, engine).issue(
            subject="x", client_id="x", scope="system/*.rs", audience=base
        )
        engine.dispose()
        assert httpx.get(f"{base}/Patient", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert [counted(e) for e in refusal_events(database_url)] == [None, None]
        assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    counts = sorted(c for c in (counted(e) for e in refusal_events(database_url)) if c is not None)
    assert counts == [19]  # the 401s after the first; the one 429 was recorded on its own
