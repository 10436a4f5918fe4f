"""The people's side of SMART App Launch at this server: sign-in sessions and authorization requests in
flight (issue 16).

An app sends a person's browser to ``/auth/authorize``; the request is kept here (:class:`PendingRequest`)
while the person signs in at a national login (:mod:`fhir_norse.auth.upstream`), perhaps picks a
patient, and consents. Both the request and the sign-in session are bound to the browser by a random
secret in a cookie; only its SHA-256 is stored (a copy of the database opens nothing). Sessions are
short (``signin_session_minutes``, fixed from the sign-in, never extended) and server-side: ending one
ends the ``online_access`` grants made in it (:meth:`fhir_norse.auth.grants.Grants.end_session`).

Tables: :mod:`fhir_norse.auth.smart_tables` (``auth_request``, ``auth_session``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from fhir_norse.auth.smart_tables import AUTH_REQUEST, AUTH_SESSION

__all__ = ["PendingRequest", "SigninSession", "SigninStore", "hash_secret"]

# Stages of a request: sign in, choose a patient (clinicians), consent; then done (a code was issued)
# or refused (a refusal page was shown). A request moves forward only.
LOGIN, PICK, CONSENT, DONE, REFUSED = "login", "pick", "consent", "done", "refused"
ROLES = ("patient", "clinician")


def hash_secret(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """An authorization request on its way: the app's checked parameters (``params``: ``redirect_uri``,
    ``scope``, ``state``, ``code_challenge``, ``nonce``, ``lang``, ``launch`` context...), who must sign
    in (``role``), and what is known so far."""

    id: str
    client_id: str
    params: Mapping[str, Any]
    role: str
    stage: str
    session_id: str | None
    patient_id: str | None
    encounter_id: str | None
    login_nonce: str | None
    login_verifier: str | None
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class SigninSession:
    """A person signed in here: ``person`` is the ``Patient/<id>`` or ``Practitioner/<id>`` their
    verified identity matched."""

    id: str
    role: str
    provider: str
    subject: str
    person: str
    auth_time: datetime
    expires_at: datetime


def _request(row: Any) -> PendingRequest:
    return PendingRequest(
        id=row.id,
        client_id=row.client_id,
        params=dict(row.params or {}),
        role=row.role,
        stage=row.stage,
        session_id=row.session_id,
        patient_id=row.patient_id,
        encounter_id=row.encounter_id,
        login_nonce=row.login_nonce,
        login_verifier=row.login_verifier,
        expires_at=row.expires_at.replace(tzinfo=UTC),
    )


def _session(row: Any) -> SigninSession:
    return SigninSession(
        id=row.id,
        role=row.role,
        provider=row.provider,
        subject=row.subject,
        person=row.person,
        auth_time=row.auth_time.replace(tzinfo=UTC),
        expires_at=row.expires_at.replace(tzinfo=UTC),
    )


class SigninStore:
    """Authorization requests and sign-in sessions in the database (see the module doc)."""

    def __init__(
        self, engine: sa.Engine, *, session_minutes: int, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self.engine = engine
        self.lifetime = timedelta(minutes=session_minutes)
        self._clock = clock

    def now(self) -> datetime:
        return self._clock()

    # -- requests --------------------------------------------------------------------------------
    def open_request(
        self, client_id: str, params: Mapping[str, Any], role: str
    ) -> tuple[PendingRequest, str]:
        """Keep a checked authorization request; returns it and the browser's secret for it."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        now = self.now()
        secret = secrets.token_urlsafe(32)
        row = {
            "id": secrets.token_hex(16),
            "secret_hash": hash_secret(secret),
            "client_id": client_id,
            "params": dict(params),
            "role": role,
            "stage": LOGIN,
            "created_at": _naive(now),
            "expires_at": _naive(now + self.lifetime),
        }
        with self.engine.begin() as conn:
            # Requests abandoned long ago go (a bounded sweep on each new one).
            conn.execute(
                sa.delete(AUTH_REQUEST).where(AUTH_REQUEST.c.expires_at < _naive(now - self.lifetime))
            )
            conn.execute(sa.insert(AUTH_REQUEST).values(**row))
            found = conn.execute(sa.select(AUTH_REQUEST).where(AUTH_REQUEST.c.id == row["id"])).one()
        return _request(found), secret

    def request(self, secret: str | None) -> PendingRequest | None:
        """The live request the browser's secret names (None: unknown or expired)."""
        if not secret or len(secret) > 128:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(AUTH_REQUEST).where(AUTH_REQUEST.c.secret_hash == hash_secret(secret))
            ).one_or_none()
        if row is None or row.expires_at.replace(tzinfo=UTC) <= self.now():
            return None
        return _request(row)

    def request_for_login(self, login_state: str, secret: str | None) -> PendingRequest | None:
        """The request a login provider's callback answers: its ``state`` must be one we sent, the
        browser must hold that request's secret (no login completed in another browser), and the state
        is used up by this call (a replayed callback finds nothing)."""
        if not login_state or len(login_state) > 64 or not secret:
            return None
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(AUTH_REQUEST).where(AUTH_REQUEST.c.login_state == login_state)
            ).one_or_none()
            if row is None:
                return None
            if not hmac.compare_digest(row.secret_hash, hash_secret(secret)):
                return None
            conn.execute(sa.update(AUTH_REQUEST).where(AUTH_REQUEST.c.id == row.id).values(login_state=None))
        if row.expires_at.replace(tzinfo=UTC) <= self.now():
            return None
        return _request(row)

    def await_login(self, request_id: str, *, state: str, nonce: str, verifier: str) -> None:
        """Remember what was sent to the login provider for this request."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(AUTH_REQUEST)
                .where(AUTH_REQUEST.c.id == request_id)
                .values(login_state=state, login_nonce=nonce, login_verifier=verifier, stage=LOGIN)
            )

    def advance(self, request_id: str, stage: str, **values: Any) -> None:
        """Move a request to ``stage`` with ``values`` (session_id, patient_id, encounter_id)."""
        allowed = {"session_id", "patient_id", "encounter_id"}
        if not set(values) <= allowed:
            raise ValueError(f"unknown request fields {sorted(set(values) - allowed)}")
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(AUTH_REQUEST)
                .where(AUTH_REQUEST.c.id == request_id)
                .values(stage=stage, login_nonce=None, login_verifier=None, **values)
            )

    def finish(self, request_id: str, stage: str = DONE) -> bool:
        """Close a request (a code was issued, or it was refused or denied); False if it was already
        closed (a double submit of the consent form issues one code only)."""
        with self.engine.begin() as conn:
            done = conn.execute(
                sa.update(AUTH_REQUEST)
                .where(AUTH_REQUEST.c.id == request_id, AUTH_REQUEST.c.stage.not_in((DONE, REFUSED)))
                .values(stage=stage)
            ).rowcount
        return bool(done)

    @staticmethod
    def csrf_token(secret: str) -> str:
        """The consent and picker forms' CSRF token: derived from the request's secret (which only the
        browser's cookie holds), so a form posted from elsewhere cannot carry it."""
        return hashlib.sha256(f"csrf:{secret}".encode()).hexdigest()[:32]

    @classmethod
    def check_csrf(cls, secret: str, presented: str) -> bool:
        return hmac.compare_digest(cls.csrf_token(secret), presented or "")

    # -- sessions --------------------------------------------------------------------------------
    def open_session(
        self, *, role: str, provider: str, subject: str, person: str, auth_time: datetime | None = None
    ) -> tuple[SigninSession, str]:
        now = self.now()
        secret = secrets.token_urlsafe(32)
        row = {
            "id": secrets.token_hex(16),
            "secret_hash": hash_secret(secret),
            "role": role,
            "provider": provider[:32],
            "subject": subject[:255],
            "person": person,
            "auth_time": _naive(auth_time or now),
            "created_at": _naive(now),
            "expires_at": _naive(now + self.lifetime),
        }
        with self.engine.begin() as conn:
            conn.execute(
                sa.delete(AUTH_SESSION).where(AUTH_SESSION.c.expires_at < _naive(now - self.lifetime))
            )
            conn.execute(sa.insert(AUTH_SESSION).values(**row))
            found = conn.execute(sa.select(AUTH_SESSION).where(AUTH_SESSION.c.id == row["id"])).one()
        return _session(found), secret

    def session(self, secret: str | None, *, session_id: str | None = None) -> SigninSession | None:
        """The live session the browser's secret names (and, if given, with this id)."""
        if not secret or len(secret) > 128:
            return None
        query = sa.select(AUTH_SESSION).where(
            AUTH_SESSION.c.secret_hash == hash_secret(secret), AUTH_SESSION.c.ended_at.is_(None)
        )
        if session_id is not None:
            query = query.where(AUTH_SESSION.c.id == session_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).one_or_none()
        if row is None or row.expires_at.replace(tzinfo=UTC) <= self.now():
            return None
        return _session(row)

    def session_by_id(self, session_id: str) -> SigninSession | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(AUTH_SESSION).where(
                    AUTH_SESSION.c.id == session_id, AUTH_SESSION.c.ended_at.is_(None)
                )
            ).one_or_none()
        if row is None or row.expires_at.replace(tzinfo=UTC) <= self.now():
            return None
        return _session(row)

    def end_session(self, session_id: str) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(
                sa.update(AUTH_SESSION)
                .where(AUTH_SESSION.c.id == session_id, AUTH_SESSION.c.ended_at.is_(None))
                .values(ended_at=_naive(self.now()))
            ).rowcount
        return bool(done)
