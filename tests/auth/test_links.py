"""Personal links and their browser sessions (fhir_norse/auth/links.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from fhir_norse.auth.link_tables import LINK_SESSION, PERSONAL_LINK
from fhir_norse.auth.links import (
    CODE_MAX_TRIES,
    LinkState,
    PersonalLink,
    PersonalLinks,
    UnknownSession,
)
from fhir_norse.store.db import create_engine

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    # The PostgreSQL schema is shared by the session's tests: start from empty link tables.
    with engine.begin() as conn:
        conn.execute(sa.delete(LINK_SESSION))
        conn.execute(sa.delete(PERSONAL_LINK))
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def links(engine: sa.Engine, clock: Clock) -> PersonalLinks:
    return PersonalLinks(engine, session_minutes=60, now=clock)


def _open(links: PersonalLinks, task_id: str = "task-a", *, hours: float = 48, verified: bool = True) -> str:
    token = links.issue(task_id, f"patient-of-{task_id}", T0 + timedelta(hours=hours))
    state, link = links.lookup(token)
    assert state is LinkState.VALID and link is not None
    return links.open_session(link, verified=verified)


def _rows(engine: sa.Engine, table: sa.Table) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(table))]


def _count_queries(engine: sa.Engine) -> tuple[list[str], Callable[[], None]]:
    seen: list[str] = []

    def listener(*args: Any) -> None:
        seen.append(str(args[2]))

    sa.event.listen(engine, "before_cursor_execute", listener)
    return seen, lambda: sa.event.remove(engine, "before_cursor_execute", listener)


def _tampered(token: str, position: int) -> str:
    replacement = "A" if token[position] != "A" else "B"
    return token[:position] + replacement + token[position + 1 :]


# --- links ---


def test_issue_and_lookup_round_trip(links: PersonalLinks, clock: Clock) -> None:
    expires = T0 + timedelta(days=2)
    token = links.issue("task-1", "patient-1", expires)
    assert len(token) == 43

    state, link = links.lookup(token)

    assert state is LinkState.VALID
    assert link is not None
    assert (link.task_id, link.patient_id) == ("task-1", "patient-1")
    assert link.created_at == T0
    assert link.expires_at == expires
    assert link.expires_at.tzinfo is not None
    assert (link.revoked_at, link.completed_at) == (None, None)
    # Each issue is a new link with its own token.
    other = links.issue("task-1", "patient-1", expires)
    assert other != token
    assert links.lookup(other)[1] != link


def test_only_hashes_are_stored(links: PersonalLinks, engine: sa.Engine) -> None:
    token = links.issue("task-1", "patient-1", T0 + timedelta(days=1))
    link = links.lookup(token)[1]
    assert link is not None
    secret = links.open_session(link, verified=False)
    code = links.issue_code(secret)

    link_rows = _rows(engine, PERSONAL_LINK)
    session_rows = _rows(engine, LINK_SESSION)

    assert [r["token_hash"] for r in link_rows] == [hashlib.sha256(token.encode()).hexdigest()]
    assert [r["secret_hash"] for r in session_rows] == [hashlib.sha256(secret.encode()).hexdigest()]
    stored = " ".join(str(v) for row in link_rows + session_rows for v in row.values())
    assert token not in stored
    assert secret not in stored
    # The pending code: a hash of the session's id and the code, never the code.
    session_id = session_rows[0]["id"]
    assert session_rows[0]["code_hash"] == hashlib.sha256(f"{session_id}:{code}".encode()).hexdigest()
    assert code not in [str(v) for v in session_rows[0].values()]


def test_an_expired_link(links: PersonalLinks, clock: Clock) -> None:
    token = links.issue("task-1", "patient-1", T0 + timedelta(hours=1))
    clock.advance(minutes=59)
    assert links.lookup(token)[0] is LinkState.VALID
    clock.advance(minutes=1)
    state, link = links.lookup(token)
    assert state is LinkState.EXPIRED
    assert link is not None and link.task_id == "task-1"


def test_revoke_every_link_of_the_task(links: PersonalLinks) -> None:
    first = links.issue("task-1", "patient-1", T0 + timedelta(days=1))
    second = links.issue("task-1", "patient-1", T0 + timedelta(days=1))
    other = links.issue("task-2", "patient-1", T0 + timedelta(days=1))

    assert links.revoke("task-1") == 2
    assert links.revoke("task-1") == 0  # already revoked
    assert links.revoke("no-such-task") == 0

    for token in (first, second):
        state, link = links.lookup(token)
        assert state is LinkState.REVOKED
        assert link is not None and link.revoked_at == T0
    assert links.lookup(other)[0] is LinkState.VALID


def test_complete_uses_the_links_up(links: PersonalLinks, clock: Clock) -> None:
    token = links.issue("task-1", "patient-1", T0 + timedelta(days=1))
    clock.advance(minutes=5)
    assert links.complete("task-1") == 1
    assert links.complete("task-1") == 0
    state, link = links.lookup(token)
    assert state is LinkState.COMPLETED
    assert link is not None and link.completed_at == T0 + timedelta(minutes=5)
    # Revoked says more than completed.
    assert links.revoke("task-1") == 1
    assert links.lookup(token)[0] is LinkState.REVOKED


def test_state_precedence() -> None:
    base = PersonalLink("l", "t", "p", T0, T0 + timedelta(hours=1), None, None)
    later = T0 + timedelta(hours=2)
    assert base.state(T0) is LinkState.VALID
    assert base.state(later) is LinkState.EXPIRED
    completed = PersonalLink("l", "t", "p", T0, T0 + timedelta(hours=1), None, T0)
    assert completed.state(T0) is LinkState.COMPLETED
    assert completed.state(later) is LinkState.COMPLETED
    revoked = PersonalLink("l", "t", "p", T0, T0 + timedelta(hours=1), T0, T0)
    assert revoked.state(T0) is LinkState.REVOKED
    assert revoked.state(later) is LinkState.REVOKED


def test_an_unknown_token(links: PersonalLinks) -> None:
    links.issue("task-1", "patient-1", T0 + timedelta(days=1))
    assert links.lookup(secrets.token_urlsafe(32)) == (LinkState.UNKNOWN, None)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "short",
        "A" * 42,
        "A" * 44,
        "A" * 42 + "=",
        "A" * 42 + ".",
        "A" * 42 + "/",
        "A" * 42 + "é",
        "A" * 21 + " " + "A" * 21,
        "' OR 1=1 --" + "A" * 32,
    ],
)
def test_a_malformed_token_is_unknown_without_a_query(
    links: PersonalLinks, engine: sa.Engine, token: str
) -> None:
    seen, stop = _count_queries(engine)
    try:
        assert links.lookup(token) == (LinkState.UNKNOWN, None)
        assert links.session(token) is None
        assert links.check_code(token, "123456") is False
    finally:
        stop()
    assert seen == []


@pytest.mark.parametrize("position", [0, 21, 42])
def test_a_tampered_token_is_unknown(links: PersonalLinks, position: int) -> None:
    token = links.issue("task-1", "patient-1", T0 + timedelta(days=1))
    assert links.lookup(_tampered(token, position)) == (LinkState.UNKNOWN, None)
    assert links.lookup(token)[0] is LinkState.VALID


# --- sessions ---


def test_a_session_yields_its_own_link_only(links: PersonalLinks) -> None:
    token_a = links.issue("task-a", "patient-a", T0 + timedelta(days=1))
    token_b = links.issue("task-b", "patient-b", T0 + timedelta(days=1))
    link_a, link_b = links.lookup(token_a)[1], links.lookup(token_b)[1]
    assert link_a is not None and link_b is not None
    secret_a = links.open_session(link_a, verified=True)
    secret_b = links.open_session(link_b, verified=False)

    session_a = links.session(secret_a)
    session_b = links.session(secret_b)

    assert session_a is not None and session_b is not None
    assert (session_a.link.task_id, session_a.link.patient_id) == ("task-a", "patient-a")
    assert (session_b.link.task_id, session_b.link.patient_id) == ("task-b", "patient-b")
    assert session_a.id != session_b.id
    assert session_a.id != secret_a
    assert (session_a.verified, session_b.verified) == (True, False)
    # A session secret is not a link token, nor the other way round, nor is a tampered secret a session.
    assert links.lookup(secret_a) == (LinkState.UNKNOWN, None)
    assert links.session(token_a) is None
    assert links.session(_tampered(secret_a, 10)) is None
    # Revoking B leaves A's session alone.
    links.revoke("task-b")
    assert links.session(secret_b) is None
    session_a = links.session(secret_a)
    assert session_a is not None and session_a.link.task_id == "task-a"


def test_session_expiry_slides_with_use(links: PersonalLinks, clock: Clock) -> None:
    secret = _open(links, hours=48)
    session = links.session(secret)
    assert session is not None and session.expires_at == T0 + timedelta(minutes=60)

    clock.advance(minutes=50)
    session = links.session(secret)
    assert session is not None and session.expires_at == T0 + timedelta(minutes=110)

    clock.advance(minutes=59)  # T0 + 109 min: still inside the slid expiry
    session = links.session(secret)
    assert session is not None and session.expires_at == T0 + timedelta(minutes=169)

    clock.now = T0 + timedelta(minutes=169)  # idle for the whole session lifetime
    assert links.session(secret) is None
    clock.advance(minutes=1)
    assert links.session(secret) is None


def test_session_never_outlives_its_link(links: PersonalLinks, clock: Clock) -> None:
    secret = _open(links, hours=1.5)
    clock.advance(minutes=50)
    session = links.session(secret)
    assert session is not None
    assert session.expires_at == T0 + timedelta(minutes=90)  # the link's expiry, not T0 + 110 min
    clock.advance(minutes=39)
    assert links.session(secret) is not None
    clock.advance(minutes=1)
    assert links.session(secret) is None


@pytest.mark.parametrize("end", ["revoke", "complete"])
def test_a_session_ends_with_its_link(links: PersonalLinks, end: str) -> None:
    secret = _open(links, "task-a")
    assert links.session(secret) is not None
    getattr(links, end)("task-a")
    assert links.session(secret) is None


def test_a_session_of_a_link_revoked_before_it_opened(links: PersonalLinks) -> None:
    token = links.issue("task-a", "patient-a", T0 + timedelta(days=1))
    link = links.lookup(token)[1]
    assert link is not None
    links.revoke("task-a")  # between the lookup and the session's opening
    secret = links.open_session(link, verified=True)
    assert links.session(secret) is None


def test_only_a_valid_link_opens_a_session(links: PersonalLinks, clock: Clock) -> None:
    token = links.issue("task-a", "patient-a", T0 + timedelta(hours=1))
    links.complete("task-a")
    state, link = links.lookup(token)
    assert state is LinkState.COMPLETED and link is not None
    with pytest.raises(ValueError):
        links.open_session(link, verified=True)


def test_end_session(links: PersonalLinks) -> None:
    secret = _open(links)
    other = _open(links, "task-b")
    links.end_session(secret)
    links.end_session(secret)
    links.end_session("not a secret")
    assert links.session(secret) is None
    assert links.session(other) is not None


def test_language_and_verification(links: PersonalLinks) -> None:
    secret = _open(links, verified=False)
    session = links.session(secret)
    assert session is not None and (session.language, session.verified) == (None, False)

    links.set_language(secret, "en")
    links.mark_verified(secret)

    session = links.session(secret)
    assert session is not None and (session.language, session.verified) == ("en", True)
    with pytest.raises(ValueError):
        links.set_language(secret, "<script>")
    # On an unknown session these change nothing and do not fail.
    links.set_language(secrets.token_urlsafe(32), "nb")
    links.mark_verified(secrets.token_urlsafe(32))


def test_an_expired_session_cannot_be_changed(links: PersonalLinks, clock: Clock, engine: sa.Engine) -> None:
    secret = _open(links, verified=False)
    clock.advance(minutes=61)
    links.mark_verified(secret)
    assert [r["verified"] for r in _rows(engine, LINK_SESSION)] == [False]


def test_opening_a_session_clears_the_links_stale_sessions(
    links: PersonalLinks, clock: Clock, engine: sa.Engine
) -> None:
    token = links.issue("task-a", "patient-a", T0 + timedelta(days=1))
    link = links.lookup(token)[1]
    assert link is not None
    stale = links.open_session(link, verified=True)
    clock.advance(hours=2)
    fresh = links.open_session(link, verified=True)
    assert len(_rows(engine, LINK_SESSION)) == 1
    assert links.session(stale) is None
    assert links.session(fresh) is not None


# --- CSRF ---


def test_csrf_token(links: PersonalLinks) -> None:
    secret = _open(links, "task-a")
    other = _open(links, "task-b")
    token = links.csrf_token(secret)

    assert token == links.csrf_token(secret)  # stable for the session
    assert len(token) == 43 and "=" not in token
    assert links.check_csrf(secret, token)
    assert not links.check_csrf(secret, _tampered(token, 5))
    assert not links.check_csrf(secret, "")
    assert not links.check_csrf(secret, token + "A")
    assert not links.check_csrf(secret, "é" * 43)
    # Another session's token does not pass, either way round.
    assert links.csrf_token(other) != token
    assert not links.check_csrf(other, token)
    assert not links.check_csrf(secret, links.csrf_token(other))
    # Not derivable from anything on the page: neither the session secret nor the link's token.
    assert token != secret


# --- one-time codes ---


def test_the_right_code_verifies_once(links: PersonalLinks) -> None:
    secret = _open(links, verified=False)
    code = links.issue_code(secret)
    assert len(code) == 6 and code.isdigit()

    assert links.check_code(secret, code)
    session = links.session(secret)
    assert session is not None and session.verified
    assert not links.check_code(secret, code)  # used up


def test_five_wrong_codes_lock_until_a_new_one(links: PersonalLinks) -> None:
    secret = _open(links, verified=False)
    code = links.issue_code(secret)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(CODE_MAX_TRIES):
        assert not links.check_code(secret, wrong)

    assert not links.check_code(secret, code)  # right, but locked
    session = links.session(secret)
    assert session is not None and not session.verified

    fresh = links.issue_code(secret)
    assert links.check_code(secret, fresh)


def test_a_malformed_guess_counts_as_a_try(links: PersonalLinks) -> None:
    secret = _open(links, verified=False)
    code = links.issue_code(secret)
    for guess in ["", "12345", "1234567", "abcdef", "١٢٣٤٥٦"]:  # the last: Arabic-Indic digits
        assert not links.check_code(secret, guess)
    assert not links.check_code(secret, code)


def test_the_fifth_guess_may_be_right(links: PersonalLinks) -> None:
    secret = _open(links, verified=False)
    code = links.issue_code(secret)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(CODE_MAX_TRIES - 1):
        assert not links.check_code(secret, wrong)
    assert links.check_code(secret, code)


def test_a_code_expires_after_ten_minutes(links: PersonalLinks, clock: Clock) -> None:
    secret = _open(links, verified=False)
    code = links.issue_code(secret)
    clock.advance(minutes=10)
    assert not links.check_code(secret, code)
    code = links.issue_code(secret)
    clock.advance(minutes=9, seconds=59)
    assert links.check_code(secret, code)


def test_a_code_belongs_to_its_session(links: PersonalLinks) -> None:
    secret = _open(links, "task-a", verified=False)
    other = _open(links, "task-b", verified=False)
    code = links.issue_code(secret)
    assert not links.check_code(other, code)  # no code pending there
    other_code = links.issue_code(other)
    if other_code != code:
        assert not links.check_code(other, code)
    assert links.check_code(secret, code)


def test_no_code_without_a_session(links: PersonalLinks, clock: Clock) -> None:
    with pytest.raises(UnknownSession):
        links.issue_code(secrets.token_urlsafe(32))
    with pytest.raises(UnknownSession):
        links.issue_code("malformed")
    secret = _open(links, verified=False)
    assert not links.check_code(secret, "123456")  # none issued
    clock.advance(minutes=61)
    with pytest.raises(UnknownSession):
        links.issue_code(secret)


# --- two workers at once ---


def _at_once(count: int, work: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(number: int) -> None:
        try:
            barrier.wait()
            results[number] = work(number)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return results


def test_concurrent_revocations_count_each_link_once(engine: sa.Engine, clock: Clock) -> None:
    workers = [PersonalLinks(engine, now=clock) for _ in range(4)]
    tokens = [workers[0].issue("task-1", "patient-1", T0 + timedelta(days=1)) for _ in range(3)]

    results = _at_once(4, lambda n: workers[n].revoke("task-1") if n % 2 else workers[n].complete("task-1"))

    revoked = sum(r for n, r in enumerate(results) if n % 2)
    completed = sum(r for n, r in enumerate(results) if not n % 2)
    assert (revoked, completed) == (3, 3)
    assert {workers[0].lookup(t)[0] for t in tokens} == {LinkState.REVOKED}


def test_concurrent_guesses_get_five_tries_together(engine: sa.Engine, clock: Clock) -> None:
    workers = [PersonalLinks(engine, now=clock) for _ in range(8)]
    secret = _open(workers[0], verified=False)
    code = workers[0].issue_code(secret)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"

    results = _at_once(8, lambda n: workers[n].check_code(secret, wrong))

    assert results == [False] * 8
    assert [r["code_tries"] for r in _rows(engine, LINK_SESSION)] == [CODE_MAX_TRIES]
    assert not workers[0].check_code(secret, code)
