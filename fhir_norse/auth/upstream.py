"""The national logins, seen from our side: fhir-norse as an OpenID Connect relying party.

fhir-norse is the authorization server of its FHIR API, not an identity provider. People prove who
they are at a configured OpenID Connect provider: patients at the national citizen login (ID-porten,
https://docs.digdir.no/docs/idporten/oidc/oidc_guide_idporten), clinicians at the health sector's login
(HelseID, https://utviklerportal.nhn.no/informasjonstjenester/helseid/). Both are reached the same way
(OpenID Connect Core 1.0, https://openid.net/specs/openid-connect-core-1_0.html):

- :func:`login_providers` reads the settings (``patient_login_*``, ``clinician_login_*``) into a
  :class:`LoginProvider` per configured role;
- :meth:`UpstreamLogin.start` builds the authorization request: discovery
  (https://openid.net/specs/openid-connect-discovery-1_0.html, cached for a bounded time), a random
  ``state``, ``nonce`` and PKCE verifier (RFC 7636, S256), the configured scopes and ``acr_values``;
- :meth:`UpstreamLogin.finish` exchanges the code at the token endpoint (Authlib's OAuth 2.0 client:
  PKCE, and ``client_secret_post`` or ``private_key_jwt`` client authentication, RFC 7523, which HelseID
  requires), verifies the id_token (OIDC Core 3.1.3.7: signature against the provider's JWKS, ``iss``,
  ``aud``, ``azp``, ``exp``/``iat``, ``nonce``, ``at_hash``; never ``alg: none``), and takes the
  configured identity claim (ID-porten's ``pid``, HelseID's HPR number) from the id_token or else from
  the userinfo endpoint (OIDC Core 5.3).

Every failure is a :class:`LoginFailed` whose ``reason`` is safe to show and to audit: it never holds
a token, a code or an identity number. Nothing here logs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.base import OAuth2Error
from authlib.oauth2.client import OAuth2Client
from jwt import PyJWK
from jwt.exceptions import InvalidTokenError, PyJWKError

from fhir_norse.config import Settings

__all__ = [
    "LoginFailed",
    "LoginProvider",
    "LoginStart",
    "UpstreamLogin",
    "VerifiedLogin",
    "login_providers",
]

ROLES = ("patient", "clinician")
DISCOVERY_PATH = "/.well-known/openid-configuration"
# Discovery metadata and the provider's keys are kept this long, then fetched again.
METADATA_SECONDS = 3600.0
# An id_token signed with a key we do not know makes us fetch the JWKS again (the provider may have
# rotated its keys), but not more often than this: a stream of forged tokens is not a stream of fetches.
JWKS_REFETCH_SECONDS = 30.0
HTTP_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# Metadata, key sets and userinfo are small; a larger answer is refused while it is being read.
MAX_RESPONSE_BYTES = 1_048_576
# Tolerated clock difference between the provider and us.
CLOCK_SKEW = 30
# An id_token older than this (by iat) is refused even if its exp is later: it belongs to another login.
MAX_ID_TOKEN_AGE = 600
# The lifetime of our private_key_jwt client assertion.
ASSERTION_SECONDS = 60
MAX_CODE_LENGTH = 2048
# The national identity number is 11 digits and the HPR number up to 9, but the systems are settings:
# any printable ASCII value without spaces, of bounded length, is accepted as an identifier.
_IDENTIFIER = re.compile(r"[!-~]{1,64}")
MAX_SUBJECT_LENGTH = 255
MAX_NAME_LENGTH = 200
# Asymmetric signatures only: "none" is never accepted, nor HMAC (which would make the client secret a
# signing key).
SIGNING_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
_HASHES: dict[str, Callable[[bytes], Any]] = {
    "256": hashlib.sha256,
    "384": hashlib.sha384,
    "512": hashlib.sha512,
}
_EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PRIVATE_KEY_JWT = "private_key_jwt"
CLIENT_SECRET_POST = "client_secret_post"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class LoginFailed(Exception):
    """A sign-in at a login provider that did not succeed.

    ``reason`` is plain English, safe to show and to audit (never a token, a code or an identity
    number); ``error`` a short code: ``unavailable`` (the provider could not be reached or answered
    badly), ``refused`` (the provider or the person said no), ``invalid`` (what came back does not
    verify), ``no_identity`` (no usable identity claim).
    """

    def __init__(self, reason: str, *, error: str = "invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


# -- configuration ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoginProvider:
    """One configured login: who signs in there (``role``), where, and as which client.

    ``client_key`` (a private JWK) selects ``private_key_jwt`` client authentication, else the
    ``client_secret`` is sent (``client_secret_post``). Neither is shown by ``repr``.
    """

    role: str
    name: str
    issuer: str
    client_id: str
    scopes: tuple[str, ...]
    acr_values: tuple[str, ...]
    claim: str
    identifier_system: str
    client_secret: str = field(default="", repr=False)
    client_key: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def auth_method(self) -> str:
        return PRIVATE_KEY_JWT if self.client_key is not None else CLIENT_SECRET_POST


def login_providers(settings: Settings) -> dict[str, LoginProvider]:
    """role (``patient``, ``clinician``) -> its provider, for the configured ones only.

    A provider is configured by its issuer and client id together; one without the other, a client
    without a secret or key, a key file that is not one private JWK, scopes without ``openid``, or an
    issuer that is not https (loopback http aside, for tests) raise ValueError naming the setting.
    """
    providers: dict[str, LoginProvider] = {}
    for role in ROLES:
        provider = _provider_from(settings, role)
        if provider is not None:
            providers[role] = provider
    return providers


@dataclass(frozen=True, slots=True)
class _Configured:
    """One role's ``*_login_*`` settings, read as typed fields."""

    name: str
    issuer: str
    client_id: str
    client_secret: str
    client_key_file: Path | None
    scopes: str
    acr_values: str
    claim: str
    identifier_system: str


def _configured(settings: Settings, role: str) -> _Configured:
    if role == "patient":
        return _Configured(
            name=settings.patient_login_name,
            issuer=settings.patient_login_issuer or "",
            client_id=settings.patient_login_client_id or "",
            client_secret=settings.patient_login_client_secret.get_secret_value(),
            client_key_file=settings.patient_login_client_key_file,
            scopes=settings.patient_login_scopes,
            acr_values=settings.patient_login_acr_values or "",
            claim=settings.patient_login_claim,
            identifier_system=settings.patient_login_identifier_system,
        )
    return _Configured(
        name=settings.clinician_login_name,
        issuer=settings.clinician_login_issuer or "",
        client_id=settings.clinician_login_client_id or "",
        client_secret=settings.clinician_login_client_secret.get_secret_value(),
        client_key_file=settings.clinician_login_client_key_file,
        scopes=settings.clinician_login_scopes,
        acr_values=settings.clinician_login_acr_values or "",
        claim=settings.clinician_login_claim,
        identifier_system=settings.clinician_login_identifier_system,
    )


def _provider_from(settings: Settings, role: str) -> LoginProvider | None:
    prefix = f"{role}_login_"
    raw = _configured(settings, role)
    issuer, client_id = raw.issuer, raw.client_id
    if not issuer and not client_id:
        return None
    if not issuer or not client_id:
        raise ValueError(f"{prefix}issuer and {prefix}client_id must be set together")
    if not _secure_url(issuer):
        raise ValueError(f"{prefix}issuer must be an https URL (http only on 127.0.0.1 or localhost)")
    secret = raw.client_secret
    key_file = raw.client_key_file
    key = _load_client_key(key_file, prefix + "client_key_file") if key_file else None
    if key is None and not secret:
        raise ValueError(f"{prefix}client_secret or {prefix}client_key_file must be set")
    scopes = tuple(raw.scopes.split())
    if "openid" not in scopes:
        raise ValueError(f"{prefix}scopes must include openid")
    acr_values = tuple(raw.acr_values.split())
    claim = raw.claim.strip()
    system = raw.identifier_system.strip()
    if not claim or not system:
        raise ValueError(f"{prefix}claim and {prefix}identifier_system must not be empty")
    return LoginProvider(
        role=role,
        name=raw.name,
        issuer=issuer,
        client_id=client_id,
        scopes=scopes,
        acr_values=acr_values,
        claim=claim,
        identifier_system=system,
        client_secret=secret,
        client_key=key,
    )


def _load_client_key(path: Path, setting: str) -> dict[str, Any]:
    """The private JWK of ``path`` (a JWK, or a JWK Set of exactly one key), with its ``alg``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{setting}: cannot read a JSON key from {path}") from exc
    if isinstance(data, dict) and isinstance(data.get("keys"), list):
        if len(data["keys"]) != 1:
            raise ValueError(f"{setting}: the JWK Set must hold exactly one key")
        data = data["keys"][0]
    if not isinstance(data, dict) or "d" not in data:
        raise ValueError(f"{setting}: not a private JWK (RSA or EC, with its private part)")
    key = dict(data)
    key["alg"] = key.get("alg") or _assertion_alg(key)
    if key["alg"] not in SIGNING_ALGORITHMS:
        raise ValueError(f"{setting}: a key for {sorted(SIGNING_ALGORITHMS)} is needed")
    try:
        PyJWK(key, algorithm=key["alg"])
    except PyJWKError as exc:
        raise ValueError(f"{setting}: not a usable private JWK for {key['alg']}") from exc
    return key


def _assertion_alg(key: Mapping[str, Any]) -> str:
    if key.get("kty") == "RSA":
        return "RS256"
    if key.get("kty") == "EC":
        return _EC_ALGORITHMS.get(str(key.get("crv")), "")
    return ""


def _secure_url(url: str) -> bool:
    """https, or http on the loopback interface (the tests' local provider)."""
    parts = urlsplit(url)
    if not parts.hostname or parts.username or parts.password or parts.fragment:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK)


# -- results ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoginStart:
    """Where to send the browser, and what to keep for :meth:`UpstreamLogin.finish` (server-side,
    with the sign-in session: the callback's ``state`` must equal ``state``)."""

    url: str
    state: str
    nonce: str
    verifier: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class VerifiedLogin:
    """A verified sign-in: the provider's subject and the person's identifier in ``identifier_system``.

    ``provider`` is the provider's name (``ID-porten``); ``identifier`` is the configured claim's
    value: a national identity number or an HPR number, to be matched and never logged.
    """

    provider: str
    role: str
    subject: str
    identifier: str = field(repr=False)
    identifier_system: str
    auth_time: int | None
    acr: str | None
    display_name: str | None = field(repr=False)


# -- the relying party ------------------------------------------------------------------------
class _HttpxClientAuth(httpx.Auth):
    """Authlib's client authentication (``client_secret_post``, or :class:`_PrivateKeyJwt`) applied
    to an httpx token request. (Authlib's own httpx integration is being moved to another HTTP
    library; its protocol core is used here with the project's httpx.)"""

    requires_request_body = True

    def __init__(self, client_id: str, client_secret: str | None, auth_method: Any) -> None:
        self._auth = ClientAuth(client_id, client_secret, auth_method)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        url, headers, body = self._auth.prepare(
            request.method, str(request.url), dict(request.headers), request.content.decode()
        )
        content = body.encode() if isinstance(body, str) else bytes(body)
        headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
        yield httpx.Request(
            request.method, url, headers=headers, content=content, extensions=request.extensions
        )


class _TokenClient(OAuth2Client):  # type: ignore[misc]  # Authlib ships no type information
    """Authlib's OAuth 2.0 client (authorization URL with PKCE, the token request, its errors) over a
    given ``httpx.Client`` (shared, and replaceable in tests)."""

    client_auth_class = _HttpxClientAuth
    SESSION_REQUEST_PARAMS = ["timeout"]


class _PrivateKeyJwt:
    """``private_key_jwt`` client authentication (RFC 7523 2.2, OIDC Core 9) for Authlib: a fresh
    assertion per token request, signed with our key, ``aud`` the provider's issuer (which both
    ID-porten and HelseID accept, and RFC 7523bis recommends), valid for a minute."""

    name = PRIVATE_KEY_JWT

    def __init__(self, key: Mapping[str, Any], audience: str, clock: Callable[[], float]) -> None:
        self._alg = str(key["alg"])
        self._key = PyJWK(dict(key), algorithm=self._alg)
        self._kid = key.get("kid")
        self._audience = audience
        self._clock = clock

    def __call__(self, auth: Any, method: str, uri: str, headers: Any, body: str) -> tuple[str, Any, str]:
        now = int(self._clock())
        claims = {
            "iss": auth.client_id,
            "sub": auth.client_id,
            "aud": self._audience,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + ASSERTION_SECONDS,
        }
        header = {"kid": self._kid} if self._kid else None
        assertion = jwt.encode(claims, self._key.key, algorithm=self._alg, headers=header)
        extra = httpx.QueryParams(
            {
                "client_id": auth.client_id,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
            }
        )
        return uri, headers, f"{body}&{extra}" if body else str(extra)


@dataclass(frozen=True, slots=True)
class _Key:
    """A signing key of the provider: its JWK (for kid, kty, crv, alg) and the usable key."""

    jwk: Mapping[str, Any]
    key: PyJWK


@dataclass(slots=True)
class _Cached:
    value: Any
    fetched: float


class UpstreamLogin:
    """The code flow at one :class:`LoginProvider`. Safe to share between threads.

    ``http`` is the client for every request to the provider (made here, with timeouts, when not
    given); ``clock`` gives the time for token checks and the caches.
    """

    def __init__(
        self,
        provider: LoginProvider,
        *,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.provider = provider
        self._own_http = http is None
        self._http = http or httpx.Client(timeout=HTTP_TIMEOUT, follow_redirects=False)
        self._clock = clock
        self._lock = threading.Lock()
        self._metadata: _Cached | None = None
        self._jwks: _Cached | None = None

    def close(self) -> None:
        """Close the HTTP client, if it was made here."""
        if self._own_http:
            self._http.close()

    # -- the authorization request --
    def start(
        self, redirect_uri: str, *, prompt: str | None = None, ui_locales: str | None = None
    ) -> LoginStart:
        """The provider's authorization URL for a new sign-in, returning to ``redirect_uri``.

        ``prompt`` (``login`` to ask again even with a session there) and ``ui_locales`` (``nb en``)
        are passed on when given.
        """
        metadata = self._discover()
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)  # 86 characters, within RFC 7636's 43..128
        params: dict[str, str] = {"nonce": nonce, "scope": " ".join(self.provider.scopes)}
        if self.provider.acr_values:
            params["acr_values"] = " ".join(self.provider.acr_values)
        if prompt:
            params["prompt"] = prompt
        if ui_locales:
            params["ui_locales"] = ui_locales
        url, _ = self._client(redirect_uri).create_authorization_url(
            metadata["authorization_endpoint"], state=state, code_verifier=verifier, **params
        )
        return LoginStart(url=str(url), state=state, nonce=nonce, verifier=verifier)

    def callback_error(self, error: str) -> LoginFailed:
        """The failure for an error answer at the redirect URI (``?error=...``, RFC 6749 4.1.2.1)."""
        if error == "access_denied":
            return LoginFailed(f"the sign-in at {self.provider.name} was cancelled", error="refused")
        code = error if re.fullmatch(r"[a-z_]{1,40}", error or "") else "unknown"
        return LoginFailed(f"{self.provider.name} refused the sign-in ({code})", error="refused")

    # -- the code exchange --
    def finish(
        self,
        *,
        code: str,
        redirect_uri: str,
        verifier: str,
        nonce: str,
        iss: str | None = None,
    ) -> VerifiedLogin:
        """Exchange ``code`` (sent to ``redirect_uri``) for the verified sign-in.

        ``iss`` is the callback's ``iss`` parameter (RFC 9207): when the provider says it sends one,
        it must be there and be this provider, against a mix-up of the two logins.
        """
        name = self.provider.name
        if not code or len(code) > MAX_CODE_LENGTH:
            raise LoginFailed(f"no valid sign-in code came back from {name}", error="invalid")
        metadata = self._discover()
        announced = metadata.get("authorization_response_iss_parameter_supported") is True
        if (iss is not None or announced) and iss != self.provider.issuer:
            raise LoginFailed(f"the sign-in answer did not come from {name}", error="invalid")
        token = self._exchange(metadata, code=code, redirect_uri=redirect_uri, verifier=verifier)
        id_token = token.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise LoginFailed(f"{name} sent no identity token", error="invalid")
        access_token = token.get("access_token")
        claims = self._verify_id_token(
            id_token,
            metadata,
            nonce=nonce,
            access_token=access_token if isinstance(access_token, str) else None,
        )
        self._check_acr(claims)
        subject = str(claims["sub"])
        userinfo: Mapping[str, Any] = {}
        if self.provider.claim not in claims:
            userinfo = self._userinfo(metadata, access_token, subject)
        value = claims.get(self.provider.claim, userinfo.get(self.provider.claim))
        if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
            raise LoginFailed(
                f"the sign-in at {name} did not give a usable {self.provider.claim}",
                error="no_identity",
            )
        auth_time = claims.get("auth_time")
        acr = claims.get("acr")
        return VerifiedLogin(
            provider=name,
            role=self.provider.role,
            subject=subject,
            identifier=value,
            identifier_system=self.provider.identifier_system,
            auth_time=auth_time if _is_int(auth_time) else None,
            acr=acr if isinstance(acr, str) else None,
            display_name=_display_name(claims) or _display_name(userinfo),
        )

    def _client(self, redirect_uri: str) -> _TokenClient:
        provider = self.provider
        client = _TokenClient(
            session=self._http,
            client_id=provider.client_id,
            client_secret=provider.client_secret or None,
            token_endpoint_auth_method=provider.auth_method,
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
        )
        if provider.client_key is not None:
            client.register_client_auth_method(
                _PrivateKeyJwt(provider.client_key, provider.issuer, self._clock)
            )
        return client

    def _exchange(
        self, metadata: Mapping[str, Any], *, code: str, redirect_uri: str, verifier: str
    ) -> Mapping[str, Any]:
        name = self.provider.name
        try:
            token = self._client(redirect_uri).fetch_token(
                metadata["token_endpoint"],
                grant_type="authorization_code",
                code=code,
                code_verifier=verifier,
                redirect_uri=redirect_uri,
                timeout=HTTP_TIMEOUT,
            )
        except OAuth2Error as exc:
            # Only the registered error code (RFC 6749 5.2) is kept: the description is free text.
            code_ = exc.error if re.fullmatch(r"[a-z_]{1,40}", exc.error or "") else "error"
            raise LoginFailed(f"{name} refused the sign-in code ({code_})", error="refused") from exc
        except httpx.HTTPStatusError as exc:
            raise LoginFailed(
                f"{name} answered HTTP {exc.response.status_code} at its token endpoint",
                error="unavailable",
            ) from exc
        except httpx.HTTPError as exc:
            raise LoginFailed(f"{name} could not be reached", error="unavailable") from exc
        except ValueError as exc:
            raise LoginFailed(f"{name} sent an invalid token response", error="unavailable") from exc
        if not isinstance(token, Mapping):
            raise LoginFailed(f"{name} sent an invalid token response", error="unavailable")
        return token

    # -- the id_token --
    def _verify_id_token(
        self,
        id_token: str,
        metadata: Mapping[str, Any],
        *,
        nonce: str,
        access_token: str | None,
    ) -> dict[str, Any]:
        name = self.provider.name
        try:
            header = jwt.get_unverified_header(id_token)
        except InvalidTokenError as exc:
            raise LoginFailed(f"{name} sent an identity token that is not a JWT") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms(metadata):
            raise LoginFailed(f"{name}'s identity token is signed with an algorithm we do not accept")
        kid = header.get("kid")
        key = self._key_for(kid if isinstance(kid, str) else None, alg, metadata)
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key.key.key,
                algorithms=[alg],
                audience=self.provider.client_id,
                issuer=self.provider.issuer,
                # The times are checked below, against the injected clock.
                options={
                    "require": ["iss", "sub", "aud", "exp", "iat"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError as exc:
            raise LoginFailed(f"{name}'s identity token has an invalid signature") from exc
        except jwt.InvalidIssuerError as exc:
            raise LoginFailed(f"the identity token was not issued by {name}") from exc
        except jwt.InvalidAudienceError as exc:
            raise LoginFailed(f"{name}'s identity token is meant for another client") from exc
        except InvalidTokenError as exc:
            raise LoginFailed(f"{name}'s identity token is not valid") from exc
        self._check_claims(claims, nonce=nonce)
        at_hash = claims.get("at_hash")
        if access_token is not None and at_hash is not None and not _hash_matches(at_hash, access_token, alg):
            raise LoginFailed(f"{name}'s identity token does not belong to its access token")
        return claims

    def _check_claims(self, claims: Mapping[str, Any], *, nonce: str) -> None:
        name = self.provider.name
        audience = claims["aud"]
        azp = claims.get("azp")
        # OIDC Core 3.1.3.7, 4-5: with several audiences azp is needed, and when present it is us.
        if (isinstance(audience, list) and len(audience) > 1 and azp is None) or (
            azp is not None and azp != self.provider.client_id
        ):
            raise LoginFailed(f"{name}'s identity token is meant for another client")
        now = self._clock()
        exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf")
        if not _is_number(exp) or not _is_number(iat) or (nbf is not None and not _is_number(nbf)):
            raise LoginFailed(f"{name}'s identity token has invalid times")
        if exp + CLOCK_SKEW <= now:
            raise LoginFailed(f"{name}'s identity token has expired")
        if iat - CLOCK_SKEW > now or (nbf is not None and nbf - CLOCK_SKEW > now):
            raise LoginFailed(f"{name}'s identity token is not valid yet")
        if now - iat > MAX_ID_TOKEN_AGE + CLOCK_SKEW:
            raise LoginFailed(f"{name}'s identity token is too old")
        token_nonce = claims.get("nonce")
        if not isinstance(token_nonce, str) or not hmac.compare_digest(token_nonce.encode(), nonce.encode()):
            raise LoginFailed(f"{name}'s identity token belongs to another sign-in (nonce)")
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_LENGTH:
            raise LoginFailed(f"{name}'s identity token has no valid subject")

    def _check_acr(self, claims: Mapping[str, Any]) -> None:
        # acr_values is a request, not a guarantee (OIDC Core 3.1.2.1): what was reached is checked.
        wanted = self.provider.acr_values
        if wanted and claims.get("acr") not in wanted:
            raise LoginFailed(
                f"the sign-in at {self.provider.name} did not reach the required level of assurance",
                error="refused",
            )

    def _algorithms(self, metadata: Mapping[str, Any]) -> frozenset[str]:
        # OIDC Discovery: id_token_signing_alg_values_supported is required; RS256 is the default.
        offered = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        if not isinstance(offered, list):
            return frozenset()
        return SIGNING_ALGORITHMS.intersection(a for a in offered if isinstance(a, str))

    def _key_for(self, kid: str | None, alg: str, metadata: Mapping[str, Any]) -> _Key:
        found = _pick_key(self._keys(metadata, refresh=False), kid, alg)
        if found is None and self._may_refetch_keys():
            found = _pick_key(self._keys(metadata, refresh=True), kid, alg)
        if found is None:
            raise LoginFailed(f"{self.provider.name}'s identity token is signed by a key it does not publish")
        return found

    # -- userinfo --
    def _userinfo(self, metadata: Mapping[str, Any], access_token: Any, subject: str) -> Mapping[str, Any]:
        name = self.provider.name
        endpoint = metadata.get("userinfo_endpoint")
        if not isinstance(endpoint, str) or not isinstance(access_token, str) or not access_token:
            return {}
        info = self._get_json(
            endpoint, "user information", headers={"Authorization": f"Bearer {access_token}"}
        )
        # OIDC Core 5.3.2: the userinfo sub must be the id_token's, or the answer is not used.
        if info.get("sub") != subject:
            raise LoginFailed(f"{name}'s user information is about someone else")
        return info

    # -- discovery and keys --
    def _discover(self) -> Mapping[str, Any]:
        with self._lock:
            cached = self._metadata
            if cached is not None and self._clock() - cached.fetched < METADATA_SECONDS:
                return dict(cached.value)
        name = self.provider.name
        metadata = self._get_json(self.provider.issuer.rstrip("/") + DISCOVERY_PATH, "configuration")
        # OIDC Discovery 4.3: the issuer in the metadata is exactly the one asked about.
        if metadata.get("issuer") != self.provider.issuer:
            raise LoginFailed(f"{name}'s configuration names another issuer", error="unavailable")
        for endpoint in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = metadata.get(endpoint)
            if not isinstance(value, str) or not _secure_url(value):
                raise LoginFailed(f"{name}'s configuration has no valid {endpoint}", error="unavailable")
        userinfo = metadata.get("userinfo_endpoint")
        if userinfo is not None and (not isinstance(userinfo, str) or not _secure_url(userinfo)):
            raise LoginFailed(f"{name}'s configuration has an invalid userinfo_endpoint", error="unavailable")
        methods = metadata.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise LoginFailed(f"{name} does not support PKCE with S256", error="unavailable")
        auth_methods = metadata.get("token_endpoint_auth_methods_supported")
        if isinstance(auth_methods, list) and self.provider.auth_method not in auth_methods:
            raise LoginFailed(
                f"{name} does not accept {self.provider.auth_method} client authentication",
                error="unavailable",
            )
        if not self._algorithms(metadata):
            raise LoginFailed(
                f"{name} signs identity tokens with no algorithm we accept", error="unavailable"
            )
        with self._lock:
            self._metadata = _Cached(metadata, self._clock())
        return dict(metadata)

    def _keys(self, metadata: Mapping[str, Any], *, refresh: bool) -> list[_Key]:
        with self._lock:
            cached = self._jwks
            if not refresh and cached is not None and self._clock() - cached.fetched < METADATA_SECONDS:
                return list(cached.value)
        document = self._get_json(str(metadata["jwks_uri"]), "key set")
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise LoginFailed(f"{self.provider.name} published an invalid key set", error="unavailable")
        keys: list[_Key] = []
        for entry in entries:
            # Encryption keys, private parts and key types this library cannot use are skipped.
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or "d" in entry:
                continue
            try:
                keys.append(_Key(entry, PyJWK(entry)))
            except PyJWKError:
                continue
        with self._lock:
            self._jwks = _Cached(keys, self._clock())
        return keys

    def _may_refetch_keys(self) -> bool:
        with self._lock:
            cached = self._jwks
            return cached is None or self._clock() - cached.fetched >= JWKS_REFETCH_SECONDS

    def _get_json(self, url: str, what: str, *, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """GET ``url``'s JSON object, read up to MAX_RESPONSE_BYTES; failures are LoginFailed."""
        name = self.provider.name
        body = bytearray()
        try:
            with self._http.stream(
                "GET",
                url,
                headers={"Accept": "application/json", **(headers or {})},
                timeout=HTTP_TIMEOUT,
            ) as response:
                if response.status_code != 200:
                    raise LoginFailed(
                        f"{name} answered HTTP {response.status_code} for its {what}",
                        error="unavailable",
                    )
                for chunk in response.iter_bytes():
                    body.extend(chunk)
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise LoginFailed(f"{name}'s {what} is too large", error="unavailable")
        except httpx.HTTPError as exc:
            raise LoginFailed(f"{name} could not be reached", error="unavailable") from exc
        try:
            data = json.loads(bytes(body))
        except ValueError as exc:
            raise LoginFailed(f"{name} sent invalid JSON for its {what}", error="unavailable") from exc
        if not isinstance(data, dict):
            raise LoginFailed(f"{name} sent invalid JSON for its {what}", error="unavailable")
        return data


# -- helpers ----------------------------------------------------------------------------------
def _pick_key(keys: list[_Key], kid: str | None, alg: str) -> _Key | None:
    """The key for ``kid`` usable with ``alg``; without a kid, the only such key (OIDC Core 10.1)."""
    usable = [key for key in keys if _key_fits(key.jwk, alg)]
    if kid is not None:
        usable = [key for key in usable if key.jwk.get("kid") == kid]
    return usable[0] if len(usable) == 1 else None


def _key_fits(jwk: Mapping[str, Any], alg: str) -> bool:
    # A JWK's own "alg" restricts it (RFC 7517 4.4); else its type decides.
    if jwk.get("alg") is not None:
        return bool(jwk["alg"] == alg)
    if alg[:2] in ("RS", "PS"):
        return jwk.get("kty") == "RSA"
    return jwk.get("kty") == "EC" and _EC_ALGORITHMS.get(str(jwk.get("crv"))) == alg


def _hash_matches(value: Any, access_token: str, alg: str) -> bool:
    """OIDC Core 3.1.3.6: at_hash is the left half of the access token's hash, base64url."""
    digest = _HASHES[alg[-3:]](access_token.encode("ascii")).digest()
    expected = base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=")
    return isinstance(value, str) and hmac.compare_digest(value.encode(), expected)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _display_name(claims: Mapping[str, Any]) -> str | None:
    name = claims.get("name")
    if not isinstance(name, str) or not name.strip():
        parts = [claims.get("given_name"), claims.get("family_name")]
        name = " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
    name = " ".join(name.split())
    return name[:MAX_NAME_LENGTH] or None
