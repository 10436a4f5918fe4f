"""The rate limits shared by all server workers: counters in the database (``auth_rate_window``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from fhir_norse.auth.ratelimit import SharedRateLimiter
from fhir_norse.auth.tables import RateWindowRow
from fhir_norse.store.db import create_engine

RATE = RateWindowRow.__table__  # type: ignore[attr-defined]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.delete(RATE))
    yield engine
    engine.dispose()


def _rows(engine: sa.Engine) -> list[tuple[str, str, int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(RATE.c.limiter, RATE.c.key, RATE.c.slot, RATE.c.hits)).all()
    return sorted((r.limiter, r.key, r.slot, r.hits) for r in rows)


def test_two_limiters_on_one_database_share_the_count(engine: sa.Engine) -> None:
    """Two workers (two limiter objects, as two processes have) allow ``limit`` together, not each."""
    clock = Clock(6000.0)  # the start of window 100 of 60 s
    first = SharedRateLimiter(engine, "token-address", 3, 60.0, clock=clock)
    second = SharedRateLimiter(engine, "token-address", 3, 60.0, clock=clock)
    assert first.hit("10.0.0.1") is None
    assert second.hit("10.0.0.1") is None
    assert first.hit("10.0.0.1") is None
    wait = second.hit("10.0.0.1")
    assert wait == pytest.approx(60.0)  # until the window ends
    clock.now += 15
    assert first.hit("10.0.0.1") == pytest.approx(45.0)
    assert first.blocked("10.0.0.1") is not None
    # Per key, and per limiter name.
    assert first.hit("10.0.0.2") is None
    assert SharedRateLimiter(engine, "auth-address", 3, 60.0, clock=clock).hit("10.0.0.1") is None
    assert ("token-address", "10.0.0.1", 100, 5) in _rows(engine)


def test_a_new_window_allows_again_and_old_counters_are_deleted(engine: sa.Engine) -> None:
    clock = Clock(6000.0)
    limiter = SharedRateLimiter(engine, "auth-token", 1, 60.0, clock=clock)
    assert limiter.hit("k") is None
    assert limiter.hit("k") is not None
    clock.now += 60
    assert limiter.blocked("k") is None
    assert limiter.hit("k") is None
    assert _rows(engine) == [("auth-token", "k", 101, 1)]


def test_a_key_over_its_limit_is_refused_from_memory(engine: sa.Engine) -> None:
    """Once over, a worker refuses the key until the window ends without writing to the database."""
    clock = Clock(6000.0)
    limiter = SharedRateLimiter(engine, "auth-address", 1, 60.0, clock=clock)
    assert limiter.hit("flood") is None
    assert limiter.hit("flood") is not None
    before = _rows(engine)
    for _ in range(50):
        assert limiter.hit("flood") is not None
    assert _rows(engine) == before


def test_reset_and_off(engine: sa.Engine) -> None:
    clock = Clock(6000.0)
    limiter = SharedRateLimiter(engine, "token-client", 1, 60.0, clock=clock)
    assert limiter.hit("a") is None
    assert limiter.hit("a") is not None
    limiter.reset("a")
    assert limiter.hit("a") is None
    limiter.reset()
    assert _rows(engine) == []
    off = SharedRateLimiter(engine, "token-client", 0)
    assert not off.enabled
    assert all(off.hit("a") is None for _ in range(5))
    assert _rows(engine) == []


def test_a_long_key_is_stored_as_its_hash(engine: sa.Engine) -> None:
    limiter = SharedRateLimiter(engine, "auth-token", 1, 60.0, clock=Clock(6000.0))
    long_key = "x" * 1000
    assert limiter.hit(long_key) is None
    assert limiter.hit(long_key) is not None
    (row,) = _rows(engine)
    assert row[1].startswith("h:") and len(row[1]) <= 128


def test_concurrent_hits_are_counted_exactly(engine: sa.Engine) -> None:
    limiter = SharedRateLimiter(engine, "token-address", 25, 3600.0, clock=Clock(7200.0))
    other = SharedRateLimiter(engine, "token-address", 25, 3600.0, clock=Clock(7200.0))
    allowed: list[int] = []

    def worker(which: SharedRateLimiter) -> None:
        allowed.append(sum(which.hit("k") is None for _ in range(10)))

    threads = [threading.Thread(target=worker, args=(limiter if i % 2 else other,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 25
    # Each limiter stopped writing once it saw the key over the limit: a few more counted, not all 60.
    ((_, _, slot, hits),) = _rows(engine)
    assert slot == 2 and 25 < hits < 60


def test_without_its_table_the_limiter_falls_back_to_its_own_count(tmp_path: Path) -> None:
    """A database that cannot count (here: no table) does not turn a refusal into a 500."""
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    try:
        limiter = SharedRateLimiter(engine, "auth-address", 2, 60.0)
        assert [limiter.hit("a") for _ in range(2)] == [None, None]
        assert limiter.hit("a") is not None
    finally:
        engine.dispose()
