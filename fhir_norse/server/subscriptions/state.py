"""SQL over the Subscriptions' delivery state and outbox (:mod:`fhir_norse.store.subscription_tables`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from fhir_norse.store.subscription_tables import (
    SUBSCRIPTION_EVENT,
    SUBSCRIPTION_GENERATION,
    SUBSCRIPTION_STATE,
)

STATE = SUBSCRIPTION_STATE
EVENT = SUBSCRIPTION_EVENT
GENERATION = SUBSCRIPTION_GENERATION
_GENERATION_NAME = "subscriptions"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class State:
    subscription_id: str
    owner_client_id: str
    owner_scopes: frozenset[str]
    headers_sealed: str | None
    events: int
    delivered: int
    handshake_done: bool
    failures: int
    retry_at: datetime
    last_sent_at: datetime | None


@dataclass(frozen=True, slots=True)
class Event:
    subscription_id: str
    number: int
    topic: str
    focus_type: str
    focus_id: str
    focus_version: int
    interaction: str
    occurred_at: datetime


def _state(row: sa.Row[tuple[object, ...]]) -> State:
    m = row._mapping
    return State(
        subscription_id=str(m["subscription_id"]),
        owner_client_id=str(m["owner_client_id"]),
        owner_scopes=frozenset(str(m["owner_scopes"]).split()),
        headers_sealed=m["headers_sealed"],
        events=int(m["events"]),
        delivered=int(m["delivered"]),
        handshake_done=bool(m["handshake_done"]),
        failures=int(m["failures"]),
        retry_at=m["retry_at"],
        last_sent_at=m["last_sent_at"],
    )


def _event(row: sa.Row[tuple[object, ...]]) -> Event:
    m = row._mapping
    return Event(
        subscription_id=str(m["subscription_id"]),
        number=int(m["event_number"]),
        topic=str(m["topic"]),
        focus_type=str(m["focus_type"]),
        focus_id=str(m["focus_id"]),
        focus_version=int(m["focus_version"]),
        interaction=str(m["interaction"]),
        occurred_at=m["occurred_at"],
    )


def generation(conn: sa.Connection) -> int:
    """The current generation of the Subscriptions (0 before the first Subscription write)."""
    value = conn.execute(sa.select(GENERATION.c.value).where(GENERATION.c.name == _GENERATION_NAME)).scalar()
    return int(value or 0)


def bump_generation(conn: sa.Connection) -> None:
    """Tell every process that a Subscription changed (in the write's transaction)."""
    conn.execute(
        sa.text(
            "INSERT INTO subscription_generation (name, value) VALUES (:n, 0) ON CONFLICT (name) DO NOTHING"
        ),
        {"n": _GENERATION_NAME},
    )
    conn.execute(
        sa.update(GENERATION)
        .where(GENERATION.c.name == _GENERATION_NAME)
        .values(value=GENERATION.c.value + 1)
    )


def get_state(conn: sa.Connection, subscription_id: str) -> State | None:
    row = conn.execute(sa.select(STATE).where(STATE.c.subscription_id == subscription_id)).first()
    return None if row is None else _state(row)


def insert_state(
    conn: sa.Connection, subscription_id: str, owner: str, scopes: frozenset[str], sealed: str | None
) -> None:
    now = utcnow()
    conn.execute(
        sa.insert(STATE).values(
            subscription_id=subscription_id,
            owner_client_id=owner,
            owner_scopes=" ".join(sorted(scopes)),
            headers_sealed=sealed,
            events=0,
            delivered=0,
            handshake_done=False,
            failures=0,
            retry_at=now,
            last_sent_at=None,
            updated_at=now,
        )
    )


def update_state(conn: sa.Connection, subscription_id: str, **values: object) -> None:
    conn.execute(
        sa.update(STATE)
        .where(STATE.c.subscription_id == subscription_id)
        .values(**values, updated_at=utcnow())
    )


def delete_state(conn: sa.Connection, subscription_id: str) -> None:
    conn.execute(sa.delete(EVENT).where(EVENT.c.subscription_id == subscription_id))
    conn.execute(sa.delete(STATE).where(STATE.c.subscription_id == subscription_id))


def record_event(
    conn: sa.Connection,
    subscription_id: str,
    topic: str,
    focus_type: str,
    focus_id: str,
    focus_version: int,
    interaction: str,
) -> int | None:
    """Write the Subscription's next event; its number (None when the Subscription has no state row).

    The counter row is updated first, so it stays locked until the transaction ends: a concurrent
    writer waits for it, and event numbers follow the commit order without gaps."""
    number = conn.execute(
        sa.update(STATE)
        .where(STATE.c.subscription_id == subscription_id)
        .values(events=STATE.c.events + 1)
        .returning(STATE.c.events)
    ).scalar()
    if number is None:
        return None
    conn.execute(
        sa.insert(EVENT).values(
            subscription_id=subscription_id,
            event_number=int(number),
            topic=topic,
            focus_type=focus_type,
            focus_id=focus_id,
            focus_version=focus_version,
            interaction=interaction,
            occurred_at=utcnow(),
        )
    )
    return int(number)


def events_between(
    conn: sa.Connection, subscription_id: str, first: int, last: int, limit: int
) -> list[Event]:
    """The stored events numbered ``first``..``last`` (inclusive), in order, at most ``limit``."""
    rows = conn.execute(
        sa.select(EVENT)
        .where(
            EVENT.c.subscription_id == subscription_id,
            EVENT.c.event_number >= first,
            EVENT.c.event_number <= last,
        )
        .order_by(EVENT.c.event_number)
        .limit(limit)
    )
    return [_event(r) for r in rows]


def due_states(conn: sa.Connection, now: datetime) -> list[State]:
    """Every state row whose next attempt is due (the worker decides what each needs)."""
    rows = conn.execute(sa.select(STATE).where(STATE.c.retry_at <= now).order_by(STATE.c.subscription_id))
    return [_state(r) for r in rows]
