"""Waking the delivery worker when subscription events are committed, rather than at its next poll.

* **In this process**: the outbox (:class:`~.hooks.OutboxHook`), for a transaction that wrote one or
  more events, and the Subscription hook, for a Subscription written ``requested`` (its handshake is
  due), ring the :class:`Doorbell` they share; it calls its listeners once that transaction has
  committed (:func:`~fhir_norse.server.after_commit.after_commit`: never before, so the worker's read
  sees what was written). The delivery worker listens (:meth:`.delivery.SubscriptionDelivery.wake`).
* **Across processes, on PostgreSQL**: the writing transaction also runs ``NOTIFY`` on
  :data:`CHANNEL`, which PostgreSQL delivers at commit (and drops on rollback), and the worker's thread
  waits on a ``LISTEN`` connection of its own (:class:`Listener`) beside the in-process wake-up. When
  that connection cannot be opened or breaks, the worker falls back to its interval poll and tries to
  listen again after ``retry_s``.
* **Across processes, on SQLite** (the server's processes share one database file on one machine): the
  worker that holds the delivery lease binds a Unix datagram socket in Linux's abstract namespace, named
  after the database file (:func:`sqlite_address`; no file to clean up, gone when its process is), and
  gives it up with the lease; after a commit that gave it work, each process sends one byte to that
  name (no one bound, or a full queue: nothing happens, the poll remains). Elsewhere than Linux, SQLite
  has the in-process wake-up and the poll.

The poll every ``interval_s`` stays as the safety net either way: a wake-up only makes it come sooner.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable

import psycopg
import sqlalchemy as sa
from psycopg.rows import TupleRow

from fhir_norse.server.after_commit import after_commit
from fhir_norse.server.repository import Repository

log = logging.getLogger(__name__)

CHANNEL = "fhir_norse_subscription_events"


def sqlite_address(engine: sa.Engine) -> bytes | None:
    """The abstract Unix socket name the delivery worker of ``engine``'s SQLite database file listens on
    (module doc); None on PostgreSQL, for an in-memory database, and outside Linux."""
    if engine.dialect.name != "sqlite" or not sys.platform.startswith("linux"):
        return None
    path = engine.url.database
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
    return b"\0fhir-norse-subscriptions-" + digest.encode()


class Doorbell:
    """Wakes the delivery workers once a transaction that gave them work has committed (module doc)."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._address: bytes | None = None

    def listen(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each such commit in this process (on the writer's thread: be quick)."""
        self._listeners.append(listener)

    def across_processes(self, address: bytes | None) -> None:
        """After each such commit, also send a byte to the SQLite lease holder's ``address``
        (:func:`sqlite_address`; None: no one outside this process is told)."""
        self._address = address

    def ring_after_commit(self, repo: Repository) -> None:
        """Wake the workers when ``repo``'s transaction commits: its listeners here and, on PostgreSQL,
        every process's by ``NOTIFY`` in the transaction (delivered at commit, dropped on rollback).
        Once per transaction, however often it is called."""
        key = (Doorbell, id(self))
        if repo.memo.get(key):
            return
        repo.memo[key] = True
        conn = repo.uow.conn
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text(f"NOTIFY {CHANNEL}"))
        after_commit(repo, self._ring)

    def _ring(self) -> None:
        for listener in list(self._listeners):
            listener()
        if self._address is not None:
            self._tell(self._address)

    @staticmethod
    def _tell(address: bytes) -> None:
        # A socket per commit that gave work (some microseconds): nothing kept open to close. No one
        # bound (ECONNREFUSED) or the queue is full (EAGAIN): nothing happens, the poll remains.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender, contextlib.suppress(OSError):
            sender.setblocking(False)
            sender.sendto(b"\0", address)


class Listener:
    """A ``LISTEN`` connection to :data:`CHANNEL` on ``engine``'s database (``application_name``
    ``name``) or, on SQLite, the datagram socket bound to :func:`sqlite_address` while this worker
    holds the lease (``holding``), waited on by one thread together with an in-process wake-up
    (:meth:`ring`, from any thread)."""

    def __init__(self, engine: sa.Engine, name: str, *, retry_s: float = 30.0) -> None:
        self.engine = engine
        self.name = name
        self.retry_s = retry_s
        self.address = sqlite_address(engine)
        self.enabled = engine.dialect.name == "postgresql" or self.address is not None
        # SQLite: whether this worker holds the delivery lease (only the holder binds the address).
        self.holding = False
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._sock: socket.socket | None = None
        # A self-pipe: what ring() writes ends a select() on the connection at once.
        self._pipe: tuple[int, int] | None = None
        self._pipe_lock = threading.Lock()
        self._retry_at = 0.0

    @property
    def listening(self) -> bool:
        return self._conn is not None or self._sock is not None

    def open(self) -> bool:
        """Connect and ``LISTEN`` (SQLite: bind while ``holding``, unbind when not) if not listening
        yet (and not within ``retry_s`` of a failure); True when it has just begun listening (events
        committed before that were not announced to it)."""
        if self.address is not None:
            return self._bind(self.address)
        if not self.enabled or self._conn is not None or time.monotonic() < self._retry_at:
            return False
        cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
        cparams = {**cparams, "application_name": self.name[:63]}
        try:
            conn: psycopg.Connection[TupleRow] = psycopg.connect(*cargs, **cparams, autocommit=True)
        except psycopg.Error as error:
            self._failed(error)
            return False
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as error:
            conn.close()
            self._failed(error)
            return False
        with self._pipe_lock:
            self._conn, self._pipe = conn, self._new_pipe()
        return True

    def _bind(self, address: bytes) -> bool:
        if not self.holding:
            if self._sock is not None:
                self.close()  # the lease went to another process: so does the name
            return False
        if self._sock is not None:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(address)
        except OSError as error:
            sock.close()
            if error.errno != errno.EADDRINUSE:
                self._failed(error)
            # In use: a holder before this one has not let it go yet; the next wait tries again.
            return False
        sock.setblocking(False)
        with self._pipe_lock:
            self._sock, self._pipe = sock, self._new_pipe()
        return True

    @staticmethod
    def _new_pipe() -> tuple[int, int]:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        return read, write

    def wait(self, timeout: float, woken: threading.Event) -> None:
        """Wait at most ``timeout`` seconds for a notification, :meth:`ring` or ``woken`` (checked first);
        without a connection, on ``woken`` alone."""
        conn, sock, pipe = self._conn, self._sock, self._pipe
        if (conn is None and sock is None) or pipe is None:
            woken.wait(timeout)
            return
        if woken.is_set():
            return
        try:
            source = conn.fileno() if conn is not None else sock.fileno() if sock is not None else -1
            ready, _, _ = select.select([source, pipe[0]], [], [], timeout)
            if pipe[0] in ready:
                self._drain(pipe[0])
            if source in ready:
                if conn is not None:
                    # Consume what arrived (and notice a closed connection).
                    for _ in conn.notifies(timeout=0):
                        pass
                elif sock is not None:
                    self._drain_socket(sock)
        except (psycopg.Error, OSError) as error:
            self.close()
            self._failed(error)

    def ring(self) -> None:
        """End a :meth:`wait` under way now (from any thread)."""
        with self._pipe_lock:
            if self._pipe is None:
                return
            with contextlib.suppress(BlockingIOError):  # the pipe is full of wake-ups already
                os.write(self._pipe[1], b"\0")

    def close(self) -> None:
        with self._pipe_lock:
            conn, sock, pipe = self._conn, self._sock, self._pipe
            self._conn = self._sock = self._pipe = None
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])
        if sock is not None:
            sock.close()
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # it was broken anyway
                conn.close()

    def _failed(self, error: Exception) -> None:
        self._retry_at = time.monotonic() + self.retry_s
        log.warning(
            "subscription wake-up: cannot listen on %s (%s); polling, trying again in %g s",
            CHANNEL,
            type(error).__name__,
            self.retry_s,
        )

    @staticmethod
    def _drain_socket(sock: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            while sock.recv(64):
                pass

    @staticmethod
    def _drain(fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 512):
                pass
