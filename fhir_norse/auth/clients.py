"""Registered clients (SMART Backend Services clients and SMART App Launch apps), their public keys
and allowed scopes, and the record of client-assertion ``jti`` values already used.

A client is registered by an operator (``fhir-norse clients add``), of one of three kinds:

- ``backend``: SMART Backend Services (``client_credentials``), a JWK Set of public keys (RSA >= 2048
  bits for RS384, EC P-384 for ES384) and the ``system/`` scopes it may ask for;
- ``public``: an app that runs where it cannot keep a secret (a browser, a phone), authorization code
  with PKCE only (https://hl7.org/fhir/smart-app-launch/client-public.html);
- ``confidential-asymmetric``: an app that authenticates with ``private_key_jwt`` and a JWK Set
  (https://hl7.org/fhir/smart-app-launch/client-confidential-asymmetric.html).

Apps register their exact redirect URIs (RFC 6749 3.1.2, matched as strings), ``patient/``, ``user/``
and the identity/launch scopes they may be granted, and the launches they use (``ehr``,
``standalone``). A revoked client gets no new token, and its tokens still in flight are refused
within ``refresh_seconds`` (immediately in the process that revoked it).
"""

from __future__ import annotations

import builtins
import ipaddress
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from fhir_norse.auth.tables import ClientRow, UsedJtiRow

_CLIENTS = ClientRow.__table__  # type: ignore[attr-defined]
_USED_JTI = UsedJtiRow.__table__  # type: ignore[attr-defined]

# The algorithms a client may sign its assertions with, and the JWK key type each needs.
ASSERTION_KEY_TYPES: Mapping[str, str] = {"RS384": "RSA", "ES384": "EC"}
ES384_CURVE = "P-384"
MIN_RSA_BITS = 2048
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MAX_JTI_LENGTH = 255

# Client kinds (ClientRow.kind).
BACKEND = "backend"
PUBLIC = "public"
CONFIDENTIAL = "confidential-asymmetric"
APP_KINDS: frozenset[str] = frozenset({PUBLIC, CONFIDENTIAL})
LAUNCH_TYPES: tuple[str, ...] = ("ehr", "standalone")
# Scopes an app may be granted besides patient/ and user/ resource scopes: identity, launch context
# and refresh (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html).
APP_OTHER_SCOPES: frozenset[str] = frozenset(
    {
        "openid",
        "fhirUser",
        "profile",
        "launch",
        "launch/patient",
        "launch/encounter",
        "offline_access",
        "online_access",
    }
)
MAX_REDIRECT_URI_LENGTH = 2000
MAX_REDIRECT_URIS = 20
_LOOPBACK_HOSTS = frozenset({"localhost"})


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# -- scopes -----------------------------------------------------------------------------------
# A small, self-contained reading of SMART resource scopes, enough to decide whether a client's
# allowed scopes cover the scopes it asks for. The full grammar used for enforcement lives in
# fhir_norse.auth.scopes. https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html

_RESOURCE_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]{0,63})\."
    r"(?P<perms>read|write|\*|c?r?u?d?s?)(?:\?(?P<query>\S+))?$"
)
_V1_PERMISSIONS: Mapping[str, frozenset[str]] = {
    "read": frozenset("rs"),
    "write": frozenset("cud"),
    "*": frozenset("cruds"),
}
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")


@dataclass(frozen=True, slots=True)
class ResourceScope:
    context: str
    resource_type: str
    permissions: frozenset[str]
    query: str | None


def parse_resource_scope(scope: str) -> ResourceScope | None:
    """``system/Observation.rs``, ``patient/*.read``, ``user/Task.cu?status=ready``; else None."""
    match = _RESOURCE_SCOPE.match(scope)
    if match is None or not match["perms"]:
        return None
    perms = match["perms"]
    query = match["query"]
    if perms in _V1_PERMISSIONS:
        if query is not None:  # v1 scopes have no granular form
            return None
        permissions = _V1_PERMISSIONS[perms]
    else:
        permissions = frozenset(perms)
    return ResourceScope(match["context"], match["type"], permissions, query)


def is_scope_token(scope: str) -> bool:
    return bool(_SCOPE_TOKEN.match(scope))


def scope_covers(granted: str, requested: str) -> bool:
    """Whether the allowed scope ``granted`` includes everything ``requested`` asks for.

    Exact strings always; for resource scopes the same context, ``*`` or the same type, a subset of
    the permissions (v1 ``read`` = ``rs``, ``write`` = ``cud``, ``*`` = ``cruds``), and a granular
    ``?query`` grant covers only the same query.
    """
    if granted == requested:
        return True
    g = parse_resource_scope(granted)
    r = parse_resource_scope(requested)
    if g is None or r is None or g.context != r.context:
        return False
    if g.resource_type not in ("*", r.resource_type):
        return False
    if not r.permissions <= g.permissions:
        return False
    return g.query is None or (g.query == r.query and g.resource_type == r.resource_type)


def uncovered_scopes(allowed: Iterable[str], requested: Iterable[str]) -> list[str]:
    """The requested scopes that no allowed scope covers (empty when the request may be granted)."""
    allowed = tuple(allowed)
    return [s for s in requested if not any(scope_covers(a, s) for a in allowed)]


def validate_allowed_scopes(scopes: str | Iterable[str]) -> tuple[str, ...]:
    """The allowed scopes of a backend client: ``system/`` resource scopes (v1 or v2) only.

    A client_credentials token carries no user and no patient, so ``user/`` and ``patient/`` scopes
    cannot be allowed to a backend client.
    """
    items = scopes.split() if isinstance(scopes, str) else [s for x in scopes for s in x.split()]
    if not items:
        raise ValueError("a client needs at least one allowed scope")
    bad = [s for s in items if (p := parse_resource_scope(s)) is None or p.context != "system"]
    if bad:
        raise ValueError(
            "allowed scopes must be system/ resource scopes such as system/Observation.rs or system/*.read; "
            f"not {' '.join(bad)}"
        )
    return tuple(dict.fromkeys(items))


def validate_app_scopes(scopes: str | Iterable[str]) -> tuple[str, ...]:
    """The allowed scopes of an app: ``patient/`` and ``user/`` resource scopes (v1 or v2) and the
    identity, launch and refresh scopes. ``system/`` scopes belong to backend clients only: an app
    acts for a person, never for the whole system."""
    items = scopes.split() if isinstance(scopes, str) else [s for x in scopes for s in x.split()]
    if not items:
        raise ValueError("an app needs at least one allowed scope")
    bad = [
        s
        for s in items
        if s not in APP_OTHER_SCOPES
        and ((p := parse_resource_scope(s)) is None or p.context not in ("patient", "user"))
    ]
    if bad:
        raise ValueError(
            "allowed scopes of an app are patient/ and user/ resource scopes "
            "(patient/*.rs, user/Observation.read) "
            f"and {' '.join(sorted(APP_OTHER_SCOPES))}; not {' '.join(bad)}"
        )
    return tuple(dict.fromkeys(items))


def _loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_redirect_uri(uri: str) -> str:
    """An app's redirect URI as registered: absolute, ``https`` (``http`` only on the loopback host,
    for apps on the user's own machine, RFC 8252 7.3), no fragment (RFC 6749 3.1.2), no user info."""
    uri = uri.strip()
    if not uri or len(uri) > MAX_REDIRECT_URI_LENGTH or any(c.isspace() for c in uri):
        raise ValueError(f"a redirect URI is 1 to {MAX_REDIRECT_URI_LENGTH} characters without spaces")
    try:
        parts = urlsplit(uri)
        host = parts.hostname
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise ValueError(f"redirect URI {uri!r} is not a valid URI") from None
    if parts.fragment or "#" in uri:
        raise ValueError(f"redirect URI {uri!r} must not have a fragment")
    if not host:
        raise ValueError(f"redirect URI {uri!r} must be absolute (scheme and host)")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"redirect URI {uri!r} must not carry a user name or password")
    if parts.scheme == "https":
        return uri
    if parts.scheme == "http" and _loopback(host):
        return uri
    raise ValueError(f"redirect URI {uri!r} must use https (http only on 127.0.0.1, [::1] or localhost)")


def validate_launch_types(launch_types: Iterable[str]) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(t.strip() for x in launch_types for t in x.split(",") if t.strip()))
    bad = [t for t in items if t not in LAUNCH_TYPES]
    if bad:
        raise ValueError(f"launch types are ehr and standalone; not {' '.join(bad)}")
    if not items:
        raise ValueError("an app needs at least one launch type (ehr, standalone)")
    return items


# -- client keys ------------------------------------------------------------------------------
def validate_client_jwks(jwks: Any) -> dict[str, Any]:
    """Check a client's JWK Set: public keys only, each with a unique ``kid``, RSA >= 2048 bits or
    EC P-384, and an ``alg`` (if given) of RS384 or ES384. Returns the set with only its keys."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise ValueError('the JWK Set must be a JSON object with a non-empty "keys" array')
    kids: set[str] = set()
    keys: list[dict[str, Any]] = []
    for index, jwk in enumerate(jwks["keys"]):
        where = f"key {index}"
        if not isinstance(jwk, dict):
            raise ValueError(f"{where} is not a JSON object")
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ValueError(f'{where} has no "kid"; SMART clients name each key')
        where = f"key {kid!r}"
        if kid in kids:
            raise ValueError(f"{where} appears twice")
        kids.add(kid)
        if _PRIVATE_MEMBERS & jwk.keys():
            raise ValueError(f"{where} holds private key material; register the public key only")
        kty = jwk.get("kty")
        alg = jwk.get("alg")
        if alg is not None and alg not in ASSERTION_KEY_TYPES:
            raise ValueError(f"{where} has alg {alg!r}; only RS384 and ES384 are accepted")
        if kty == "RSA":
            if alg not in (None, "RS384"):
                raise ValueError(f"{where} is an RSA key with alg {alg!r}")
            public = _public_key(jwk, "RS384", where)
            if not isinstance(public, rsa.RSAPublicKey) or public.key_size < MIN_RSA_BITS:
                raise ValueError(f"{where} must be an RSA key of at least {MIN_RSA_BITS} bits")
        elif kty == "EC":
            if alg not in (None, "ES384") or jwk.get("crv") != ES384_CURVE:
                raise ValueError(f"{where} must be an EC key on curve {ES384_CURVE} (ES384)")
            public = _public_key(jwk, "ES384", where)
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise ValueError(f"{where} is not an EC public key")
        else:
            raise ValueError(f"{where} has key type {kty!r}; use RSA (RS384) or EC P-384 (ES384)")
        keys.append(dict(jwk))
    return {"keys": keys}


def _public_key(jwk: Mapping[str, Any], alg: str, where: str) -> Any:
    try:
        return PyJWK(dict(jwk), algorithm=alg).key
    except (PyJWKError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{where} is not a valid JWK: {exc}") from exc


# -- the registry -----------------------------------------------------------------------------
def _name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 200:
        raise ValueError("a client needs a name of 1 to 200 characters")
    return name


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    name: str
    jwks: dict[str, Any]
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    kind: str = BACKEND
    redirect_uris: tuple[str, ...] = ()
    launch_types: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def is_app(self) -> bool:
        """An app of the authorization code flow (public or confidential-asymmetric)."""
        return self.kind in APP_KINDS

    def key(self, kid: str) -> dict[str, Any] | None:
        for jwk in self.jwks.get("keys", ()):
            if isinstance(jwk, dict) and jwk.get("kid") == kid:
                return jwk
        return None


def _client(row: Any) -> Client:
    return Client(
        client_id=row.client_id,
        name=row.name,
        jwks=dict(row.jwks),
        scopes=tuple(row.scopes.split()),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        kind=row.kind or BACKEND,
        redirect_uris=tuple(row.redirect_uris or ()),
        launch_types=tuple(row.launch_types or ()),
    )


class ClientRegistry:
    """Clients (backend clients and apps) in the database. Thread-safe; the set of revoked client
    ids is cached in memory for ``refresh_seconds`` so that checking a token needs no query."""

    def __init__(self, engine: sa.Engine, *, refresh_seconds: float = 30.0) -> None:
        self.engine = engine
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._revoked: frozenset[str] = frozenset()
        self._revoked_at = float("-inf")

    def add(self, name: str, jwks: Any, scopes: str | Sequence[str]) -> Client:
        """Register a backend client (``client_credentials`` with ``private_key_jwt``)."""
        return self._insert(
            _name(name), BACKEND, validate_client_jwks(jwks), validate_allowed_scopes(scopes), (), ()
        )

    def add_app(
        self,
        name: str,
        *,
        kind: str,
        redirect_uris: Iterable[str],
        scopes: str | Sequence[str],
        launch_types: Iterable[str],
        jwks: Any = None,
    ) -> Client:
        """Register an app of the authorization code flow: ``public`` (PKCE only, no keys) or
        ``confidential-asymmetric`` (``private_key_jwt`` with the JWK Set ``jwks``)."""
        clean_name = _name(name)
        if kind not in APP_KINDS:
            raise ValueError(f"an app is {PUBLIC} or {CONFIDENTIAL}, not {kind!r}")
        if kind == PUBLIC and jwks is not None:
            raise ValueError("a public app has no keys (it authenticates with PKCE only)")
        if kind == CONFIDENTIAL and jwks is None:
            raise ValueError("a confidential-asymmetric app needs a JWK Set of its public keys")
        clean_jwks = validate_client_jwks(jwks) if jwks is not None else {"keys": []}
        uris = tuple(dict.fromkeys(validate_redirect_uri(u) for u in redirect_uris))
        if not uris:
            raise ValueError("an app needs at least one redirect URI")
        if len(uris) > MAX_REDIRECT_URIS:
            raise ValueError(f"an app may register at most {MAX_REDIRECT_URIS} redirect URIs")
        return self._insert(
            clean_name,
            kind,
            clean_jwks,
            validate_app_scopes(scopes),
            uris,
            validate_launch_types(launch_types),
        )

    def ensure_builtin_app(
        self,
        client_id: str,
        name: str,
        *,
        redirect_uris: Iterable[str],
        scopes: str,
        launch_types: Iterable[str],
    ) -> Client:
        """A public app this server ships (the clinician's report), under a fixed ``client_id``:
        registered on first start, its redirect URIs and scopes kept current (the base URL may move),
        and left revoked if an operator revoked it."""
        uris = [validate_redirect_uri(u) for u in redirect_uris]
        allowed = " ".join(validate_app_scopes(scopes))
        launches = list(validate_launch_types(launch_types))
        with self.engine.begin() as conn:
            found = conn.execute(sa.select(_CLIENTS).where(_CLIENTS.c.client_id == client_id)).first()
            if found is None:
                conn.execute(
                    sa.insert(_CLIENTS).values(
                        client_id=client_id,
                        name=_name(name),
                        jwks={"keys": []},
                        scopes=allowed,
                        created_at=utcnow(),
                        revoked_at=None,
                        kind=PUBLIC,
                        redirect_uris=uris,
                        launch_types=launches,
                    )
                )
            elif (found.redirect_uris, found.scopes, found.launch_types) != (uris, allowed, launches):
                conn.execute(
                    sa.update(_CLIENTS)
                    .where(_CLIENTS.c.client_id == client_id)
                    .values(redirect_uris=uris, scopes=allowed, launch_types=launches)
                )
            row = conn.execute(sa.select(_CLIENTS).where(_CLIENTS.c.client_id == client_id)).one()
        return _client(row)

    def _insert(
        self,
        name: str,
        kind: str,
        jwks: dict[str, Any],
        allowed: tuple[str, ...],
        redirect_uris: tuple[str, ...],
        launch_types: tuple[str, ...],
    ) -> Client:
        created = utcnow()
        # Hex, not base64url: an id starting with "-" reads as an option on a command line
        # (``fhir-norse clients revoke <id>`` failed that way, 1 time in 32).
        client_id = secrets.token_hex(18)
        row = {
            "client_id": client_id,
            "name": name,
            "jwks": jwks,
            "scopes": " ".join(allowed),
            "created_at": created,
            "revoked_at": None,
            "kind": kind,
            "redirect_uris": list(redirect_uris),
            "launch_types": list(launch_types),
        }
        with self.engine.begin() as conn:
            conn.execute(sa.insert(_CLIENTS).values(**row))
        return Client(client_id, name, jwks, allowed, created, None, kind, redirect_uris, launch_types)

    def list(self) -> builtins.list[Client]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(_CLIENTS).order_by(_CLIENTS.c.created_at, _CLIENTS.c.client_id)
            ).all()
        return [_client(r) for r in rows]

    def get(self, client_id: str) -> Client | None:
        if not client_id or len(client_id) > 64:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_CLIENTS).where(_CLIENTS.c.client_id == client_id)).first()
        return _client(row) if row is not None else None

    def revoke(self, client_id: str) -> Client:
        """Revoke a client (idempotent; the first revocation time is kept). KeyError if unknown."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(_CLIENTS)
                .where(_CLIENTS.c.client_id == client_id, _CLIENTS.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        client = self.get(client_id)
        if client is None:
            raise KeyError(client_id)
        with self._lock:
            self._revoked = self._revoked | {client_id}
        return client

    def revoked_ids(self) -> frozenset[str]:
        """Client ids revoked, from memory; reloaded when older than ``refresh_seconds``."""
        if time.monotonic() - self._revoked_at < self.refresh_seconds:
            return self._revoked
        with self._lock:
            if time.monotonic() - self._revoked_at >= self.refresh_seconds:
                with self.engine.connect() as conn:
                    ids = conn.execute(
                        sa.select(_CLIENTS.c.client_id).where(_CLIENTS.c.revoked_at.is_not(None))
                    ).scalars()
                    self._revoked = frozenset(ids)
                self._revoked_at = time.monotonic()
            return self._revoked

    def record_jti(self, client_id: str, jti: str, expires_at: datetime) -> bool:
        """Remember an accepted assertion ``jti``; False if the client used it before (a replay)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(_USED_JTI).values(client_id=client_id, jti=jti, expires_at=expires_at))
        except sa.exc.IntegrityError:
            return False
        return True

    def purge_used_jti(self, now: datetime | None = None) -> int:
        """Forget ``jti`` values whose assertion has expired (it can no longer be replayed)."""
        with self.engine.begin() as conn:
            result = conn.execute(sa.delete(_USED_JTI).where(_USED_JTI.c.expires_at < (now or utcnow())))
        return int(result.rowcount or 0)
