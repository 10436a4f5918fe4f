"""SMART App Launch, the machine-facing side: authorization codes, their exchange for tokens, refresh
tokens that rotate, revocation, introspection and EHR launch handles.

- https://hl7.org/fhir/smart-app-launch/app-launch.html (the token response, launch context,
  ``need_patient_banner``, ``fhirUser``; the token endpoint of steps 5 and 7);
- RFC 6749 4.1.2/4.1.3 (a code is short-lived and single-use: a second use revokes every token issued
  from it), RFC 7636 (PKCE, S256 only), RFC 6749 6 and the OAuth 2.0 Security BCP (RFC 9700 4.14.2:
  refresh tokens rotate, and a second use of a rotated one revokes the whole family);
- RFC 7009 (revocation) and RFC 7662 (introspection);
- OpenID Connect Core 1.0 2 and 3.1.3.7 (the ``id_token``, signed RS256 by our access-token key).

A **grant** (``auth_grant``) is everything issued from one authorization: its code, its refresh
tokens and the access tokens they bring, which carry the grant id (``grant`` claim). Revoking the
grant ends the whole family; :class:`~fhir_norse.auth.tokens.TokenVerifier` refuses the access tokens
of a revoked grant at once in this process and within ``cache_seconds`` in the others.

Codes, refresh tokens and launch handles are 32 random bytes (base64url); only their SHA-256 (hex) is
stored. None of them is ever logged. Every change is one transaction.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from fhir_norse.auth.clients import BACKEND, CONFIDENTIAL, PUBLIC, Client, uncovered_scopes
from fhir_norse.auth.smart_tables import AUTH_CODE, AUTH_GRANT, AUTH_LAUNCH, AUTH_REFRESH, AUTH_SESSION
from fhir_norse.auth.tokens import (
    ASSERTION_TYPE,
    MAX_SCOPE_LENGTH,
    OAuthError,
    TokenService,
    TokenVerifier,
    issuer_for,
)

__all__ = [
    "CodeGrant",
    "Grants",
    "Introspection",
    "LaunchContext",
    "TokenGrant",
    "code_challenge_for",
    "fhir_user_url",
]

SECRET_BYTES = 32
# RFC 7636 4.1: code_verifier = 43*128unreserved
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_CHALLENGE = re.compile(r"^[A-Za-z0-9\-_]{43}$")
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_PERSON = re.compile(r"^(Patient|Practitioner)/([A-Za-z0-9\-.]{1,64})$")
MAX_SECRET_LENGTH = 512
# The reasons a grant was revoked (auth_grant.revoked_reason).
CODE_REUSED = "authorization code used twice"
REFRESH_REUSED = "refresh token used again after rotation"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def code_challenge_for(verifier: str) -> str:
    """The S256 ``code_challenge`` of a PKCE ``code_verifier`` (RFC 7636 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def fhir_user_url(fhir_base: str, person: str) -> str:
    """``fhirUser`` as SMART wants it: the absolute URL of the person's resource under the FHIR base."""
    return f"{fhir_base.rstrip('/')}/{person}"


def _naive(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)


def _epoch(moment: datetime) -> int:
    return int(moment.replace(tzinfo=UTC).timestamp())


def _invalid_grant(description: str, client_id: str | None) -> OAuthError:
    # Refused after the client proved itself: audited one by one.
    return OAuthError(400, "invalid_grant", description, client_id=client_id, authenticated=True)


# -- what the browser side hands over -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LaunchContext:
    """An EHR launch (``POST /auth/launch``) as the authorization request resolves it."""

    patient: str
    encounter: str | None
    practitioner: str | None
    created_by: str
    client_id: str | None


@dataclass(frozen=True, slots=True)
class CodeGrant:
    """What the consent step hands over to become an authorization code."""

    client_id: str
    redirect_uri: str
    code_challenge: str  # S256 challenge from /auth/authorize
    scope: str  # granted, space-separated (already reduced by the person's consent)
    person: str  # "Patient/<id>" or "Practitioner/<id>"
    patient: str | None
    encounter: str | None
    need_patient_banner: bool
    nonce: str | None
    auth_time: int  # epoch seconds of the sign-in
    session_id: str | None  # AUTH_SESSION.id (online_access grants end with it)


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A token response of the code or refresh grant, and what the audit trail records of it."""

    client_id: str
    scope: str
    token_id: str  # the access token's jti
    grant_id: str
    person: str
    patient: str | None
    response: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Introspection:
    """An introspection answer (RFC 7662 2.2) and, for the audit trail, whose token it was."""

    response: dict[str, Any]
    client_id: str | None = None
    person: str | None = None
    patient: str | None = None


_INACTIVE = Introspection({"active": False})


def _context(grant: CodeGrant) -> dict[str, Any]:
    match = _PERSON.match(grant.person)
    if match is None:
        raise ValueError("person must be Patient/<id> or Practitioner/<id>")
    for value, what in ((grant.patient, "patient"), (grant.encounter, "encounter")):
        if value is not None and not _FHIR_ID.match(value):
            raise ValueError(f"{what} must be a FHIR id")
    context: dict[str, Any] = {
        "person": grant.person,
        "need_patient_banner": bool(grant.need_patient_banner),
        "auth_time": int(grant.auth_time),
    }
    if match[1] == "Practitioner":
        context["practitioner"] = match[2]
    if grant.patient is not None:
        context["patient"] = grant.patient
    if grant.encounter is not None:
        context["encounter"] = grant.encounter
    if grant.nonce:
        context["nonce"] = grant.nonce
    return context


def _scope_items(scope: str) -> list[str]:
    return list(dict.fromkeys(scope.split()))


def _is_online(scopes: list[str]) -> bool:
    """A refresh token that lives with the sign-in session (``online_access`` without ``offline_access``)."""
    return "online_access" in scopes and "offline_access" not in scopes


class Grants:
    """Codes, refresh tokens, grants and launch handles in the database (see the module docstring).

    ``code_seconds``: the life of a code; ``refresh_days``: of an offline_access refresh token (from
    its last rotation); ``launch_seconds``: of a launch handle; ``session_minutes``: the longest an
    online_access refresh token lives without a rotation (it also ends with its sign-in session);
    ``cache_seconds``: how stale the in-memory set of revoked grants may be. Thread-safe.
    """

    def __init__(
        self,
        engine: sa.Engine,
        token_service: TokenService,
        *,
        code_seconds: int,
        refresh_days: float,
        launch_seconds: int,
        session_minutes: int = 30,
        cache_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.tokens = token_service
        self.code_seconds = int(code_seconds)
        self.refresh_seconds = float(refresh_days) * 86400.0
        self.launch_seconds = int(launch_seconds)
        self.session_seconds = int(session_minutes) * 60
        self.cache_seconds = float(cache_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._revoked: frozenset[str] = frozenset()
        self._revoked_loaded = float("-inf")

    def _now(self) -> datetime:
        return _naive(self._clock())

    # -- codes ----------------------------------------------------------------------------------
    def issue_code(self, grant: CodeGrant) -> str:
        """A new grant and its authorization code (one transaction); returns the code."""
        if not _CHALLENGE.match(grant.code_challenge):
            raise ValueError("code_challenge must be an S256 challenge (43 base64url characters)")
        scopes = _scope_items(grant.scope)
        if not scopes or len(grant.scope) > MAX_SCOPE_LENGTH:
            raise ValueError("a code needs the granted scopes")
        context = _context(grant)
        now = self._now()
        grant_id = secrets.token_hex(16)
        code = _new_secret()
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(AUTH_GRANT).values(
                    id=grant_id,
                    client_id=grant.client_id,
                    person=grant.person,
                    patient_id=grant.patient,
                    # Only an online grant is bound to its session: ending the session revokes it.
                    session_id=grant.session_id if _is_online(scopes) else None,
                    created_at=now,
                )
            )
            conn.execute(
                sa.insert(AUTH_CODE).values(
                    code_hash=_hash(code),
                    grant_id=grant_id,
                    client_id=grant.client_id,
                    redirect_uri=grant.redirect_uri,
                    code_challenge=grant.code_challenge,
                    scope=" ".join(scopes),
                    context=context,
                    created_at=now,
                    expires_at=now + timedelta(seconds=self.code_seconds),
                )
            )
        return code

    def exchange_code(
        self, client: Client, code: str, redirect_uri: str, code_verifier: str, fhir_base: str
    ) -> TokenGrant:
        """The ``authorization_code`` grant for an authenticated app (RFC 6749 4.1.3, RFC 7636 4.6).

        Any failure is ``invalid_grant`` and burns the code; a second use of a code revokes its grant.
        """
        cid = client.client_id
        if not code or len(code) > MAX_SECRET_LENGTH:
            raise _invalid_grant("the authorization code is missing or malformed", cid)
        if not redirect_uri:
            raise OAuthError(
                400, "invalid_request", "redirect_uri is required", client_id=cid, authenticated=True
            )
        if not _VERIFIER.match(code_verifier or ""):
            raise OAuthError(
                400,
                "invalid_request",
                "code_verifier must be 43 to 128 characters of A-Z a-z 0-9 - . _ ~ (RFC 7636)",
                client_id=cid,
                authenticated=True,
            )
        code_hash = _hash(code)
        now = self._now()
        problem: str | None = None
        revoked_now: str | None = None
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(AUTH_CODE).where(AUTH_CODE.c.code_hash == code_hash)).first()
            if row is None:
                problem = "the authorization code is unknown"
            else:
                claimed = conn.execute(
                    sa.update(AUTH_CODE)
                    .where(AUTH_CODE.c.code_hash == code_hash, AUTH_CODE.c.used_at.is_(None))
                    .values(used_at=now)
                ).rowcount
                if not claimed:
                    # RFC 6749 4.1.2: "If an authorization code is used more than once, the authorization
                    # server MUST deny the request and SHOULD revoke (when possible) all tokens previously
                    # issued based on that authorization code."
                    self._revoke_in(conn, row.grant_id, CODE_REUSED, now)
                    revoked_now = row.grant_id
                    problem = "the authorization code was used before; its tokens are revoked"
                else:
                    problem = self._code_problem(conn, row, cid, redirect_uri, code_verifier, now)
                    if problem is None:
                        return self._issue_from_code(conn, client, row, fhir_base, now)
        if revoked_now is not None:
            self._mark_revoked(revoked_now)
        raise _invalid_grant(problem or "the authorization code is invalid", cid)

    def _code_problem(
        self, conn: sa.Connection, row: Any, client_id: str, redirect_uri: str, verifier: str, now: datetime
    ) -> str | None:
        if row.client_id != client_id:
            return "the authorization code was issued to another client"
        if row.expires_at <= now:
            return "the authorization code has expired"
        if row.redirect_uri != redirect_uri:
            return "redirect_uri does not match the one of the authorization request"
        if not secrets.compare_digest(code_challenge_for(verifier), row.code_challenge):
            return "code_verifier does not match the code_challenge"
        grant = conn.execute(sa.select(AUTH_GRANT).where(AUTH_GRANT.c.id == row.grant_id)).first()
        if grant is None or grant.revoked_at is not None:
            return "the authorization has been revoked"
        return None

    def _issue_from_code(
        self, conn: sa.Connection, client: Client, row: Any, fhir_base: str, now: datetime
    ) -> TokenGrant:
        context = dict(row.context)
        scopes = _scope_items(row.scope)
        refresh = self._new_refresh(conn, row.grant_id, client.client_id, row.scope, context, scopes, now)
        return self._token_grant(client, row.grant_id, scopes, context, fhir_base, refresh, id_nonce=True)

    # -- refresh tokens -------------------------------------------------------------------------
    def _new_refresh(
        self,
        conn: sa.Connection,
        grant_id: str,
        client_id: str,
        scope: str,
        context: Mapping[str, Any],
        scopes: list[str],
        now: datetime,
    ) -> tuple[str, int] | None:
        """A refresh token (and its lifetime in seconds) if the scopes ask for one, stored hashed."""
        if "offline_access" in scopes:
            expires = now + timedelta(seconds=self.refresh_seconds)
        elif "online_access" in scopes:
            session = self._live_session(conn, grant_id, now)
            if session is None:
                return None
            expires = min(session.expires_at, now + timedelta(seconds=self.session_seconds))
        else:
            return None
        token = _new_secret()
        conn.execute(
            sa.insert(AUTH_REFRESH).values(
                token_hash=_hash(token),
                grant_id=grant_id,
                client_id=client_id,
                scope=scope,
                context={k: v for k, v in context.items() if k != "nonce"},
                created_at=now,
                expires_at=expires,
            )
        )
        return token, max(0, int((expires - now).total_seconds()))

    @staticmethod
    def _live_session(conn: sa.Connection, grant_id: str, now: datetime) -> Any:
        """The sign-in session an online grant lives with, if it is still open."""
        row = conn.execute(
            sa.select(AUTH_SESSION)
            .join(AUTH_GRANT, AUTH_GRANT.c.session_id == AUTH_SESSION.c.id)
            .where(AUTH_GRANT.c.id == grant_id)
        ).first()
        if row is None or row.ended_at is not None or row.expires_at <= now:
            return None
        return row

    def refresh(self, client: Client, refresh_token: str, scope: str | None, fhir_base: str) -> TokenGrant:
        """The ``refresh_token`` grant (RFC 6749 6) for an authenticated app: the token is rotated;
        ``scope`` may narrow the grant's scopes, never widen them; a second use of a rotated token
        revokes the grant."""
        cid = client.client_id
        if not refresh_token or len(refresh_token) > MAX_SECRET_LENGTH:
            raise _invalid_grant("the refresh token is missing or malformed", cid)
        token_hash = _hash(refresh_token)
        now = self._now()
        problem: str | None = None
        revoked_now: str | None = None
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(AUTH_REFRESH).where(AUTH_REFRESH.c.token_hash == token_hash)).first()
            grant = (
                conn.execute(sa.select(AUTH_GRANT).where(AUTH_GRANT.c.id == row.grant_id)).first()
                if row is not None
                else None
            )
            if row is None or grant is None:
                problem = "the refresh token is unknown"
            elif row.client_id != cid:
                problem = "the refresh token was issued to another client"
            elif grant.revoked_at is not None:
                problem = "the authorization has been revoked"
            elif row.rotated_at is not None:
                self._revoke_in(conn, row.grant_id, REFRESH_REUSED, now)
                revoked_now = row.grant_id
                problem = "the refresh token was used before; the authorization is revoked"
            elif row.expires_at <= now:
                problem = "the refresh token has expired"
            elif _is_online(_scope_items(row.scope)) and self._live_session(conn, row.grant_id, now) is None:
                problem = "the sign-in session of this online_access authorization has ended"
            else:
                granted = _scope_items(row.scope)
                wanted = self._narrowed(granted, scope, cid)
                claimed = conn.execute(
                    sa.update(AUTH_REFRESH)
                    .where(AUTH_REFRESH.c.token_hash == token_hash, AUTH_REFRESH.c.rotated_at.is_(None))
                    .values(rotated_at=now)
                ).rowcount
                if not claimed:  # the same token in two requests at once: one of them is a replay
                    self._revoke_in(conn, row.grant_id, REFRESH_REUSED, now)
                    revoked_now = row.grant_id
                    problem = "the refresh token was used before; the authorization is revoked"
                else:
                    context = dict(row.context)
                    # RFC 6749 6: the new refresh token has the scope of the one it replaces.
                    new = self._new_refresh(conn, row.grant_id, cid, row.scope, context, granted, now)
                    return self._token_grant(client, row.grant_id, wanted, context, fhir_base, new)
        if revoked_now is not None:
            self._mark_revoked(revoked_now)
        raise _invalid_grant(problem or "the refresh token is invalid", cid)

    @staticmethod
    def _narrowed(granted: list[str], scope: str | None, client_id: str) -> list[str]:
        if scope is None or not scope.strip():
            return granted
        if len(scope) > MAX_SCOPE_LENGTH:
            raise OAuthError(
                400, "invalid_scope", "scope is too long", client_id=client_id, authenticated=True
            )
        wanted = _scope_items(scope)
        wider = uncovered_scopes(granted, wanted)
        if wider:
            raise OAuthError(
                400,
                "invalid_scope",
                f"a refresh may narrow the scopes, not widen them: {' '.join(wider)}",
                client_id=client_id,
                authenticated=True,
            )
        return wanted

    # -- the token response ---------------------------------------------------------------------
    def _token_grant(
        self,
        client: Client,
        grant_id: str,
        scopes: list[str],
        context: Mapping[str, Any],
        fhir_base: str,
        refresh: tuple[str, int] | None,
        *,
        id_nonce: bool = False,
    ) -> TokenGrant:
        person = str(context["person"])
        fhir_user = fhir_user_url(fhir_base, person)
        patient = context.get("patient")
        encounter = context.get("encounter")
        scope = " ".join(scopes)
        access, jti = self.tokens.issue(
            subject=person,
            client_id=client.client_id,
            scope=scope,
            audience=fhir_base,
            patient=patient,
            practitioner=context.get("practitioner"),
            encounter=encounter,
            fhir_user=fhir_user,
            grant=grant_id,
        )
        response: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.tokens.token_ttl,
            "scope": scope,
        }
        if patient is not None:
            response["patient"] = patient
        if encounter is not None:
            response["encounter"] = encounter
        if "fhirUser" in scopes or "openid" in scopes:
            response["fhirUser"] = fhir_user
        if patient is not None:
            response["need_patient_banner"] = bool(context.get("need_patient_banner", True))
        if "openid" in scopes:
            response["id_token"] = self._id_token(
                client, person, scopes, context, fhir_base, fhir_user, id_nonce
            )
        if refresh is not None:
            response["refresh_token"] = refresh[0]
        return TokenGrant(client.client_id, scope, jti, grant_id, person, patient, response)

    def _id_token(
        self,
        client: Client,
        person: str,
        scopes: list[str],
        context: Mapping[str, Any],
        fhir_base: str,
        fhir_user: str,
        with_nonce: bool,
    ) -> str:
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": issuer_for(fhir_base, self.tokens.issuer),
            # A stable, local subject: the person's resource (pairwise subjects are not needed: the
            # apps are registered by the operator of this one server).
            "sub": person,
            "aud": client.client_id,
            "iat": now,
            "exp": now + self.tokens.token_ttl,
            "auth_time": int(context.get("auth_time", now)),
        }
        # OpenID Connect Core 12.2: a refreshed id_token carries no nonce.
        if with_nonce and context.get("nonce"):
            claims["nonce"] = context["nonce"]
        if "fhirUser" in scopes:
            claims["fhirUser"] = fhir_user
        return self.tokens.sign_id_token(claims)

    # -- revocation -----------------------------------------------------------------------------
    def revoke_grant(self, grant_id: str, reason: str) -> bool:
        """Revoke a grant and its whole token family; False if it was unknown or revoked already."""
        with self.engine.begin() as conn:
            changed = self._revoke_in(conn, grant_id, reason, self._now())
        self._mark_revoked(grant_id)
        return changed

    @staticmethod
    def _revoke_in(conn: sa.Connection, grant_id: str, reason: str, now: datetime) -> bool:
        result = conn.execute(
            sa.update(AUTH_GRANT)
            .where(AUTH_GRANT.c.id == grant_id, AUTH_GRANT.c.revoked_at.is_(None))
            .values(revoked_at=now, revoked_reason=reason[:255])
        )
        return bool(result.rowcount)

    def _mark_revoked(self, grant_id: str) -> None:
        with self._lock:
            self._revoked = self._revoked | {grant_id}

    def revoked_grant_ids(self) -> frozenset[str]:
        """Revoked grant ids, from memory; reloaded when older than ``cache_seconds`` (at once in this
        process after a revocation). Only grants young enough to have a live access token matter."""
        if time.monotonic() - self._revoked_loaded < self.cache_seconds:
            return self._revoked
        with self._lock:
            if time.monotonic() - self._revoked_loaded >= self.cache_seconds:
                # No token is issued from a grant after it is revoked, so a grant revoked longer ago
                # than an access token lives has no live token left: the set stays small.
                since = self._now() - timedelta(seconds=self.tokens.token_ttl + 3600)
                with self.engine.connect() as conn:
                    ids = conn.execute(
                        sa.select(AUTH_GRANT.c.id).where(
                            AUTH_GRANT.c.revoked_at.is_not(None), AUTH_GRANT.c.revoked_at >= since
                        )
                    ).scalars()
                    self._revoked = frozenset(ids)
                self._revoked_loaded = time.monotonic()
            return self._revoked

    def end_session(self, session_id: str, reason: str) -> int:
        """Revoke the online_access grants of a sign-in session (sign-out, or the session ended)."""
        now = self._now()
        with self.engine.begin() as conn:
            ids = list(
                conn.execute(
                    sa.select(AUTH_GRANT.c.id).where(
                        AUTH_GRANT.c.session_id == session_id, AUTH_GRANT.c.revoked_at.is_(None)
                    )
                ).scalars()
            )
            for grant_id in ids:
                self._revoke_in(conn, grant_id, reason, now)
        with self._lock:
            self._revoked = self._revoked | frozenset(ids)
        return len(ids)

    def revoke_token(self, client: Client, token: str, verifier: TokenVerifier, fhir_base: str) -> str | None:
        """RFC 7009 2.1: revoke the grant of a refresh or access token issued to ``client``; returns the
        grant id revoked, or None for a token this server does not know (answered 200 all the same).
        A token of another client is refused (RFC 7009 2.1, 5.2)."""
        if not token or len(token) > 16_384:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(AUTH_REFRESH.c.grant_id, AUTH_REFRESH.c.client_id).where(
                    AUTH_REFRESH.c.token_hash == _hash(token)
                )
            ).first()
        owner: Any
        grant_id: str
        if row is not None:
            owner, grant_id = row.client_id, str(row.grant_id)
        else:
            claims = verifier.signed_claims(token, fhir_base)
            grant = claims.get("grant") if claims else None
            if claims is None or not isinstance(grant, str):
                return None
            owner, grant_id = claims.get("client_id"), grant
        if owner != client.client_id:
            raise OAuthError(
                400,
                "unauthorized_client",
                "the token was not issued to this client",
                client_id=client.client_id,
                authenticated=True,
            )
        self.revoke_grant(grant_id, "revoked by the app (RFC 7009)")
        return grant_id

    # -- introspection --------------------------------------------------------------------------
    def introspect(
        self, token: str, verifier: TokenVerifier, fhir_base: str, *, client_id: str | None
    ) -> Introspection:
        """RFC 7662 2.2 for one of our access or refresh tokens. ``client_id`` limits the answer to
        that client's own tokens (an app asking); None: any token (a resource server with a system/
        scope, or a backend client)."""
        if not token or len(token) > 16_384:
            return _INACTIVE
        found = self._introspect_refresh(token, fhir_base) or self._introspect_access(
            token, verifier, fhir_base
        )
        if found is None or (client_id is not None and found.client_id != client_id):
            return _INACTIVE
        return found

    def _introspect_refresh(self, token: str, fhir_base: str) -> Introspection | None:
        now = self._now()
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(AUTH_REFRESH).where(AUTH_REFRESH.c.token_hash == _hash(token))
            ).first()
            if row is None:
                return None
            grant = conn.execute(sa.select(AUTH_GRANT).where(AUTH_GRANT.c.id == row.grant_id)).first()
            online_ended = (
                _is_online(_scope_items(row.scope)) and self._live_session(conn, row.grant_id, now) is None
            )
        clients = self.tokens.clients
        if (
            grant is None
            or grant.revoked_at is not None
            or row.rotated_at is not None
            or row.expires_at <= now
            or online_ended
            or row.client_id in clients.revoked_ids()
        ):
            return _INACTIVE
        context = dict(row.context)
        person = str(context.get("person"))
        response: dict[str, Any] = {
            "active": True,
            "scope": row.scope,
            "client_id": row.client_id,
            "sub": person,
            "exp": _epoch(row.expires_at),
            "iat": _epoch(row.created_at),
            "iss": issuer_for(fhir_base, self.tokens.issuer),
            "aud": fhir_base,
            "token_type": "refresh_token",
            "fhirUser": fhir_user_url(fhir_base, person),
        }
        for name in ("patient", "encounter"):
            if context.get(name) is not None:
                response[name] = context[name]
        return Introspection(response, row.client_id, person, context.get("patient"))

    @staticmethod
    def _introspect_access(token: str, verifier: TokenVerifier, fhir_base: str) -> Introspection | None:
        claims = verifier.active_claims(token, fhir_base)
        if claims is None:
            return None
        client_id = claims.get("client_id") or claims.get("sub")
        response: dict[str, Any] = {
            "active": True,
            "scope": claims.get("scope"),
            "client_id": client_id,
            "sub": claims.get("sub"),
            "exp": claims.get("exp"),
            "iat": claims.get("iat"),
            "iss": claims.get("iss"),
            "aud": claims.get("aud"),
            "token_type": "Bearer",
        }
        for name in ("patient", "encounter", "fhirUser"):
            if claims.get(name) is not None:
                response[name] = claims[name]
        fhir_user = claims.get("fhirUser")
        person = fhir_user.removeprefix(fhir_base.rstrip("/") + "/") if isinstance(fhir_user, str) else None
        patient = claims.get("patient")
        return Introspection(
            response,
            client_id if isinstance(client_id, str) else None,
            person,
            patient if isinstance(patient, str) else None,
        )

    # -- EHR launch -----------------------------------------------------------------------------
    def create_launch(
        self,
        *,
        created_by: str,
        patient: str,
        encounter: str | None = None,
        practitioner: str | None = None,
        client_id: str | None = None,
    ) -> tuple[str, int]:
        """A single-use launch handle for an EHR launch; returns (handle, seconds it lives)."""
        for value, what in ((patient, "patient"), (encounter, "encounter"), (practitioner, "practitioner")):
            if value is not None and not _FHIR_ID.match(value):
                raise ValueError(f"{what} must be a FHIR id")
        handle = _new_secret()
        now = self._now()
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(AUTH_LAUNCH).values(
                    handle_hash=_hash(handle),
                    created_by=created_by,
                    client_id=client_id,
                    patient_id=patient,
                    encounter_id=encounter,
                    practitioner_id=practitioner,
                    created_at=now,
                    expires_at=now + timedelta(seconds=self.launch_seconds),
                )
            )
        return handle, self.launch_seconds

    def resolve_launch(self, handle: str, client_id: str) -> LaunchContext | None:
        """The context of a launch handle, used up; None if unknown, expired, used or made for
        another app."""
        if not handle or len(handle) > MAX_SECRET_LENGTH:
            return None
        handle_hash = _hash(handle)
        now = self._now()
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(AUTH_LAUNCH).where(AUTH_LAUNCH.c.handle_hash == handle_hash)).first()
            if row is None or row.expires_at <= now or row.used_at is not None:
                return None
            if row.client_id is not None and row.client_id != client_id:
                return None
            claimed = conn.execute(
                sa.update(AUTH_LAUNCH)
                .where(AUTH_LAUNCH.c.handle_hash == handle_hash, AUTH_LAUNCH.c.used_at.is_(None))
                .values(used_at=now)
            ).rowcount
        if not claimed:
            return None
        return LaunchContext(
            row.patient_id, row.encounter_id, row.practitioner_id, row.created_by, row.client_id
        )


# -- client authentication at the token, revocation and introspection endpoints -----------------
def authenticate_app(tokens: TokenService, form: Mapping[str, str], token_url: str) -> Client:
    """The app a code, refresh or revocation request comes from: a confidential-asymmetric app by its
    ``private_key_jwt`` assertion (``aud`` = our token endpoint), a public app by ``client_id`` alone
    (https://hl7.org/fhir/smart-app-launch/client-public.html). Backend clients may not use these
    grants (``unauthorized_client``); unknown or revoked clients are ``invalid_client``."""
    if form.get("client_assertion") or form.get("client_assertion_type"):
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError(400, "invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
        client = tokens.authenticate_client(form, token_url)
        if client.kind == CONFIDENTIAL:
            return client
        if client.kind == BACKEND:
            raise OAuthError(
                400,
                "unauthorized_client",
                "a backend services client may use client_credentials only",
                client_id=client.client_id,
                authenticated=True,
            )
        raise OAuthError(
            401, "invalid_client", "a public app sends no client_assertion", client_id=client.client_id
        )
    claimed = form.get("client_id")
    if not claimed:
        raise OAuthError(401, "invalid_client", "client_id is required (or a client_assertion)")
    client_or_none = tokens.clients.get(claimed)
    if client_or_none is None:
        raise OAuthError(401, "invalid_client", "unknown client", client_id=claimed[:64])
    client = client_or_none
    if not client.active:
        raise OAuthError(401, "invalid_client", "client has been revoked", client_id=client.client_id)
    if client.kind == CONFIDENTIAL:
        raise OAuthError(
            401,
            "invalid_client",
            "this app must authenticate with a client_assertion (private_key_jwt)",
            client_id=client.client_id,
        )
    if client.kind != PUBLIC:
        raise OAuthError(
            400,
            "unauthorized_client",
            "a backend services client may use client_credentials only",
            client_id=client.client_id,
        )
    return client
