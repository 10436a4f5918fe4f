"""Background workers of a server process: a daemon thread that runs a round every ``interval_s``
(:class:`PeriodicWorker`), and one whose rounds only the holder of a named lease runs
(:class:`LeasedWorker`).

**The thread** calls :meth:`PeriodicWorker.tick` in a loop and waits ``interval_s`` between rounds; an
exception of a round is logged and the next round runs all the same. :meth:`PeriodicWorker.wake` ends
the wait at once (work arrived: the next round starts now); :meth:`PeriodicWorker.stop` ends it and
joins the thread. An interval of 0 starts no thread (tests call ``tick`` themselves).

**The lease** is one row of ``scheduler_lease`` per job name (:mod:`fhir_norse.store.scheduling_tables`):
a worker holds it while its ``holder`` is written there and ``expires_at`` lies ahead. One ``UPDATE ...
WHERE name = :name AND (expires_at < now OR holder = me)`` takes or renews it, atomically on SQLite and
PostgreSQL alike; a crashed holder's lease expires after ``lease`` and another worker takes it.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from fhir_norse.store.scheduling_tables import SCHEDULER_LEASE
from fhir_norse.store.storage import Storage

EPOCH = datetime(1970, 1, 1)


def new_holder() -> str:
    """A worker's name in the lease table and job rows: ``<pid>-<random>``, unique among processes."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def naive_utc(moment: datetime) -> datetime:
    """``moment`` as the naive UTC the tables store (a naive ``moment`` is taken to be UTC already)."""
    return moment if moment.tzinfo is None else moment.astimezone(UTC).replace(tzinfo=None)


class PeriodicWorker:
    """Runs :meth:`tick` every ``interval_s`` in a daemon thread named ``thread_name`` (module doc)."""

    thread_name = "fhir-norse-worker"

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = logging.getLogger(type(self).__module__)

    def tick(self) -> object:
        """One round of the worker's own work."""
        raise NotImplementedError

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (a long round should end early)."""
        return self._stop.is_set()

    def start(self) -> None:
        """Tick every ``interval_s`` in a daemon thread (nothing if the interval is 0)."""
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread (after the round it is in) and wait for it at most ``timeout`` seconds."""
        thread, self._thread = self._thread, None
        self._stop.set()
        self.wake()
        if thread is not None:
            thread.join(timeout)
            self.stopped()

    def stopped(self) -> None:
        """What to give back once the thread has ended (the default: nothing)."""

    def wake(self) -> None:
        """End the wait between two rounds now (from any thread); a round under way runs again after."""
        self._wake.set()

    def wait(self, timeout: float) -> None:
        """Wait between two rounds: ``timeout`` seconds, or until :meth:`wake` or :meth:`stop`."""
        self._wake.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared before the round reads: a wake-up during the round makes the next one start at once.
            self._wake.clear()
            try:
                self.tick()
            except Exception:
                self._log.exception("%s: a round failed; the next one tries again", self.thread_name)
            if not self._stop.is_set():
                self.wait(self.interval_s)


class LeasedWorker(PeriodicWorker):
    """A :class:`PeriodicWorker` whose rounds only the holder of the lease ``lease_name`` runs (module
    doc); ``lease`` is how long one :meth:`acquire` holds it."""

    lease_name = ""

    def __init__(self, storage: Storage, *, interval_s: float, lease: timedelta) -> None:
        super().__init__(interval_s)
        self.storage = storage
        self.lease = lease
        self.holder = new_holder()
        # Until when this worker holds the lease, as far as it knows (naive UTC; EPOCH: not held).
        self.lease_until = EPOCH

    def acquire(self, now: datetime) -> bool:
        """Take or renew the lease at ``now`` (one UPDATE decides, on SQLite and PostgreSQL alike)."""
        naive = naive_utc(now)
        lease = SCHEDULER_LEASE
        with self.storage.write() as uow:
            uow.conn.execute(
                sa.text(
                    "INSERT INTO scheduler_lease (name, holder, expires_at) VALUES (:n, '', :t) "
                    "ON CONFLICT (name) DO NOTHING"
                ),
                {"n": self.lease_name, "t": EPOCH},
            )
            result = uow.conn.execute(
                sa.update(lease)
                .where(
                    lease.c.name == self.lease_name,
                    sa.or_(lease.c.expires_at < naive, lease.c.holder == self.holder),
                )
                .values(holder=self.holder, expires_at=naive + self.lease)
            )
            held = bool(result.rowcount)
        self.lease_until = naive + self.lease if held else EPOCH
        return held

    def release(self) -> None:
        """Give the lease up (if this worker holds it): another worker may take it at once."""
        lease = SCHEDULER_LEASE
        with self.storage.write() as uow:
            uow.conn.execute(
                sa.update(lease)
                .where(lease.c.name == self.lease_name, lease.c.holder == self.holder)
                .values(expires_at=EPOCH)
            )
        self.lease_until = EPOCH

    def stopped(self) -> None:
        try:
            self.release()
        except sa.exc.DBAPIError:  # pragma: no cover - the lease simply expires
            self._log.warning("%s: lease %s not released", self.thread_name, self.lease_name)
