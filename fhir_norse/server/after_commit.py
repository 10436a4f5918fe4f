"""Work that must follow the commit of a repository's transaction, never precede it.

For instance personal links, which live in tables written on a connection of their own (on SQLite it
must not wait for the write lock the transaction holds, and a link must not be used up by a write that
is then rolled back), or the wake-up of a worker that reads what the transaction wrote. SQLAlchemy's
``commit`` event fires before the database commits, so the work is moved aside there and run when the
connection goes back to the pool, which :meth:`~fhir_norse.store.storage.Storage.write` does before
it returns; a rollback drops it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from fhir_norse.server.repository import Repository

log = logging.getLogger(__name__)

_PENDING = "fhir_norse.after_commit.pending"
_READY = "fhir_norse.after_commit.ready"
_installed: weakref.WeakSet[sa.Engine] = weakref.WeakSet()
_install_lock = threading.Lock()


def after_commit(repo: Repository, work: Callable[[], object]) -> None:
    """Run ``work`` once the transaction of ``repo`` has committed (not at all if it rolls back), when
    its connection goes back to the pool, which :meth:`Storage.write` does before it returns."""
    conn = repo.uow.conn
    _install(conn.engine)
    conn.info.setdefault(_PENDING, []).append(work)


def _install(engine: sa.Engine) -> None:
    with _install_lock:
        if engine in _installed:
            return
        sa.event.listen(engine, "commit", _on_commit)
        sa.event.listen(engine, "rollback", _on_rollback)
        sa.event.listen(engine.pool, "checkin", _on_checkin)
        _installed.add(engine)


def _on_commit(conn: sa.Connection) -> None:
    pending = conn.info.pop(_PENDING, None)
    if pending:
        conn.info.setdefault(_READY, []).extend(pending)


def _on_rollback(conn: sa.Connection) -> None:
    conn.info.pop(_PENDING, None)


def _on_checkin(dbapi_connection: Any, record: Any) -> None:
    if record is None:
        return
    ready = record.info.pop(_READY, None)
    record.info.pop(_PENDING, None)
    for work in ready or ():
        try:
            work()
        except Exception:  # pragma: no cover - logged; what was committed is what counts
            log.exception("work after commit failed")
