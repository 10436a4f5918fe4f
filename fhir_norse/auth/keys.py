"""The server's own signing keys for access tokens: generated on first start, kept in the database,
rotatable with an overlap, published as a JWK Set at ``/.well-known/jwks.json``.

Keys are RSA 2048 and sign RS256 (verification of RS256 is fast, which matters on every request).
The private key is stored as PKCS#8 PEM encrypted with the configured passphrase
(``settings.key_passphrase``); the public half is stored as a JWK so verification needs no
decryption. Verification keys are cached in memory and reloaded every ``refresh_seconds``, so a
request needs no database query.

Rotation makes a new key the signing key; the older keys keep verifying until ``retire_after`` =
rotation time + the longest token lifetime, and then leave the JWK Set.
See https://hl7.org/fhir/smart-app-launch/backend-services.html and RFC 7517/7638.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from fhir_norse.auth.tables import SigningKeyRow
from fhir_norse.config import Settings

log = logging.getLogger("fhir_norse.auth")

ACCESS_TOKEN_ALG = "RS256"
RSA_KEY_BITS = 2048
# Used only in development mode when no passphrase is configured; production refuses to start.
DEVELOPMENT_PASSPHRASE = "fhir-norse-development-only-key-passphrase"
# After an unknown ``kid`` the key set is reloaded at most this often (a key rotated by another
# process becomes usable at once, while random kids cannot make every request query the database).
UNKNOWN_KID_RELOAD_SECONDS = 5.0
# A rotated-out key outlives the longest token by this much more (clock skew between servers).
ROTATION_MARGIN_SECONDS = 60

_KEYS = SigningKeyRow.__table__  # type: ignore[attr-defined]
# Decrypted private keys by (encrypted PEM, passphrase digest), shared by the stores of a process.
_DECRYPTED: dict[tuple[str, bytes], rsa.RSAPrivateKey] = {}


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def passphrase_from(settings: Settings) -> str:
    """The key passphrase from ``settings.key_passphrase``.

    Without one, development mode uses a fixed development passphrase (logged as a warning) and
    production mode refuses to start.
    """
    value = settings.key_passphrase.get_secret_value()
    if value:
        return value
    if settings.mode == "development":
        log.warning("no key_passphrase configured: using the development passphrase for signing keys")
        return DEVELOPMENT_PASSPHRASE
    raise RuntimeError("FHIR_NORSE_KEY_PASSPHRASE must be set outside development mode")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of an RSA public JWK, used as its ``kid``."""
    canonical = json.dumps(
        {"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"), sort_keys=True
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    alg: str
    private_key: rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A key as listed by :meth:`KeyStore.list_keys` (no private material)."""

    kid: str
    alg: str
    created_at: datetime
    retire_after: datetime | None


@dataclass(frozen=True, slots=True)
class _KeySet:
    verification: Mapping[str, rsa.RSAPublicKey]
    jwks: dict[str, Any]
    signing_kid: str | None
    loaded_at: float
    # Earliest retire_after among the loaded keys: the set is reloaded when it passes.
    next_retirement: float | None = None
    encrypted: Mapping[str, str] = field(default_factory=dict)


class KeyStore:
    """The server's signing keys, in the database, with an in-memory cache of the public keys.

    Thread-safe. ``clock`` gives wall-clock seconds (tests move it).
    """

    def __init__(
        self,
        engine: sa.Engine,
        passphrase: str | bytes,
        *,
        max_token_lifetime: int = 300,
        refresh_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        secret = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
        if not secret:
            raise ValueError("the signing key passphrase must not be empty")
        self.engine = engine
        self._passphrase = secret
        self.max_token_lifetime = max(0, int(max_token_lifetime))
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._keyset: _KeySet | None = None
        self._private: dict[str, rsa.RSAPrivateKey] = {}
        self._last_forced = float("-inf")

    # -- time ---------------------------------------------------------------------------------
    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC).replace(tzinfo=None)

    # -- writes -------------------------------------------------------------------------------
    @contextmanager
    def _locked_begin(self) -> Iterator[sa.Connection]:
        """A write transaction holding the key table lock, so two processes starting together
        do not both generate a first key."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
                yield conn
            return
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"LOCK TABLE {_KEYS.name} IN SHARE ROW EXCLUSIVE MODE")
            yield conn

    def _new_row(self, now: datetime) -> dict[str, Any]:
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        kid = jwk_thumbprint(jwk)
        jwk.update({"kid": kid, "alg": ACCESS_TOKEN_ALG, "use": "sig"})
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._passphrase),
        ).decode()
        self._private[kid] = private
        return {
            "kid": kid,
            "alg": ACCESS_TOKEN_ALG,
            "private_key_pem": pem,
            "public_jwk": jwk,
            "created_at": now,
            "retire_after": None,
        }

    def ensure(self) -> str:
        """Generate the first signing key if there is none; return the signing ``kid``."""
        current = self._load().signing_kid
        if current is not None:
            return current
        with self._locked_begin() as conn:
            active = conn.execute(
                sa.select(_KEYS.c.kid).where(_KEYS.c.retire_after.is_(None)).limit(1)
            ).scalar_one_or_none()
            if active is None:
                row = self._new_row(self._now())
                conn.execute(sa.insert(_KEYS).values(**row))
                log.info("generated the first access-token signing key %s", row["kid"])
        kid = self.refresh(force=True).signing_kid
        assert kid is not None
        return kid

    def rotate(self, *, retire_now: bool = False) -> str:
        """Make a new signing key; return its ``kid``.

        Older keys verify until now + ``max_token_lifetime`` + a margin (tokens they signed are still valid),
        or stop at once with ``retire_now`` (after a key compromise: every older token fails).
        Keys retired before now are deleted.
        """
        now = self._now()
        retire_at = (
            now if retire_now else now + timedelta(seconds=self.max_token_lifetime + ROTATION_MARGIN_SECONDS)
        )
        with self._locked_begin() as conn:
            conn.execute(sa.delete(_KEYS).where(_KEYS.c.retire_after <= now))
            conn.execute(
                sa.update(_KEYS).where(_KEYS.c.retire_after.is_(None)).values(retire_after=retire_at)
            )
            if retire_now:
                conn.execute(sa.update(_KEYS).where(_KEYS.c.retire_after > now).values(retire_after=now))
            row = self._new_row(now)
            conn.execute(sa.insert(_KEYS).values(**row))
        log.info("rotated the access-token signing key: %s signs now", row["kid"])
        self.refresh(force=True)
        return str(row["kid"])

    def list_keys(self) -> list[StoredKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(_KEYS.c.kid, _KEYS.c.alg, _KEYS.c.created_at, _KEYS.c.retire_after).order_by(
                    _KEYS.c.created_at.desc(), _KEYS.c.kid
                )
            ).all()
        return [StoredKey(r.kid, r.alg, r.created_at, r.retire_after) for r in rows]

    # -- reads --------------------------------------------------------------------------------
    def refresh(self, *, force: bool = False) -> _KeySet:
        """Reload the key set from the database (if stale, or always with ``force``)."""
        with self._lock:
            keyset = self._keyset
            if not force and keyset is not None and not self._stale(keyset):
                return keyset
            keyset = self._read()
            self._keyset = keyset
            return keyset

    def _stale(self, keyset: _KeySet) -> bool:
        if time.monotonic() - keyset.loaded_at >= self.refresh_seconds:
            return True
        return keyset.next_retirement is not None and self._clock() >= keyset.next_retirement

    def _load(self) -> _KeySet:
        keyset = self._keyset
        if keyset is None or self._stale(keyset):
            return self.refresh()
        return keyset

    def _read(self) -> _KeySet:
        now = self._now()
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(_KEYS)
                .where(sa.or_(_KEYS.c.retire_after.is_(None), _KEYS.c.retire_after > now))
                .order_by(_KEYS.c.created_at.desc(), _KEYS.c.kid.desc())
            ).all()
        verification: dict[str, rsa.RSAPublicKey] = {}
        published: list[dict[str, Any]] = []
        encrypted: dict[str, str] = {}
        signing_kid: str | None = None
        retirements: list[float] = []
        for row in rows:
            if row.alg != ACCESS_TOKEN_ALG:
                continue
            jwk = dict(row.public_jwk)
            public = RSAAlgorithm.from_jwk(jwk)
            if not isinstance(public, rsa.RSAPublicKey):  # pragma: no cover - we only store public JWKs
                continue
            verification[row.kid] = public
            published.append({k: jwk[k] for k in ("kty", "kid", "use", "alg", "n", "e") if k in jwk})
            encrypted[row.kid] = row.private_key_pem
            if row.retire_after is None:
                signing_kid = signing_kid or row.kid
            else:
                retirements.append(row.retire_after.replace(tzinfo=UTC).timestamp())
        return _KeySet(
            verification=verification,
            jwks={"keys": published},
            signing_kid=signing_kid,
            loaded_at=time.monotonic(),
            next_retirement=min(retirements) if retirements else None,
            encrypted=encrypted,
        )

    def signing_key(self) -> SigningKey:
        """The key that signs new access tokens (generated if the database has none)."""
        keyset = self._load()
        kid = keyset.signing_kid
        if kid is None:
            kid = self.ensure()
            keyset = self._load()
        private = self._private.get(kid)
        if private is None:
            private = self._private.setdefault(kid, self._decrypt(kid, keyset.encrypted[kid]))
        return SigningKey(kid=kid, alg=ACCESS_TOKEN_ALG, private_key=private)

    def _decrypt(self, kid: str, pem: str) -> rsa.RSAPrivateKey:
        # Decryption runs a deliberately slow key derivation (~70 ms); a process that builds several
        # apps on one database (tests, reloads) does it once per key.
        cache_key = (pem, hashlib.sha256(self._passphrase).digest())
        cached = _DECRYPTED.get(cache_key)
        if cached is not None:
            return cached
        try:
            loaded = serialization.load_pem_private_key(pem.encode(), password=self._passphrase)
        except ValueError as exc:
            raise RuntimeError(
                f"cannot decrypt signing key {kid}: was FHIR_NORSE_KEY_PASSPHRASE changed?"
            ) from exc
        if not isinstance(loaded, rsa.RSAPrivateKey):  # pragma: no cover
            raise RuntimeError(f"signing key {kid} is not an RSA key")
        if len(_DECRYPTED) >= 32:
            _DECRYPTED.clear()
        _DECRYPTED[cache_key] = loaded
        return loaded

    def check_passphrase(self) -> None:
        """Fail now (at start-up) rather than on the first token grant if the passphrase is wrong."""
        self.signing_key()

    def public_jwks(self) -> dict[str, Any]:
        """The JWK Set of every key that may still verify a token (for ``/.well-known/jwks.json``)."""
        jwks: dict[str, Any] = self._load().jwks
        return {"keys": [dict(k) for k in jwks["keys"]]}

    def verification_keys(self) -> Mapping[str, rsa.RSAPublicKey]:
        """Public keys by ``kid``, from memory (reloaded every ``refresh_seconds``)."""
        return self._load().verification

    def lookup(self, kid: str) -> rsa.RSAPublicKey | None:
        """The verification key for ``kid``; an unknown kid reloads the set, at most every few seconds."""
        key = self._load().verification.get(kid)
        if key is not None:
            return key
        now = time.monotonic()
        if now - self._last_forced < UNKNOWN_KID_RELOAD_SECONDS:
            return None
        self._last_forced = now
        return self.refresh(force=True).verification.get(kid)
