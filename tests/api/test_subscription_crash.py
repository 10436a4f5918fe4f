"""At least once across a crash: ``fhir-norse serve`` is killed with SIGKILL while a notification is
with the subscriber and not yet acknowledged; once restarted on the same database, the server delivers
the event again (Subscriptions R5 Backport: an event is marked delivered only after a 2xx).

The server runs as a subprocess in a session of its own, so ``kill -9`` of the process group leaves
nothing behind, on SQLite and (with FHIR_NORSE_TEST_POSTGRES_URL) on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from fhir_norse.auth.build import build_token_service
from fhir_norse.config import Settings
from fhir_norse.store.db import create_engine
from tests.api.test_workers import _free_port
from tests.support.receiver import receiver

CLI = [sys.executable, "-m", "fhir_norse.cli"]
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _until(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.05)


class Serve:
    """``fhir-norse serve`` on ``database_url`` and a free port, started and killed at will."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.port = _free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FHIR_NORSE_")},
            "FHIR_NORSE_MODE": "development",
            "FHIR_NORSE_LOG_LEVEL": "WARNING",
            "FHIR_NORSE_PORT": str(self.port),
            "FHIR_NORSE_PUBLISH_CONTENT": "false",
            "FHIR_NORSE_SCHEDULER_INTERVAL_S": "0",
            "FHIR_NORSE_SUBSCRIPTION_INTERVAL_S": "0.1",
            "FHIR_NORSE_SUBSCRIPTION_RETRY_BASE_S": "0.1",
            "FHIR_NORSE_SUBSCRIPTION_TIMEOUT_S": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*CLI, "serve", "--workers", "1", "--database-url", self.database_url],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def up() -> bool:
            assert self.process is not None and self.process.poll() is None, "server exited"
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _until(up, "the server to start", 90)

    def kill(self) -> None:
        """SIGKILL to every process of the server: no shutdown step runs."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def token(self) -> str:
        """A system token signed by the server's key (what ``fhir-norse token`` mints, in-process)."""
        settings = Settings(database_url=self.database_url, mode="development", port=self.port)
        engine = create_engine(self.database_url)
        try:
            token, _ = build_token_service(settings, engine).issue(
                subject="crash-test",
                client_id="crash-test",
                scope="system/*.cruds",
                audience=settings.fhir_base_url(),
            )
        finally:
            engine.dispose()
        return token


@pytest.fixture
def serve(database_url: str) -> Iterator[Serve]:
    server = Serve(database_url)
    try:
        yield server
    finally:
        server.kill()


def test_an_event_unacknowledged_at_a_crash_is_delivered_after_restart(serve: Serve) -> None:
    with receiver() as hook:
        serve.start()
        auth = {"Authorization": f"Bearer {serve.token()}", **FHIR_JSON}
        with httpx.Client(timeout=30) as client:
            patient = client.post(f"{serve.base}/Patient", json={"resourceType": "Patient"}, headers=auth)
            subscription = {
                "resourceType": "Subscription",
                "status": "requested",
                "reason": "crash test",
                "criteria": "http://fhir-norse.org/fhir/SubscriptionTopic/alert",
                "channel": {
                    "type": "rest-hook",
                    "endpoint": hook.url,
                    "payload": "application/fhir+json",
                    "_payload": {
                        "extension": [{"url": BACKPORT + "backport-payload-content", "valueCode": "id-only"}]
                    },
                },
            }
            assert (
                client.post(f"{serve.base}/Subscription", json=subscription, headers=auth).status_code == 201
            )
            _until(lambda: bool(hook.of_kind("handshake")), "the handshake")
            release = threading.Event()
            hook.hold = release
            flag = {
                "resourceType": "Flag",
                "status": "active",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/flag-category",
                                "code": "clinical",
                            }
                        ]
                    }
                ],
                "code": {
                    "coding": [
                        {"system": "http://fhir-norse.org/fhir/CodeSystem/rom-alerts", "code": "suicide-risk"}
                    ]
                },
                "subject": {"reference": f"Patient/{patient.json()['id']}"},
            }
            assert client.post(f"{serve.base}/Flag", json=flag, headers=auth).status_code == 201
        _until(lambda: hook.held > 0, "the notification to reach the receiver")
        serve.kill()  # while the receiver holds the POST: never acknowledged
        hook.hold = None
        release.set()
        assert hook.events() == []
        serve.start()
        _until(lambda: bool(hook.events()), "the event after the restart")
        (delivered,) = hook.events()
        assert delivered.event_numbers() == [1]
