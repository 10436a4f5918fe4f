"""SMART Backend Services: the ``client_credentials`` grant with a ``private_key_jwt`` assertion, our
access tokens, and their verification on every FHIR request.

- :class:`TokenService` checks a token request (https://hl7.org/fhir/smart-app-launch/backend-services.html,
  https://hl7.org/fhir/smart-app-launch/client-confidential-asymmetric.html) and issues a short-lived
  JWT access token (RFC 9068 shape) signed RS256 with the server's key.
- :class:`TokenVerifier` turns an ``Authorization: Bearer`` header into a :class:`Caller`, from
  in-memory keys only; failures are 401 with an RFC 6750 ``WWW-Authenticate`` challenge.
- :class:`OidcProvider` optionally accepts tokens of a hospital OpenID Connect provider
  (issuer + JWK Set file, no network).
- :class:`RequestAuthenticator` adds the limits on repeated failed authentication (per address and
  per presented token; they throttle failing attempts only).

Neither the client assertion nor an access token is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
    PyJWKError,
)

from fhir_norse.auth.caller import Caller
from fhir_norse.auth.clients import (
    ASSERTION_KEY_TYPES,
    BACKEND,
    ES384_CURVE,
    MAX_JTI_LENGTH,
    Client,
    ClientRegistry,
    is_scope_token,
    uncovered_scopes,
)
from fhir_norse.auth.keys import ACCESS_TOKEN_ALG, KeyStore
from fhir_norse.auth.ratelimit import Limiter, RateLimiter, TooManyRequests, retry_after_header
from fhir_norse.config import Settings
from fhir_norse.outcomes import Unauthorized

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
GRANT_TYPE = "client_credentials"
ASSERTION_ALGORITHMS: tuple[str, ...] = tuple(ASSERTION_KEY_TYPES)
# SMART: the assertion's exp SHALL be no more than five minutes in the future.
MAX_ASSERTION_LIFETIME = 300
# Tolerated clock difference between the client, us and other servers, in seconds.
CLOCK_SKEW = 10
ACCESS_TOKEN_TYPE = "at+jwt"
REALM = "fhir-norse"
MAX_ASSERTION_LENGTH = 16_384
MAX_SCOPE_LENGTH = 4_096
# Used assertion ids whose assertion has expired are deleted at most this often.
JTI_PURGE_SECONDS = 300.0
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


# -- errors -----------------------------------------------------------------------------------
class OAuthError(Exception):
    """An OAuth 2.0 token endpoint error (RFC 6749 section 5.2), rendered as JSON.

    ``client_id`` is the client the request claimed to be (for the audit trail), if any;
    ``authenticated`` says whether the request had proved to come from the client (a verified,
    unused assertion) when it was refused: then the refusal is the client's own, audited one by one;
    otherwise anyone may have sent it (a replayed assertion too), and its audit is aggregated.
    """

    def __init__(
        self,
        status: int,
        error: str,
        description: str,
        *,
        client_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        authenticated: bool = False,
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.status = status
        self.error = error
        self.description = description
        self.client_id = client_id
        self.headers = dict(headers or {})
        self.authenticated = authenticated

    def to_json(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def _invalid_client(description: str, client_id: str | None = None) -> OAuthError:
    # SMART: any failure to authenticate the client answers invalid_client.
    return OAuthError(401, "invalid_client", description, client_id=client_id)


def _invalid_request(description: str, client_id: str | None = None) -> OAuthError:
    return OAuthError(400, "invalid_request", description, client_id=client_id)


# -- URLs -------------------------------------------------------------------------------------
def server_root(fhir_base: str) -> str:
    """The root the auth endpoints hang off: the FHIR base without its ``/fhir`` segment (so a
    reverse-proxy prefix is kept), else the base URL's origin."""
    base = fhir_base.rstrip("/")
    if base.endswith("/fhir"):
        return base[: -len("/fhir")]
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}"


def issuer_for(fhir_base: str, configured: str | None = None) -> str:
    """Our ``iss``: the configured issuer, else the server root + ``/auth``."""
    return configured.rstrip("/") if configured else server_root(fhir_base) + "/auth"


def token_endpoint_for(fhir_base: str) -> str:
    return server_root(fhir_base) + "/auth/token"


def jwks_uri_for(fhir_base: str) -> str:
    return server_root(fhir_base) + "/.well-known/jwks.json"


def fhir_base_for_token_endpoint(token_url: str) -> str:
    root = token_url.rstrip("/")
    if root.endswith("/auth/token"):
        root = root[: -len("/auth/token")]
    return root + "/fhir"


def _epoch(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)


def _short(value: Any, limit: int = 64) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def _claimed_client_id(form: Mapping[str, str]) -> str | None:
    """Who the request says it is, unverified, for the audit trail and error context only."""
    if form.get("client_id"):
        return _short(form["client_id"])
    assertion = form.get("client_assertion")
    if not assertion or len(assertion) > MAX_ASSERTION_LENGTH:
        return None
    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except InvalidTokenError:
        return None
    return _short(claims.get("iss"))


# -- the token endpoint -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Grant:
    """A granted token request: who got what, and the JSON response."""

    client_id: str
    scope: str
    token_id: str
    response: dict[str, Any]


class TokenService:
    """The ``client_credentials`` grant and the minting of access tokens.

    ``issuer`` overrides the derived issuer (server root + ``/auth``); ``client_limiter`` (if given)
    limits the token requests of an authenticated client.
    """

    def __init__(
        self,
        keys: KeyStore,
        clients: ClientRegistry,
        *,
        token_ttl: int = 300,
        issuer: str | None = None,
        client_limiter: Limiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.clients = clients
        self.token_ttl = int(token_ttl)
        self.issuer = issuer
        self.client_limiter = client_limiter
        self._clock = clock
        self._last_purge = float("-inf")
        self._purge_lock = threading.Lock()

    def grant(self, form: Mapping[str, str], token_url: str, audience: str | None = None) -> dict[str, Any]:
        """The token response for a token request, or :class:`OAuthError`.

        ``token_url`` is our token endpoint as the client addressed it (the assertion's ``aud``);
        ``audience`` the FHIR base URL (the token's ``aud``), derived from ``token_url`` if None.
        """
        return self.authorize(form, token_url, audience).response

    def authorize(self, form: Mapping[str, str], token_url: str, audience: str | None = None) -> Grant:
        claimed = _claimed_client_id(form)
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _invalid_request("grant_type is required", claimed)
        if grant_type != GRANT_TYPE:
            raise OAuthError(
                400, "unsupported_grant_type", f"only grant_type={GRANT_TYPE} is supported", client_id=claimed
            )
        assertion_type = form.get("client_assertion_type")
        if assertion_type != ASSERTION_TYPE:
            raise _invalid_request(f"client_assertion_type must be {ASSERTION_TYPE}", claimed)
        if not form.get("client_assertion"):
            raise _invalid_request("client_assertion is required", claimed)
        requested = self._requested_scopes(form.get("scope"), claimed)
        client = self.authenticate_client(form, token_url)
        if client.kind != BACKEND:
            raise OAuthError(
                400,
                "unauthorized_client",
                "this app uses the authorization code grant, not client_credentials",
                client_id=client.client_id,
                authenticated=True,
            )

        missing = uncovered_scopes(client.scopes, requested)
        if missing:
            raise OAuthError(
                400,
                "invalid_scope",
                f"scope not allowed for this client: {' '.join(missing)}",
                client_id=client.client_id,
                authenticated=True,
            )
        scope = " ".join(requested)
        fhir_base = audience or fhir_base_for_token_endpoint(token_url)
        token, jti = self.issue(
            subject=client.client_id, client_id=client.client_id, scope=scope, audience=fhir_base
        )
        response = {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.token_ttl,
            "scope": scope,
        }
        return Grant(client_id=client.client_id, scope=scope, token_id=jti, response=response)

    def authenticate_client(self, form: Mapping[str, str], token_url: str) -> Client:
        """The client a token-endpoint request comes from, proved by its ``private_key_jwt`` assertion
        (``client_assertion`` + ``client_assertion_type``; ``aud`` = ``token_url``); the assertion's
        ``jti`` is recorded (a replay is refused) and the client's request rate limited.
        :class:`OAuthError` ``invalid_client`` when it does not prove who it is."""
        claimed = _claimed_client_id(form)
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise _invalid_client(f"client_assertion_type must be {ASSERTION_TYPE}", claimed)
        assertion = form.get("client_assertion")
        if not assertion:
            raise _invalid_client("client_assertion is required", claimed)
        client, claims = self._authenticate(assertion, token_url, form.get("client_id"))
        if self.client_limiter is not None:
            wait = self.client_limiter.hit(client.client_id)
            if wait is not None:
                raise OAuthError(
                    429,
                    "temporarily_unavailable",
                    "too many token requests for this client",
                    client_id=client.client_id,
                    headers={"Retry-After": retry_after_header(wait)},
                )
        # Recorded only after the signature is verified, so nobody can burn another client's jti.
        expires_at = _epoch(float(claims["exp"]) + CLOCK_SKEW)
        if not self.clients.record_jti(client.client_id, claims["jti"], expires_at):
            raise _invalid_client("this assertion jti was used before (replay refused)", client.client_id)
        self._purge_used_jti()
        return client

    @staticmethod
    def _requested_scopes(raw: str | None, claimed: str | None) -> list[str]:
        if not raw or not raw.strip():
            raise _invalid_request("scope is required", claimed)
        if len(raw) > MAX_SCOPE_LENGTH:
            raise OAuthError(400, "invalid_scope", "scope is too long", client_id=claimed)
        items = list(dict.fromkeys(raw.split()))
        bad = [s for s in items if not is_scope_token(s)]
        if bad:
            raise OAuthError(
                400, "invalid_scope", "scope holds characters OAuth does not allow", client_id=claimed
            )
        return items

    def _authenticate(
        self, assertion: str, token_url: str, form_client_id: str | None
    ) -> tuple[Client, dict[str, Any]]:
        """Verify the client assertion (private_key_jwt) and return the client and its claims."""
        if len(assertion) > MAX_ASSERTION_LENGTH:
            raise _invalid_client("client_assertion is too large")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except InvalidTokenError:
            raise _invalid_client("client_assertion is not a well-formed JWT") from None
        iss = unverified.get("iss")
        claimed = _short(iss)
        alg = header.get("alg")
        # Only these two: refuses "none", HS* (a public key used as an HMAC secret) and everything else.
        if not isinstance(alg, str) or alg not in ASSERTION_KEY_TYPES:
            raise _invalid_client(
                f"client_assertion alg {str(alg)[:16]!r} is not accepted; sign with RS384 or ES384", claimed
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _invalid_client("client_assertion header needs the kid of the signing key", claimed)
        if not isinstance(iss, str) or not iss or unverified.get("sub") != iss:
            raise _invalid_client("client_assertion iss and sub must both be the client_id", claimed)
        if form_client_id and form_client_id != iss:
            raise _invalid_client("client_id does not match the client_assertion iss", claimed)
        client = self.clients.get(iss)
        if client is None:
            raise _invalid_client("unknown client", claimed)
        if not client.active:
            raise _invalid_client("client has been revoked", client.client_id)
        key = _client_key(client, kid, alg)

        try:
            claims: dict[str, Any] = jwt.decode(
                assertion,
                key,
                algorithms=[alg],
                audience=token_url,
                issuer=client.client_id,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
                leeway=CLOCK_SKEW,
            )
        except ExpiredSignatureError:
            raise _invalid_client("client_assertion has expired", client.client_id) from None
        except InvalidAudienceError:
            raise _invalid_client(
                f"client_assertion aud must be the token endpoint {token_url}", client.client_id
            ) from None
        except InvalidSignatureError:
            raise _invalid_client("client_assertion signature does not verify", client.client_id) from None
        except MissingRequiredClaimError as exc:
            raise _invalid_client(f"client_assertion lacks the {exc.claim} claim", client.client_id) from None
        except ImmatureSignatureError:
            raise _invalid_client(
                "client_assertion is not valid yet (iat/nbf ahead)", client.client_id
            ) from None
        except InvalidTokenError as exc:
            raise _invalid_client(
                f"client_assertion is invalid: {type(exc).__name__}", client.client_id
            ) from None

        exp = claims["exp"]
        if not isinstance(exp, int | float) or exp > self._clock() + MAX_ASSERTION_LIFETIME + CLOCK_SKEW:
            raise _invalid_client("client_assertion exp must be at most 5 minutes ahead", client.client_id)
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
            raise _invalid_client(
                f"client_assertion jti must be a string of 1 to {MAX_JTI_LENGTH} characters", client.client_id
            )
        return client, claims

    def _purge_used_jti(self) -> None:
        now = time.monotonic()
        if now - self._last_purge < JTI_PURGE_SECONDS or not self._purge_lock.acquire(blocking=False):
            return
        try:
            self._last_purge = now
            self.clients.purge_used_jti(_epoch(self._clock()))
        finally:
            self._purge_lock.release()

    def issue(
        self,
        *,
        subject: str,
        client_id: str,
        scope: str,
        audience: str,
        ttl: int | None = None,
        patient: str | None = None,
        practitioner: str | None = None,
        encounter: str | None = None,
        fhir_user: str | None = None,
        grant: str | None = None,
    ) -> tuple[str, str]:
        """Sign an access token; returns (token, jti). ``audience`` is the FHIR base URL.

        Launch context (SMART App Launch): ``patient``, ``encounter``, ``practitioner`` (the
        clinician's Practitioner id), ``fhir_user`` (the person's absolute URL; without it a
        practitioner is named ``Practitioner/<id>``) and ``grant`` (the AUTH_GRANT id: revoking the
        grant refuses the token at once)."""
        now = int(self._clock())
        lifetime = self.token_ttl if ttl is None else int(ttl)
        jti = secrets.token_urlsafe(18)
        claims: dict[str, Any] = {
            "iss": issuer_for(audience, self.issuer),
            "sub": subject,
            "aud": audience,
            "iat": now,
            "exp": now + lifetime,
            "jti": jti,
            "client_id": client_id,
            "scope": scope,
        }
        if patient is not None:
            claims["patient"] = patient
        if encounter is not None:
            claims["encounter"] = encounter
        if practitioner is not None:
            claims["practitioner"] = practitioner
            claims["fhirUser"] = f"Practitioner/{practitioner}"
        if fhir_user is not None:
            claims["fhirUser"] = fhir_user
        if grant is not None:
            claims["grant"] = grant
        key = self.keys.signing_key()
        token = jwt.encode(
            claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": ACCESS_TOKEN_TYPE}
        )
        return token, jti

    def sign_id_token(self, claims: Mapping[str, Any]) -> str:
        """An OpenID Connect id_token (``typ`` JWT), RS256 with the key that signs our access tokens, so
        a relying party verifies it with ``/.well-known/jwks.json``."""
        key = self.keys.signing_key()
        return jwt.encode(
            dict(claims), key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"}
        )


def _client_key(client: Client, kid: str, alg: str) -> Any:
    """The client's registered key named ``kid``, which must be of the type ``alg`` needs (no
    algorithm confusion: an RS384 header never selects an EC key, nor the reverse)."""
    jwk = client.key(kid)
    if jwk is None:
        raise _invalid_client(f"no registered key with kid {kid[:64]!r}", client.client_id)
    if jwk.get("kty") != ASSERTION_KEY_TYPES[alg] or jwk.get("alg") not in (None, alg):
        raise _invalid_client(f"key {kid[:64]!r} does not fit alg {alg}", client.client_id)
    if alg == "ES384" and jwk.get("crv") != ES384_CURVE:
        raise _invalid_client(f"key {kid[:64]!r} is not on curve {ES384_CURVE}", client.client_id)
    if jwk.get("use") not in (None, "sig") or (
        isinstance(jwk.get("key_ops"), list) and "verify" not in jwk["key_ops"]
    ):
        raise _invalid_client(f"key {kid[:64]!r} is not a signature key", client.client_id)
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
    except (PyJWKError, ValueError, TypeError, KeyError):
        raise _invalid_client(f"key {kid[:64]!r} cannot be read", client.client_id) from None
    expected = rsa.RSAPublicKey if alg == "RS384" else ec.EllipticCurvePublicKey
    if not isinstance(key, expected):
        raise _invalid_client(f"key {kid[:64]!r} is not a public key for {alg}", client.client_id)
    return key


# -- verification on every request ------------------------------------------------------------
def _challenge_value(description: str | None) -> str:
    if description is None:
        return f'Bearer realm="{REALM}"'
    clean = re.sub(r"[^\x20\x21\x23-\x5b\x5d-\x7e]", "", description)[:200]
    return f'Bearer realm="{REALM}", error="invalid_token", error_description="{clean}"'


def invalid_token(description: str, *, code: str = "login") -> Unauthorized:
    """401 with an RFC 6750 challenge naming the problem (never the token)."""
    return Unauthorized(
        f"Invalid access token: {description}",
        code=code,
        headers={"WWW-Authenticate": _challenge_value(description)},
    )


def missing_token() -> Unauthorized:
    return Unauthorized(
        "Authorization required: send an access token as 'Authorization: Bearer <token>'",
        headers={"WWW-Authenticate": _challenge_value(None)},
    )


_REQUIRED_CLAIMS = {"require": ["iss", "sub", "aud", "exp", "iat", "jti"]}


_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]+=*")
MAX_TOKEN_LENGTH = 8_192


def _peek_header(token: str) -> dict[str, Any]:
    """The JOSE header, read without PyJWT's full parse (which checks every character of the token
    in Python and would be done again by :func:`jwt.decode`); the signature is verified after."""
    if len(token) > MAX_TOKEN_LENGTH or not _JWT_SHAPE.fullmatch(token):
        raise invalid_token("the token is not a well-formed JWT")
    segment = token[: token.index(".")].rstrip("=")
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        raise invalid_token("the token is not a well-formed JWT") from None
    if not isinstance(header, dict):
        raise invalid_token("the token is not a well-formed JWT")
    return header


@dataclass(frozen=True, slots=True)
class _Verified:
    caller: Caller
    kid: str
    exp: float
    grant: str | None = None


_PERSON_TYPES = ("Patient", "Practitioner", "PractitionerRole", "RelatedPerson", "Person")


def relative_person(fhir_user: str) -> str:
    """``fhirUser`` as a relative reference (``Patient/1``) when it names a person by a FHIR URL
    (``https://host/fhir/Patient/1``); otherwise as given."""
    parts = fhir_user.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] in _PERSON_TYPES and _FHIR_ID.match(parts[-1]):
        return f"{parts[-2]}/{parts[-1]}"
    return fhir_user


class TokenVerifier:
    """Verifies access tokens from memory: our keys (cached by :class:`KeyStore`), the revoked
    clients (cached by :class:`ClientRegistry`), and optionally an OpenID Connect provider.

    A backend client sends the same token for minutes, so a token that verified is remembered
    (bounded, ``cache_size`` entries, keyed by the exact token and audience) until its ``exp``;
    a remembered token is still refused at once when it expires, when its key is retired or when
    its client is revoked, or its grant (an app's token family, ``grant`` claim) is revoked
    (``revoked_grants``: the ids from memory, see :meth:`fhir_norse.auth.grants.Grants.revoked_grant_ids`).
    """

    def __init__(
        self,
        keys: KeyStore,
        clients: ClientRegistry | None = None,
        *,
        issuer: str | None = None,
        oidc: OidcProvider | None = None,
        leeway: float = 5.0,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
        revoked_grants: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        self.keys = keys
        self.clients = clients
        self.revoked_grants = revoked_grants
        self.oidc = oidc
        self.leeway = leeway
        self.issuer = issuer
        self.cache_size = cache_size
        self._clock = clock
        self._issuers: dict[str, str] = {}
        self._verified: dict[tuple[str, str], _Verified] = {}
        self._cache_lock = threading.Lock()

    def _issuer(self, audience: str) -> str:
        found = self._issuers.get(audience)
        if found is None:
            found = issuer_for(audience, self.issuer)
            if len(self._issuers) < 64:
                self._issuers[audience] = found
        return found

    def verify(self, authorization_header: str | None, audience: str) -> Caller:
        """The caller of a FHIR request; :class:`Unauthorized` (401, WWW-Authenticate) otherwise.

        ``audience`` is the FHIR base URL the request came to.
        """
        if not authorization_header:
            raise missing_token()
        scheme, _, token = authorization_header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise invalid_token("the Authorization header must be 'Bearer <token>'")
        remembered = self._verified.get((token, audience))
        if remembered is not None:
            return self._recheck(remembered)
        header = _peek_header(token)
        kid = header.get("kid")
        key = self.keys.lookup(kid) if isinstance(kid, str) else None
        if (key is None or not isinstance(kid, str)) and (
            self.oidc is not None and isinstance(kid, str) and self.oidc.knows(kid)
        ):
            return self.oidc.verify(token, header)
        claims, kid = self._decode(token, header, audience)
        client_id = claims.get("client_id") or claims["sub"]
        scope = claims.get("scope")
        if not isinstance(client_id, str) or not isinstance(scope, str):
            raise invalid_token("the token lacks client_id or scope")
        patient = claims.get("patient")
        practitioner = claims.get("practitioner")
        user = claims.get("fhirUser")
        grant = claims.get("grant")
        caller = Caller(
            client_id=client_id,
            scopes=frozenset(scope.split()),
            patient=patient if isinstance(patient, str) else None,
            practitioner=practitioner if isinstance(practitioner, str) else None,
            user=relative_person(user) if isinstance(user, str) else None,
            token_id=str(claims["jti"]),
            source="token",
        )
        verified = _Verified(caller, kid, float(claims["exp"]), grant if isinstance(grant, str) else None)
        self._recheck(verified)
        self._remember((token, audience), verified)
        return caller

    def _decode(
        self, token: str, header: Mapping[str, Any], audience: str, *, verify_exp: bool = True
    ) -> tuple[dict[str, Any], str]:
        """The verified claims of one of our access tokens (signature, type, issuer, audience, expiry)."""
        kid = header.get("kid")
        key = self.keys.lookup(kid) if isinstance(kid, str) else None
        if key is None or not isinstance(kid, str):
            raise invalid_token("the token is not signed by a key of this server")
        if header.get("alg") != ACCESS_TOKEN_ALG or header.get("typ") != ACCESS_TOKEN_TYPE:
            raise invalid_token(
                f"only {ACCESS_TOKEN_ALG} access tokens of type {ACCESS_TOKEN_TYPE} are accepted"
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ACCESS_TOKEN_ALG],
                audience=audience,
                issuer=self._issuer(audience),
                options={**_REQUIRED_CLAIMS, "verify_exp": verify_exp},  # type: ignore[arg-type]
                leeway=self.leeway,
            )
        except ExpiredSignatureError:
            raise invalid_token("the token has expired", code="expired") from None
        except InvalidAudienceError:
            raise invalid_token("the token is not meant for this server (aud)") from None
        except InvalidIssuerError:
            raise invalid_token("the token has the wrong issuer") from None
        except InvalidSignatureError:
            raise invalid_token("the token signature does not verify") from None
        except MissingRequiredClaimError as exc:
            raise invalid_token(f"the token lacks the {exc.claim} claim") from None
        except (DecodeError, InvalidTokenError):
            raise invalid_token("the token is invalid") from None
        return claims, kid

    def signed_claims(self, token: str, audience: str) -> dict[str, Any] | None:
        """The claims of an access token this server signed for ``audience``, expired or not (to
        revoke its grant, RFC 7009); None if it is not one of ours."""
        try:
            return self._decode(token, _peek_header(token), audience, verify_exp=False)[0]
        except Unauthorized:
            return None

    def active_claims(self, token: str, audience: str) -> dict[str, Any] | None:
        """The claims of one of our access tokens while it is active (for introspection, RFC 7662):
        verified, not expired, its key, client and grant not revoked; None otherwise."""
        try:
            header = _peek_header(token)
            claims, kid = self._decode(token, header, audience)
            grant = claims.get("grant")
            client_id = claims.get("client_id") or claims["sub"]
            caller = Caller(client_id=str(client_id))
            self._recheck(
                _Verified(caller, kid, float(claims["exp"]), grant if isinstance(grant, str) else None)
            )
        except Unauthorized:
            return None
        return claims

    def _recheck(self, verified: _Verified) -> Caller:
        """What may change after a token verified: time, our key set, revoked clients."""
        if self._clock() >= verified.exp + self.leeway:
            raise invalid_token("the token has expired", code="expired")
        if verified.kid not in self.keys.verification_keys():
            raise invalid_token("the token is not signed by a key of this server")
        if self.clients is not None and verified.caller.client_id in self.clients.revoked_ids():
            raise invalid_token("the client of this token has been revoked")
        grants = self.revoked_grants
        if verified.grant is not None and grants is not None and verified.grant in grants():
            raise invalid_token("the authorization of this token has been revoked")
        return verified.caller

    def _remember(self, key: tuple[str, str], verified: _Verified) -> None:
        if self.cache_size <= 0:
            return
        with self._cache_lock:
            cache = self._verified
            if len(cache) >= self.cache_size:
                now = self._clock()
                live = {k: v for k, v in cache.items() if v.exp + self.leeway > now}
                if len(live) >= self.cache_size:
                    # Drop the older half (insertion order) rather than one entry per miss.
                    live = dict(list(live.items())[len(live) // 2 :])
                self._verified = cache = live
            cache[key] = verified

    def forget(self) -> None:
        """Empty the verified-token cache."""
        with self._cache_lock:
            self._verified = {}


class RequestAuthenticator:
    """The verifier plus limits on repeated failed authentication, per client address and per
    presented token: past ``limit`` failures in a minute, further *failing* attempts get 429
    (``throttled``, ``Retry-After``) instead of 401.

    A valid token is always accepted, whatever failed before it from the same address: the token is
    verified first (from memory; a remembered token costs a dictionary look-up, a new one one
    signature check), so a client guessing tokens, or looping on an expired one, cannot lock out the
    other clients behind the same address (a NAT, a proxy). The per-token limit (keyed by a hash of
    the token, never the token) bounds one bad credential sent from many addresses. A request without
    a token is not counted: it guesses nothing.
    """

    def __init__(
        self, verifier: TokenVerifier, failures: Limiter, credential_failures: Limiter | None = None
    ) -> None:
        self.verifier = verifier
        self.failures = failures
        self.credential_failures = credential_failures or RateLimiter(failures.limit, failures.period)

    def authenticate(
        self, authorization_header: str | None, client_address: str | None, audience: str
    ) -> Caller:
        try:
            return self.verifier.verify(authorization_header, audience)
        except Unauthorized as error:
            raise self.count_failure(error, authorization_header, client_address) from None

    def count_failure(
        self, error: Unauthorized, authorization_header: str | None, client_address: str | None
    ) -> Unauthorized | TooManyRequests:
        """Count a failed authentication (the verifier refused ``authorization_header`` with
        ``error``) and return what to answer: ``error``, or 429 once a limit is past. A request
        without a token is not counted. The limits may be in the database: call it off the event
        loop (the verification itself is from memory)."""
        if not authorization_header:
            return error
        by_address = self.failures.hit(client_address or "unknown")
        by_token = self.credential_failures.hit(_fingerprint(authorization_header))
        if by_address is not None:
            return TooManyRequests.after(
                by_address, "Too many failed authentication attempts from this address"
            )
        if by_token is not None:
            return TooManyRequests.after(by_token, "Too many failed authentication attempts with this token")
        return error


def _fingerprint(authorization_header: str) -> str:
    """A short hash of a presented credential: the key of its failure count (the token is not kept)."""
    return hashlib.blake2b(authorization_header.strip().encode(), digest_size=16).hexdigest()


# -- an external OpenID Connect provider ------------------------------------------------------
_OIDC_KEY_TYPES: Mapping[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}


class OidcProvider:
    """Access tokens of a hospital's OpenID Connect provider, checked against its JWK Set read from a
    file (no network), mapped onto :class:`Caller` with ``source="oidc"``.

    ``client_id`` = ``azp`` (else ``aud``); scopes from ``scope`` (space-separated) or ``scp``;
    ``practitioner`` from a ``fhirUser`` claim ``Practitioner/<id>`` (relative or absolute);
    ``patient`` from a ``patient`` claim.
    """

    def __init__(self, issuer: str, audience: str, jwks: Mapping[str, Any]) -> None:
        if not issuer or not audience:
            raise ValueError("an OpenID Connect provider needs an issuer and an audience")
        self.issuer = issuer
        self.audience = audience
        self._keys: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        keys = jwks.get("keys")
        if not isinstance(keys, list):
            raise ValueError('the OpenID Connect JWK Set needs a "keys" array')
        for jwk in keys:
            if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
                continue
            if jwk.get("use") not in (None, "sig") or jwk.get("kty") not in ("RSA", "EC"):
                continue
            self._keys[jwk["kid"]] = (jwk, {})

    @classmethod
    def from_settings(cls, settings: Settings) -> OidcProvider | None:
        """The provider ``oidc_issuer`` names (``None`` without one), keys from ``oidc_jwks_file``."""
        issuer, jwks_file, audience = settings.oidc_issuer, settings.oidc_jwks_file, settings.oidc_audience
        if not issuer:
            return None
        if not jwks_file or not audience:
            raise ValueError("oidc_issuer needs oidc_jwks_file and oidc_audience too")
        return cls(issuer, audience, json.loads(Path(jwks_file).read_text()))

    def knows(self, kid: str) -> bool:
        return kid in self._keys

    def _key(self, kid: str, alg: str) -> Any:
        jwk, parsed = self._keys[kid]
        kty, curve = _OIDC_KEY_TYPES[alg]
        if jwk.get("kty") != kty or jwk.get("alg") not in (None, alg) or (curve and jwk.get("crv") != curve):
            raise invalid_token(f"the identity provider key does not fit alg {alg}")
        if alg not in parsed:
            try:
                parsed[alg] = jwt.PyJWK(jwk, algorithm=alg).key
            except (PyJWKError, ValueError, TypeError, KeyError):
                raise invalid_token("the identity provider key cannot be read") from None
        return parsed[alg]

    def verify(self, token: str, header: Mapping[str, Any]) -> Caller:
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or alg not in _OIDC_KEY_TYPES or not isinstance(kid, str):
            raise invalid_token(f"alg {str(alg)[:16]!r} is not accepted")
        key = self._key(kid, alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["iss", "sub", "aud", "exp"]},
                leeway=CLOCK_SKEW,
            )
        except ExpiredSignatureError:
            raise invalid_token("the token has expired", code="expired") from None
        except InvalidTokenError as exc:
            raise invalid_token(f"the identity provider token is invalid ({type(exc).__name__})") from None
        aud = claims["aud"]
        client_id = claims.get("azp") or (aud if isinstance(aud, str) else next(iter(aud), None))
        if not isinstance(client_id, str):
            raise invalid_token("the identity provider token names no client (azp/aud)")
        scopes = _oidc_scopes(claims)
        fhir_user = claims.get("fhirUser")
        practitioner = _practitioner_id(fhir_user) if isinstance(fhir_user, str) else None
        patient = claims.get("patient")
        jti = claims.get("jti")
        return Caller(
            client_id=client_id,
            scopes=scopes,
            patient=patient if isinstance(patient, str) and _FHIR_ID.match(patient) else None,
            practitioner=practitioner,
            user=fhir_user if isinstance(fhir_user, str) else str(claims["sub"]),
            token_id=jti if isinstance(jti, str) else None,
            source="oidc",
        )


def _oidc_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    raw: Any = claims.get("scope", claims.get("scp"))
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, Sequence):
        return frozenset(s for s in raw if isinstance(s, str))
    return frozenset()


def _practitioner_id(fhir_user: str) -> str | None:
    parts = fhir_user.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Practitioner" and _FHIR_ID.match(parts[-1]):
        return parts[-1]
    return None
