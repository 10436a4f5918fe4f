"""The ``fhir-norse`` command: ``migrate`` and ``serve`` really bring a server up."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from fhir_norse.store import migrate

CLI = [sys.executable, "-m", "fhir_norse.cli"]
ROOT = Path(__file__).resolve().parents[2]
CONTENT_CHECK = [sys.executable, "-m", "tools.content_check"]
DEV_ENV = {**os.environ, "FHIR_NORSE_MODE": "development", "FHIR_NORSE_LOG_LEVEL": "WARNING"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_production_mode_refuses_to_start_without_a_passphrase(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_NORSE_")}
    url = f"sqlite:///{tmp_path / 'prod.sqlite3'}"
    done = subprocess.run(
        [*CLI, "serve", "--database-url", url], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 2
    assert "FHIR_NORSE_KEY_PASSPHRASE" in done.stderr


def test_content_check_tool_passes_on_this_checkout_and_fails_on_a_broken_pack(tmp_path: Path) -> None:
    ok = subprocess.run(CONTENT_CHECK, capture_output=True, text=True, timeout=300, env=DEV_ENV, cwd=ROOT)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    root = ROOT
    broken = tmp_path / "pack"
    for folder in ("questionnaires", "mappings", "profiles"):
        shutil.copytree(root / folder, broken / folder)
    mapping = broken / "mappings" / "nf21-2.1.0.yaml"
    mapping.write_text(mapping.read_text().replace("open_if_trigger_gt: 4.5", "open_if_trigger_gt: 9", 1))
    bad = subprocess.run(
        [*CONTENT_CHECK, "--content-dir", str(broken)],
        capture_output=True,
        text=True,
        timeout=300,
        env=DEV_ENV,
        cwd=ROOT,
    )
    assert bad.returncode == 1
    assert "nf21-2.1.0.yaml" in bad.stdout + bad.stderr


def test_migrate_creates_schema_at_head(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    subprocess.run(
        [*CLI, "migrate", "--database-url", url], check=True, capture_output=True, timeout=120, env=DEV_ENV
    )
    engine = sa.create_engine(url)
    try:
        assert migrate.current_revision(engine) == migrate.heads()[0]
    finally:
        engine.dispose()


def test_serve_answers_fhir_requests(tmp_path: Path) -> None:
    port = _free_port()
    url = f"sqlite:///{tmp_path / 'serve.sqlite3'}"
    # The token's audience is the FHIR base URL, so the minting command must know the port too.
    env = {**DEV_ENV, "FHIR_NORSE_PORT": str(port)}
    process = subprocess.Popen(
        [*CLI, "serve", "--database-url", url],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
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
        assert httpx.get(f"{base}/Patient").status_code == 401
        minted = subprocess.run(
            [*CLI, "token", "--scope", "system/*.cruds", "--database-url", url],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        token = minted.stdout.strip().splitlines()[-1]
        created = httpx.post(
            f"{base}/Patient",
            json={"resourceType": "Patient"},
            headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {token}"},
        )
        assert created.status_code == 201
        assert created.headers["Location"].startswith(f"{base}/Patient/")
        # The content pack of this checkout was published at start-up.
        static = httpx.get(
            f"{base}/Questionnaire",
            params={"url": "http://fhir-norse.org/fhir/Questionnaire/nf21-static"},
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        # Both published content versions (2.1.0 and 2.2.0), in bokmål.
        found = sorted((e["resource"]["version"], e["resource"]["language"]) for e in static["entry"])
        assert found == [("2.1.0", "nb"), ("2.2.0", "nb")]
    finally:
        process.terminate()
        process.communicate(timeout=30)
