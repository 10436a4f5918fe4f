"""The delivery worker is woken when subscription events commit, not only at its poll
(fhir_norse/server/subscriptions/wakeup.py), on SQLite and PostgreSQL.

The worker thread runs (the app's lifespan starts it) with a poll interval of a minute; every
notification is awaited with a deadline of :data:`DEADLINE_S`, far below it, so one that arrives came
from a wake-up: in this process after the writing transaction's commit, and from another app (its own
engine, as another process would have) by ``NOTIFY`` on PostgreSQL and by a datagram to the lease
holder's socket on SQLite. When the ``LISTEN`` connection
breaks, the worker falls back to its poll and listens again."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.server.subscriptions.delivery import SubscriptionDelivery
from fhir_norse.server.subscriptions.wakeup import Listener
from tests.api.test_subscriptions import score, subscribe, subscription
from tests.fhir_r4_client import check_response
from tests.intake_support import create_patient, publish_questionnaires
from tests.support.receiver import Receiver, receiver
from tests.tokens import bearer

INTERVAL_S = 60.0
DEADLINE_S = 10.0


def _until(condition: Callable[[], object], what: str, seconds: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.02)


@pytest.fixture
def hook() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


@contextmanager
def running(
    settings: Settings, interval_s: float, *, publish: bool = True
) -> Iterator[tuple[FastAPI, TestClient]]:
    """An app whose delivery worker polls every ``interval_s`` (0: no worker thread), and its client;
    ``publish``: store the Questionnaires (once per database)."""
    app = create_app(settings.model_copy(update={"subscription_interval_s": interval_s}))
    if publish:
        publish_questionnaires(app.state.service)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            client.headers.update(bearer(app))
            client.event_hooks["response"] = [check_response]
            yield app, client
    finally:
        app.state.service.storage.engine.dispose()


def _numbers(hook: Receiver) -> list[int]:
    return [n for r in hook.events() for n in r.event_numbers()]


def _delivered(hook: Receiver, count: int) -> Callable[[], bool]:
    return lambda: len(hook.events()) == count


def test_a_committed_event_wakes_the_worker_long_before_its_poll(settings: Settings, hook: Receiver) -> None:
    """The handshake and each scored response's notification arrive within the deadline (the poll is a
    minute away)."""
    with running(settings, INTERVAL_S) as (_app, client):
        patient = create_patient(client)
        subscribe(client, subscription(hook.url))
        # The Subscription written requested wakes the worker too: its handshake is due.
        _until(lambda: hook.of_kind("handshake"), "the handshake")
        for number in (1, 2, 3):
            score(client, patient)
            _until(_delivered(hook, number), f"event notification {number}")
        assert _numbers(hook) == [1, 2, 3]


# ---------------------------------------------------------------------- other processes


def _pg(settings: Settings) -> None:
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: NOTIFY/LISTEN between processes (SQLite serves one process)")


def _listener_pids(app: FastAPI) -> list[int]:
    """The backends of ``app``'s worker's LISTEN connection (by its application_name)."""
    worker: SubscriptionDelivery = app.state.subscription_delivery
    with app.state.service.storage.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
            {"name": f"{worker.thread_name}-{worker.holder}"[:63]},
        )
        return [int(r[0]) for r in rows]


def _listening(app: FastAPI) -> bool:
    """Whether ``app``'s worker listens to other processes: its LISTEN backend (PostgreSQL), its socket
    bound to the database's address (SQLite)."""
    if app.state.settings.database_url.startswith("postgresql"):
        return bool(_listener_pids(app))
    worker: SubscriptionDelivery = app.state.subscription_delivery
    return worker._listener.listening


def test_an_event_written_by_another_process_wakes_the_worker(settings: Settings, hook: Receiver) -> None:
    with (
        running(settings, INTERVAL_S) as (deliverer, _),
        running(settings, 0, publish=False) as (_writer, client),
    ):
        _until(lambda: _listening(deliverer), "the worker to listen")
        patient = create_patient(client)
        subscribe(client, subscription(hook.url))  # written by the other app: NOTIFY wakes the worker
        _until(lambda: hook.of_kind("handshake"), "the handshake")
        for number in (1, 2):
            score(client, patient)
            _until(_delivered(hook, number), f"event notification {number}")
        assert _numbers(hook) == [1, 2]


def test_a_broken_listen_connection_falls_back_to_the_poll(
    settings: Settings, hook: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's LISTEN backend is terminated: events another process writes still arrive, by the
    poll (here every 0.3 s), and the failure is logged."""
    _pg(settings)
    caplog.set_level(logging.WARNING, "fhir_norse.server.subscriptions.wakeup")
    with running(settings, 0.3) as (deliverer, _), running(settings, 0, publish=False) as (_writer, client):
        _until(lambda: _listener_pids(deliverer), "the worker to listen")
        with deliverer.state.service.storage.engine.connect() as conn:
            for pid in _listener_pids(deliverer):
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        _until(lambda: not _listener_pids(deliverer), "the LISTEN backend to end")
        patient = create_patient(client)
        subscribe(client, subscription(hook.url))
        _until(lambda: hook.of_kind("handshake"), "the handshake")
        score(client, patient)
        _until(lambda: len(hook.events()) == 1, "the event notification")
        _until(lambda: "cannot listen" in caplog.text, "the warning")


def test_a_listener_that_cannot_connect_waits_on_the_in_process_wake_up_alone() -> None:
    """Nothing listens on the port: ``open`` fails (retried only after ``retry_s``) and ``wait`` falls
    back to the in-process event, which ends it."""
    engine = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        listener = Listener(engine, "test-listener", retry_s=3600)
        assert listener.open() is False
        assert not listener.listening
        assert listener.open() is False  # not again before retry_s
        woken = threading.Event()
        waiting = threading.Thread(target=listener.wait, args=(INTERVAL_S, woken))
        waiting.start()
        woken.set()
        waiting.join(DEADLINE_S)
        assert not waiting.is_alive()  # the wake-up ended the wait, not the minute
        listener.ring()  # no pipe without a connection: nothing to do, no error
        listener.close()
    finally:
        engine.dispose()
