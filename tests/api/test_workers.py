"""``fhir-norse serve --workers 2``: two processes answer, concurrent reads and writes all succeed, and
a rate limit holds across the workers (counted in the database, not per process).

The server runs as a subprocess on a free port, on SQLite and (with FHIR_NORSE_TEST_POSTGRES_URL) on
PostgreSQL. Which worker answered is visible in development mode only, as ``X-Worker-Pid``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

CLI = [sys.executable, "-m", "fhir_norse.cli"]
TOKEN_LIMIT = 5
FHIR_JSON = "application/fhir+json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    root: str
    token: str

    @property
    def base(self) -> str:
        return f"{self.root}/fhir"


def _fresh_connection() -> httpx.Client:
    """A client that opens a new connection per request, so the kernel may hand each to either worker."""
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=30)


@pytest.fixture
def server(database_url: str) -> Iterator[Server]:
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FHIR_NORSE_")},
        "FHIR_NORSE_MODE": "development",
        "FHIR_NORSE_LOG_LEVEL": "WARNING",
        "FHIR_NORSE_PORT": str(port),
        "FHIR_NORSE_PUBLISH_CONTENT": "false",
        "FHIR_NORSE_TOKEN_RATE_PER_MINUTE": str(TOKEN_LIMIT),
    }
    process = subprocess.Popen(
        [*CLI, "serve", "--workers", "2", "--database-url", database_url],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "server exited before answering"
            assert time.monotonic() < deadline, "server did not start within 90 s"
            time.sleep(0.2)
        minted = subprocess.run(
            [*CLI, "token", "--scope", "system/*.cruds", "--database-url", database_url],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        yield Server(process, root, minted.stdout.strip().splitlines()[-1])
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
        assert b"database is locked" not in err, err.decode(errors="replace")[-2000:]


def _worker_pids(server: Server) -> set[str]:
    with _fresh_connection() as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.get(f"{server.root}/health"), range(64)))
    assert all(a.status_code == 200 for a in answers)
    return {a.headers["x-worker-pid"] for a in answers}


def test_two_workers_answer_concurrent_reads_and_writes(server: Server) -> None:
    # The first worker may answer /health while the second is still building its app (on a busy
    # machine, seconds apart): ask until both have answered, or the start-up deadline passes.
    pids: set[str] = set()
    deadline = time.monotonic() + 60
    while len(pids) < 2 and time.monotonic() < deadline:
        pids |= _worker_pids(server)
    assert len(pids) == 2, pids
    assert str(server.process.pid) not in pids  # the workers, not the supervising process

    auth = {"Authorization": f"Bearer {server.token}", "Content-Type": FHIR_JSON}

    def create_and_read(n: int) -> list[tuple[int, str]]:
        with _fresh_connection() as client:
            created = client.post(
                f"{server.base}/Patient",
                json={"resourceType": "Patient", "name": [{"family": f"Worker{n}"}]},
                headers=auth,
            )
            assert created.status_code == 201, created.text
            location = created.headers["Location"].split("/_history")[0]
            read = client.get(location, headers=auth)
            updated = client.put(
                location,
                json={**read.json(), "active": True},
                headers={**auth, "If-Match": read.headers["ETag"]},
            )
            searched = client.get(f"{server.base}/Patient", params={"family": f"Worker{n}"}, headers=auth)
            return [
                (r.status_code, r.headers.get("x-worker-pid", "")) for r in (created, read, updated, searched)
            ]

    with ThreadPoolExecutor(8) as pool:
        results = [r for batch in pool.map(create_and_read, range(48)) for r in batch]
    statuses = sorted({status for status, _ in results})
    assert statuses == [200, 201], statuses
    assert {pid for _, pid in results} == pids  # both workers wrote and read

    with _fresh_connection() as client:
        bundle = client.get(f"{server.base}/Patient", params={"_summary": "count"}, headers=auth).json()
    assert bundle["total"] == 48


def test_the_token_rate_limit_holds_across_workers(server: Server) -> None:
    assert len(_worker_pids(server)) == 2
    # A fixed window of a minute: do not straddle its end.
    if time.time() % 60 > 45:
        time.sleep(60 - time.time() % 60 + 0.5)

    def token_request(_: int) -> tuple[int, str]:
        with _fresh_connection() as client:
            answer = client.post(
                f"{server.root}/auth/token",
                content=b"grant_type=client_credentials",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            return answer.status_code, answer.headers["x-worker-pid"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(token_request, range(40)))
    counted = [a for a in answers if a[0] != 429]
    refused = [a for a in answers if a[0] == 429]
    # Exactly the limit got through (each refused as a bad request: no assertion), whichever worker
    # took them; every other request was throttled, by both workers.
    assert len(counted) == TOKEN_LIMIT, answers
    assert {status for status, _ in counted} == {400}
    assert len({pid for _, pid in refused}) == 2, answers


def test_workers_end_when_the_supervisor_is_killed(server: Server) -> None:
    """kill -9 of ``fhir-norse serve`` leaves no worker serving on the port alone."""
    pids = {int(pid) for pid in _worker_pids(server)}
    server.process.kill()
    server.process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} still running"
        time.sleep(0.2)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.root}/health", timeout=2)


def _alive(pid: int) -> bool:
    """Running, not a zombie awaiting its (dead) parent's reaper."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
