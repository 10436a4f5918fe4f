"""Writers of several processes on one SQLite database queue on a file lock, not in SQLite's busy handler.

Two :class:`Storage` objects on the same file stand for two server workers: each has its own open file
description of the lock file, so ``flock`` excludes one from the other exactly as between processes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import sqlalchemy as sa

from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from fhir_norse.store.storage import Storage


def _storage(path: Path) -> Storage:
    return Storage(create_engine(f"sqlite:///{path}", busy_timeout_ms=50))


def test_a_second_writer_waits_for_the_first_and_is_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    migrate.upgrade(create_engine(f"sqlite:///{path}"))
    first, second = _storage(path), _storage(path)
    order: list[str] = []
    holding = threading.Event()

    def hold() -> None:
        with first.write() as uow:
            uow.conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            order.append("first begins")
            holding.set()
            # Longer than the 50 ms busy timeout: without the file lock the second writer would get
            # "database is locked" from SQLite.
            time.sleep(0.3)
            order.append("first commits")

    def write_second() -> None:
        holding.wait()
        with second.write() as uow:
            order.append("second begins")
            uow.conn.exec_driver_sql("INSERT INTO t VALUES (1)")

    threads = [threading.Thread(target=hold), threading.Thread(target=write_second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert order == ["first begins", "first commits", "second begins"]
    with second.read() as view:
        assert view.conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 1
    assert (tmp_path / "db.sqlite3-writer.lock").exists()


def test_the_lock_is_reentrant_within_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    storage, other = _storage(path), _storage(path)
    lock = storage._process_lock
    assert lock is not None
    with lock, lock:
        pass
    # Released after the outer block: another process (here another Storage) can write at once.
    with other.write() as uow:
        uow.conn.execute(sa.text("SELECT 1"))


def test_no_file_lock_for_an_in_memory_database() -> None:
    assert Storage(create_engine("sqlite://"))._process_lock is None
