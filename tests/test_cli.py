"""The ``fhir-norse`` command: ``migrate`` and ``serve`` really bring a server up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from fhir_norse.store import migrate

CLI = [sys.executable, "-m", "fhir_norse.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_migrate_creates_schema_at_head(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    subprocess.run([*CLI, "migrate", "--database-url", url], check=True, capture_output=True, timeout=120)
    engine = sa.create_engine(url)
    try:
        assert migrate.current_revision(engine) == migrate.heads()[0]
    finally:
        engine.dispose()


def test_serve_answers_fhir_requests(tmp_path: Path) -> None:
    port = _free_port()
    url = f"sqlite:///{tmp_path / 'serve.sqlite3'}"
    env = {**os.environ, "FHIR_NORSE_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen(
        [*CLI, "serve", "--database-url", url, "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}/fhir"
        deadline = time.monotonic() + 60
        while True:
            try:
                metadata = httpx.get(f"{base}/metadata", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, "server exited before answering"
                assert time.monotonic() < deadline, "server did not start within 60 s"
                time.sleep(0.2)
        assert metadata.status_code == 200
        assert metadata.json()["fhirVersion"] == "4.0.1"
        created = httpx.post(f"{base}/Patient", json={"resourceType": "Patient"},
                             headers={"Content-Type": "application/fhir+json"})
        assert created.status_code == 201
        assert created.headers["Location"].startswith(f"{base}/Patient/")
    finally:
        process.terminate()
        process.communicate(timeout=30)
