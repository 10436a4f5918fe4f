"""Personal links: the patient's way in to answer one questionnaire Task (issue 15).

A link is a high-entropy token (``secrets.token_urlsafe(32)``, 256 bits) for exactly one Task and its
patient (the SDC questionnaire Task, https://hl7.org/fhir/uv/sdc/StructureDefinition-sdc-task.html),
with an expiry; it can be revoked, and it is used up when the Task is completed. Opening it gives a
short browser session (a secret of its own in an HttpOnly cookie) with a sliding expiry that never
outlives the link, a CSRF token derived from the session secret, and an optional one-time code for
a site's second step.

Only SHA-256 hashes of tokens, session secrets and codes are stored (tables in
:mod:`fhir_norse.auth.link_tables`): a token is found by its hash through a unique index, so the
raw value is never compared byte by byte and a copy of the database opens nothing. Session handling
follows OWASP's Session Management and CSRF Prevention cheat sheets
(https://cheatsheetseries.owasp.org/cheatsheets/Session_Management_Cheat_Sheet.html,
https://cheatsheetseries.owasp.org/cheatsheets/Cross-Site_Request_Forgery_Prevention_Cheat_Sheet.html,
"signed double-submit": an HMAC keyed by the session secret).

Every state change is one guarded ``UPDATE`` (``... WHERE revoked_at IS NULL``, ``... AND
code_tries < 5``), so two server workers revoking, completing or guessing at once neither double-count
nor lose a write, on SQLite (``BEGIN IMMEDIATE``) and PostgreSQL (row locks under READ COMMITTED).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from fhir_norse.auth.link_tables import LINK_SESSION, PERSONAL_LINK

__all__ = [
    "CODE_MAX_TRIES",
    "CODE_MINUTES",
    "LinkSession",
    "LinkState",
    "PersonalLink",
    "PersonalLinks",
    "UnknownSession",
    "hash_secret",
]

# What secrets.token_urlsafe(32) produces: 43 characters of the URL-safe base64 alphabet. Anything
# else cannot be one of ours and is refused without a database query.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
_TOKEN_BYTES = 32
# A language tag as the form offers them ("nb", "en", "en-GB").
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})?")
_CSRF_LABEL = b"fhir-norse personal-link csrf v1"
CODE_DIGITS = 6
CODE_MINUTES = 10
CODE_MAX_TRIES = 5
# A session's expiry is written only when it would move by at least this much: a page view a few
# seconds after the last needs no write.
_SLIDE_STEP = timedelta(seconds=30)

_L = PERSONAL_LINK.c
_S = LINK_SESSION.c


def _utcnow() -> datetime:
    return datetime.now(UTC)


def hash_secret(value: str) -> str:
    """SHA-256 (hex) of a token or session secret: what the tables store and look up."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _code_hash(session_id: str, code: str) -> str:
    # Salted by the session id: the same code in two sessions hashes differently, and a table of the
    # million possible codes' hashes does not read the pending codes.
    return hashlib.sha256(f"{session_id}:{code}".encode("utf-8", "surrogatepass")).hexdigest()


def _well_formed(token: str) -> bool:
    return _TOKEN.fullmatch(token) is not None


def _to_db(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    return moment.astimezone(UTC).replace(tzinfo=None)


def _from_db(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC)


def _maybe_from_db(moment: datetime | None) -> datetime | None:
    return None if moment is None else _from_db(moment)


class LinkState(StrEnum):
    """What opening a link finds."""

    VALID = "valid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    COMPLETED = "completed"
    UNKNOWN = "unknown"


class UnknownSession(LookupError):
    """No valid link session has this secret (never opened, ended, or expired)."""


@dataclass(frozen=True, slots=True)
class PersonalLink:
    """A link for one Task of one patient (never the token: only its hash is kept)."""

    id: str
    task_id: str
    patient_id: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    completed_at: datetime | None

    def state(self, now: datetime) -> LinkState:
        """Revoked before completed before expired: a revoked link says so, whatever else holds."""
        if self.revoked_at is not None:
            return LinkState.REVOKED
        if self.completed_at is not None:
            return LinkState.COMPLETED
        if now >= self.expires_at:
            return LinkState.EXPIRED
        return LinkState.VALID


@dataclass(frozen=True, slots=True)
class LinkSession:
    """A browser session opened by a link: it may answer that link's Task only."""

    id: str
    link: PersonalLink
    expires_at: datetime
    verified: bool
    language: str | None


def _link(row: Any) -> PersonalLink:
    return PersonalLink(
        id=row.id,
        task_id=row.task_id,
        patient_id=row.patient_id,
        created_at=_from_db(row.created_at),
        expires_at=_from_db(row.expires_at),
        revoked_at=_maybe_from_db(row.revoked_at),
        completed_at=_maybe_from_db(row.completed_at),
    )


_LINK_COLUMNS = (
    _L.id,
    _L.task_id,
    _L.patient_id,
    _L.created_at,
    _L.expires_at,
    _L.revoked_at,
    _L.completed_at,
)


class PersonalLinks:
    """Issue, look up, revoke and complete personal links; open and check their browser sessions.

    ``session_minutes``: a session's idle lifetime (each use slides it forward, never past the link's
    own expiry). ``now`` gives the current time (timezone-aware UTC); tests pass a controlled clock.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        session_minutes: int = 60,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        if session_minutes <= 0:
            raise ValueError("session_minutes must be positive")
        self.engine = engine
        self.session_lifetime = timedelta(minutes=session_minutes)
        self._now = now
        # Writers queue on SQLite's lock up to the busy timeout instead of failing on a read lock's
        # upgrade (fhir_norse/store/db.py).
        self._write_options = {"sqlite_begin": "IMMEDIATE"} if engine.dialect.name == "sqlite" else {}

    def _write(self) -> sa.Connection:
        return self.engine.connect().execution_options(**self._write_options)

    def _clock(self) -> datetime:
        now = self._now()
        if now.tzinfo is None:
            raise ValueError("the clock must give timezone-aware datetimes")
        return now.astimezone(UTC)

    # --- links ---

    def issue(self, task_id: str, patient_id: str, expires_at: datetime) -> str:
        """A new link for the Task; returns the raw token (to put in the message, never stored)."""
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        with self._write() as conn, conn.begin():
            conn.execute(
                sa.insert(PERSONAL_LINK).values(
                    id=uuid.uuid4().hex,
                    token_hash=hash_secret(token),
                    task_id=task_id,
                    patient_id=patient_id,
                    created_at=_to_db(self._clock()),
                    expires_at=_to_db(expires_at),
                )
            )
        return token

    def lookup(self, token: str) -> tuple[LinkState, PersonalLink | None]:
        """The link a token opens and its state now; ``(UNKNOWN, None)`` for no such link."""
        if not _well_formed(token):
            return LinkState.UNKNOWN, None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(*_LINK_COLUMNS).where(_L.token_hash == hash_secret(token))
            ).one_or_none()
        if row is None:
            return LinkState.UNKNOWN, None
        link = _link(row)
        return link.state(self._clock()), link

    def revoke(self, task_id: str) -> int:
        """Revoke every link of the Task (a clinician's withdrawal, or a new link replacing them);
        returns how many were not revoked before."""
        return self._mark(task_id, _L.revoked_at)

    def complete(self, task_id: str) -> int:
        """Mark every link of the Task used up (the Task was answered); returns how many changed."""
        return self._mark(task_id, _L.completed_at)

    def _mark(self, task_id: str, column: sa.Column[Any]) -> int:
        # The guard makes a second, concurrent call count nothing and keeps the first time stamp.
        with self._write() as conn, conn.begin():
            result = conn.execute(
                sa.update(PERSONAL_LINK)
                .where(_L.task_id == task_id, column.is_(None))
                .values({column.name: _to_db(self._clock())})
            )
        return int(result.rowcount)

    # --- sessions ---

    def open_session(self, link: PersonalLink, *, verified: bool) -> str:
        """A new browser session for the link; returns its raw secret (for an HttpOnly cookie).

        ``link`` comes from :meth:`lookup` and must be VALID (else ValueError); should it be revoked
        or completed meanwhile, the session's first use (:meth:`session`) answers None.
        """
        now = self._clock()
        if link.state(now) is not LinkState.VALID:
            raise ValueError(f"a {link.state(now)} link opens no session")
        secret = secrets.token_urlsafe(_TOKEN_BYTES)
        expires_at = min(now + self.session_lifetime, link.expires_at)
        with self._write() as conn, conn.begin():
            # The link's stale sessions go when it opens a new one: rows do not pile up per link.
            conn.execute(sa.delete(LINK_SESSION).where(_S.link_id == link.id, _S.expires_at <= _to_db(now)))
            conn.execute(
                sa.insert(LINK_SESSION).values(
                    id=uuid.uuid4().hex,
                    secret_hash=hash_secret(secret),
                    link_id=link.id,
                    created_at=_to_db(now),
                    expires_at=_to_db(expires_at),
                    verified=verified,
                    language=None,
                    code_hash=None,
                    code_expires_at=None,
                    code_tries=0,
                )
            )
        return secret

    def session(self, secret: str) -> LinkSession | None:
        """The session with this secret, its expiry slid forward; None when there is none, it has
        expired, or its link is no longer valid (revoked, completed or expired)."""
        if not _well_formed(secret):
            return None
        now = self._clock()
        query = (
            sa.select(LINK_SESSION, *(c.label(f"pl_{c.name}") for c in _LINK_COLUMNS))
            .join(PERSONAL_LINK, _L.id == _S.link_id)
            .where(_S.secret_hash == hash_secret(secret))
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).one_or_none()
        if row is None:
            return None
        mapping = row._mapping
        link = PersonalLink(
            id=mapping["pl_id"],
            task_id=mapping["pl_task_id"],
            patient_id=mapping["pl_patient_id"],
            created_at=_from_db(mapping["pl_created_at"]),
            expires_at=_from_db(mapping["pl_expires_at"]),
            revoked_at=_maybe_from_db(mapping["pl_revoked_at"]),
            completed_at=_maybe_from_db(mapping["pl_completed_at"]),
        )
        expires_at = _from_db(row.expires_at)
        if expires_at <= now or link.state(now) is not LinkState.VALID:
            return None
        slid = min(now + self.session_lifetime, link.expires_at)
        if slid - expires_at >= _SLIDE_STEP:
            with self._write() as conn, conn.begin():
                moved = conn.execute(
                    sa.update(LINK_SESSION)
                    .where(_S.id == row.id, _S.expires_at > _to_db(now))
                    .values(expires_at=_to_db(slid))
                ).rowcount
            if not moved:  # ended by another request meanwhile
                return None
            expires_at = slid
        return LinkSession(
            id=row.id, link=link, expires_at=expires_at, verified=bool(row.verified), language=row.language
        )

    def _update_live(self, secret: str, **values: Any) -> int:
        """Set ``values`` on the session if it exists and has not expired; returns rows changed."""
        if not _well_formed(secret):
            return 0
        now = _to_db(self._clock())
        with self._write() as conn, conn.begin():
            result = conn.execute(
                sa.update(LINK_SESSION)
                .where(_S.secret_hash == hash_secret(secret), _S.expires_at > now)
                .values(**values)
            )
        return int(result.rowcount)

    def set_language(self, secret: str, language: str) -> None:
        """Remember the language the patient chose (a language tag: "nb", "en")."""
        if _LANGUAGE.fullmatch(language) is None:
            raise ValueError(f"not a language tag: {language!r}")
        self._update_live(secret, language=language)

    def mark_verified(self, secret: str) -> None:
        """The site's second step passed (the date of birth matched)."""
        self._update_live(secret, verified=True)

    def end_session(self, secret: str) -> None:
        """Forget the session (the patient submitted, or logged out); unknown secrets are ignored."""
        if not _well_formed(secret):
            return
        with self._write() as conn, conn.begin():
            conn.execute(sa.delete(LINK_SESSION).where(_S.secret_hash == hash_secret(secret)))

    # --- CSRF ---

    def csrf_token(self, secret: str) -> str:
        """The session's CSRF token: HMAC-SHA256 keyed by the session secret over a fixed label,
        URL-safe base64. Stable for the session, useless without its cookie, no state of its own."""
        digest = hmac.new(secret.encode("utf-8", "surrogatepass"), _CSRF_LABEL, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def check_csrf(self, secret: str, presented: str) -> bool:
        """Whether ``presented`` is this session's CSRF token (constant-time comparison)."""
        expected = self.csrf_token(secret).encode("ascii")
        return hmac.compare_digest(expected, presented.encode("utf-8", "surrogatepass"))

    # --- one-time codes (the "sms-code" second step) ---

    def issue_code(self, secret: str) -> str:
        """A new 6-digit one-time code for the session (to send by SMS), valid ``CODE_MINUTES``;
        replaces any pending code and resets its tries. Raises :class:`UnknownSession`."""
        if not _well_formed(secret):
            raise UnknownSession("no such link session")
        now = self._clock()
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
        with self._write() as conn, conn.begin():
            session_id = conn.execute(
                sa.select(_S.id).where(_S.secret_hash == hash_secret(secret), _S.expires_at > _to_db(now))
            ).scalar_one_or_none()
            if session_id is None:
                raise UnknownSession("no such link session")
            conn.execute(
                sa.update(LINK_SESSION)
                .where(_S.id == session_id)
                .values(
                    code_hash=_code_hash(session_id, code),
                    code_expires_at=_to_db(now + timedelta(minutes=CODE_MINUTES)),
                    code_tries=0,
                )
            )
        return code

    def check_code(self, secret: str, code: str) -> bool:
        """Whether ``code`` is the session's pending one-time code; a right code marks the session
        verified and is used up. After ``CODE_MAX_TRIES`` guesses, or ``CODE_MINUTES`` after it was
        issued, every check fails until a new code is issued."""
        if not _well_formed(secret):
            return False
        now = _to_db(self._clock())
        with self._write() as conn, conn.begin():
            # Each guess first takes one try in a single guarded UPDATE, so guesses racing on two
            # workers each count and none gets past the limit.
            taken = conn.execute(
                sa.update(LINK_SESSION)
                .where(
                    _S.secret_hash == hash_secret(secret),
                    _S.expires_at > now,
                    _S.code_hash.is_not(None),
                    _S.code_expires_at > now,
                    _S.code_tries < CODE_MAX_TRIES,
                )
                .values(code_tries=_S.code_tries + 1)
                .returning(_S.id, _S.code_hash)
            ).one_or_none()
            if taken is None:
                return False
            presented = _code_hash(taken.id, code) if code.isascii() and code.isdigit() else ""
            if not hmac.compare_digest(presented.encode("ascii"), str(taken.code_hash).encode("ascii")):
                return False
            conn.execute(
                sa.update(LINK_SESSION)
                .where(_S.id == taken.id)
                .values(verified=True, code_hash=None, code_expires_at=None, code_tries=0)
            )
        return True
