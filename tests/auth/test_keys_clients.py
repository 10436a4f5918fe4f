"""Server signing keys, the client registry, used assertion ids, rate limits and the operator CLI
(SMART Backend Services: https://hl7.org/fhir/smart-app-launch/backend-services.html)."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import SecretStr

from fhir_norse.auth.clients import ClientRegistry, scope_covers, uncovered_scopes, utcnow
from fhir_norse.auth.keys import DEVELOPMENT_PASSPHRASE, ROTATION_MARGIN_SECONDS, KeyStore, passphrase_from
from fhir_norse.auth.ratelimit import RateLimiter, TooManyRequests
from fhir_norse.auth.tables import AUTH_TABLES, SigningKeyRow
from fhir_norse.auth.tokens import TokenVerifier
from fhir_norse.cli import auth as cli
from fhir_norse.config import Settings
from fhir_norse.store.db import create_engine


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """The test database with the auth tables emptied (the PostgreSQL lane shares one schema)."""
    engine = create_engine(database_url)
    with engine.begin() as conn:
        for table in reversed(AUTH_TABLES):
            conn.execute(sa.delete(table))
    yield engine
    engine.dispose()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rsa_jwk(kid: str = "rsa-1", bits: int = 2048) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk["kid"] = kid
    return jwk


def ec_jwk(kid: str = "ec-1", curve: ec.EllipticCurve | None = None) -> dict[str, Any]:
    key = ec.generate_private_key(curve or ec.SECP384R1())
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk["kid"] = kid
    return jwk


# -- keys -----------------------------------------------------------------------------------------
def test_first_start_generates_a_key_that_survives_a_restart(engine: sa.Engine) -> None:
    first = KeyStore(engine, "s3cret")
    kid = first.ensure()
    signing = first.signing_key()
    assert signing.kid == kid and signing.alg == "RS256"

    restarted = KeyStore(engine, "s3cret")
    assert restarted.ensure() == kid
    again = restarted.signing_key()
    assert again.kid == kid
    assert again.private_key.private_numbers() == signing.private_key.private_numbers()
    assert [k["kid"] for k in restarted.public_jwks()["keys"]] == [kid]


def test_private_key_is_stored_encrypted_and_needs_the_passphrase(engine: sa.Engine) -> None:
    kid = KeyStore(engine, "s3cret").ensure()
    with engine.connect() as conn:
        pem = conn.execute(sa.select(SigningKeyRow.__table__.c.private_key_pem)).scalar_one()  # type: ignore[attr-defined]
    assert pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(RuntimeError, match=kid):
        KeyStore(engine, "another passphrase").signing_key()
    with pytest.raises(ValueError):
        KeyStore(engine, "")


def test_public_jwks_has_no_private_members(engine: sa.Engine) -> None:
    store = KeyStore(engine, "s3cret")
    kid = store.ensure()
    (jwk,) = store.public_jwks()["keys"]
    assert jwk["kid"] == kid and jwk["kty"] == "RSA" and jwk["alg"] == "RS256" and jwk["use"] == "sig"
    assert set(jwk) == {"kty", "kid", "use", "alg", "n", "e"}


def test_rotation_keeps_old_key_for_verification_until_it_retires(engine: sa.Engine) -> None:
    clock = Clock(1_900_000_000.0)
    store = KeyStore(engine, "s3cret", max_token_lifetime=300, clock=clock)
    old = store.ensure()
    new = store.rotate()
    assert new != old
    assert store.signing_key().kid == new
    assert {k["kid"] for k in store.public_jwks()["keys"]} == {old, new}
    assert set(store.verification_keys()) == {old, new}

    # Another process (a new store on the same database) sees the same state.
    other = KeyStore(engine, "s3cret", max_token_lifetime=300, clock=clock)
    assert other.signing_key().kid == new
    assert {k.kid for k in other.list_keys()} == {old, new}

    clock.now += 300 + ROTATION_MARGIN_SECONDS + 1
    assert [k["kid"] for k in store.public_jwks()["keys"]] == [new]
    assert store.lookup(old) is None
    assert store.lookup(new) is not None


def test_rotation_with_retire_now_drops_old_keys_at_once(engine: sa.Engine) -> None:
    store = KeyStore(engine, "s3cret")
    old = store.ensure()
    new = store.rotate(retire_now=True)
    assert [k["kid"] for k in store.public_jwks()["keys"]] == [new]
    assert old not in store.verification_keys()


def test_passphrase_from_settings() -> None:
    configured = Settings(mode="production", key_passphrase=SecretStr("from-settings-long-enough"))
    # Settings refuse an empty passphrase in production; a copy skips that check, as a mistake might.
    production = Settings(mode="development").model_copy(update={"mode": "production"})

    assert passphrase_from(configured) == "from-settings-long-enough"
    assert passphrase_from(Settings(mode="development")) == DEVELOPMENT_PASSPHRASE
    with pytest.raises(RuntimeError, match="KEY_PASSPHRASE"):
        passphrase_from(production)


# -- clients --------------------------------------------------------------------------------------
def test_add_list_get_revoke(engine: sa.Engine) -> None:
    registry = ClientRegistry(engine, refresh_seconds=3600)
    client = registry.add(
        "EHR integration", {"keys": [rsa_jwk(), ec_jwk()]}, "system/Observation.rs system/*.read"
    )
    assert client.active and client.scopes == ("system/Observation.rs", "system/*.read")
    assert registry.get(client.client_id) == client
    assert registry.get("no-such-client") is None
    other = registry.add("Lab", {"keys": [ec_jwk("lab")]}, ["system/Patient.r"])
    assert [c.client_id for c in registry.list()] == [client.client_id, other.client_id]

    assert registry.revoked_ids() == frozenset()
    revoked = registry.revoke(client.client_id)
    assert revoked.revoked_at is not None and not revoked.active
    # The revoking process knows at once; another sees it at its next refresh.
    assert registry.revoked_ids() == {client.client_id}
    assert ClientRegistry(engine, refresh_seconds=0).revoked_ids() == {client.client_id}
    with pytest.raises(KeyError):
        registry.revoke("no-such-client")
    # Revoking again keeps the first time.
    assert registry.revoke(client.client_id).revoked_at == revoked.revoked_at


@pytest.mark.parametrize(
    ("jwks", "message"),
    [
        ({"keys": []}, "non-empty"),
        ([], "non-empty"),
        ({"keys": [{**rsa_jwk(), "kid": ""}]}, "kid"),
        ({"keys": [rsa_jwk("a"), ec_jwk("a")]}, "twice"),
        ({"keys": [rsa_jwk(bits=1024)]}, "2048"),
        ({"keys": [ec_jwk(curve=ec.SECP256R1())]}, "P-384"),
        ({"keys": [{**rsa_jwk(), "alg": "RS256"}]}, "RS384"),
        ({"keys": [{**ec_jwk(), "d": "private"}]}, "private"),
        ({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}, "private"),
        ({"keys": [{"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "abc"}]}, "key type"),
    ],
)
def test_unusable_client_keys_are_refused(engine: sa.Engine, jwks: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClientRegistry(engine).add("bad", jwks, "system/*.rs")


@pytest.mark.parametrize(
    "scopes", ["", "patient/*.rs", "user/Observation.read", "openid", "system/Observation"]
)
def test_backend_clients_get_only_system_resource_scopes(engine: sa.Engine, scopes: str) -> None:
    with pytest.raises(ValueError):
        ClientRegistry(engine).add("bad", {"keys": [rsa_jwk()]}, scopes)


def test_used_jti_refuses_a_replay_and_is_purged_after_expiry(engine: sa.Engine) -> None:
    registry = ClientRegistry(engine)
    a = registry.add("A", {"keys": [rsa_jwk()]}, "system/*.rs").client_id
    b = registry.add("B", {"keys": [rsa_jwk()]}, "system/*.rs").client_id
    soon = utcnow() + timedelta(minutes=5)
    assert registry.record_jti(a, "jti-1", soon)
    assert not registry.record_jti(a, "jti-1", soon)
    assert registry.record_jti(b, "jti-1", soon)  # unique per client
    assert registry.purge_used_jti(utcnow()) == 0
    assert registry.purge_used_jti(soon + timedelta(seconds=1)) == 2
    assert registry.record_jti(a, "jti-1", soon)


@pytest.mark.parametrize(
    ("granted", "requested", "covered"),
    [
        ("system/Observation.rs", "system/Observation.rs", True),
        ("system/*.rs", "system/Observation.rs", True),
        ("system/*.rs", "system/Observation.r", True),
        ("system/*.rs", "system/Observation.read", True),
        ("system/*.read", "system/Patient.rs", True),
        ("system/*.*", "system/Patient.cruds", True),
        ("system/*.cruds", "system/Patient.write", True),
        ("system/*.rs", "system/Observation.c", False),
        ("system/*.read", "system/Patient.write", False),
        ("system/Observation.rs", "system/Patient.rs", False),
        ("system/Observation.rs", "system/*.rs", False),
        ("system/*.rs", "patient/Observation.rs", False),
        ("system/*.rs", "system/Observation.rs?category=survey", True),
        ("system/Observation.rs?category=survey", "system/Observation.rs", False),
        ("system/Observation.rs?category=survey", "system/Observation.r?category=survey", True),
        ("system/*.rs", "openid", False),
    ],
)
def test_scope_covers(granted: str, requested: str, covered: bool) -> None:
    assert scope_covers(granted, requested) is covered


def test_uncovered_scopes() -> None:
    allowed = ["system/Observation.rs", "system/Patient.read"]
    assert uncovered_scopes(allowed, ["system/Observation.r", "system/Patient.s"]) == []
    assert uncovered_scopes(allowed, ["system/Observation.c", "system/Task.rs"]) == [
        "system/Observation.c",
        "system/Task.rs",
    ]


# -- rate limits ----------------------------------------------------------------------------------
def test_rate_limiter_allows_a_burst_then_refills() -> None:
    clock = Clock(100.0)
    limiter = RateLimiter(3, 60.0, clock=clock)
    assert [limiter.hit("a") for _ in range(3)] == [None, None, None]
    wait = limiter.hit("a")
    assert wait is not None and 0 < wait <= 20
    assert limiter.blocked("a") is not None
    assert limiter.hit("b") is None  # per key
    clock.now += 20
    assert limiter.blocked("a") is None
    assert limiter.hit("a") is None
    assert limiter.hit("a") is not None
    limiter.reset("a")
    assert limiter.hit("a") is None
    assert RateLimiter(0).hit("x") is None  # off


def test_rate_limiter_is_thread_safe() -> None:
    limiter = RateLimiter(500, 3600.0)
    allowed: list[int] = []

    def worker() -> None:
        allowed.append(sum(limiter.hit("k") is None for _ in range(100)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 500


def test_rate_limiter_forgets_idle_keys_beyond_its_bound() -> None:
    clock = Clock(0.0)
    limiter = RateLimiter(2, 60.0, max_keys=10, clock=clock)
    for i in range(50):
        limiter.hit(f"k{i}")
    assert len(limiter._buckets) <= 11


def test_too_many_requests_is_a_throttled_outcome() -> None:
    error = TooManyRequests.after(1.2)
    assert error.status == 429
    assert error.headers == {"Retry-After": "2"}
    assert error.outcome()["issue"][0]["code"] == "throttled"


# -- the operator CLI -----------------------------------------------------------------------------
def _settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, base_url="http://fhir.example.no/fhir", mode="development")


def test_cli_clients_add_list_revoke(engine: sa.Engine, database_url: str, tmp_path: Path) -> None:
    settings = _settings(database_url)
    jwks_file = tmp_path / "client.jwks.json"
    jwks_file.write_text(json.dumps({"keys": [rsa_jwk("ehr-2026")]}))
    client_id = cli.clients_add(settings, "EHR", jwks_file, "system/Observation.rs")
    (row,) = cli.clients_list(settings)
    assert row.client_id == client_id and row.name == "EHR" and row.kids == ("ehr-2026",)
    assert row.scopes == "system/Observation.rs" and row.revoked_at is None
    cli.clients_revoke(settings, client_id)
    assert cli.clients_list(settings)[0].revoked_at is not None
    with pytest.raises(KeyError):
        cli.clients_revoke(settings, "nobody")


def test_cli_mint_token_verifies_with_the_server_keys(engine: sa.Engine, database_url: str) -> None:
    settings = _settings(database_url)
    token = cli.mint_token(settings, "patient/*.rs", patient="p-1", ttl=120)
    store = KeyStore(engine, passphrase_from(settings))
    caller = TokenVerifier(store).verify(f"Bearer {token}", "http://fhir.example.no/fhir")
    assert caller.client_id == "local-operator"
    assert caller.scopes == {"patient/*.rs"} and caller.patient == "p-1"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "local-operator" and claims["exp"] - claims["iat"] == 120
    assert claims["iss"] == "http://fhir.example.no/auth"

    practitioner = cli.mint_token(settings, "user/*.rs", practitioner="dr-1")
    caller = TokenVerifier(store).verify(f"Bearer {practitioner}", "http://fhir.example.no/fhir")
    assert caller.practitioner == "dr-1" and caller.user == "Practitioner/dr-1"


@pytest.mark.parametrize(
    ("scopes", "kwargs"),
    [
        ("", {}),
        ("patient/*.rs", {}),
        ("user/*.rs", {}),
        ("system/*.rs", {"ttl": 0}),
        ("system/*.rs", {"ttl": 10**9}),
        ("system/*.rs", {"patient": "not an id!"}),
    ],
)
def test_cli_mint_token_refuses_useless_or_unsafe_requests(
    database_url: str, scopes: str, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        cli.mint_token(_settings(database_url), scopes, **kwargs)


def test_cli_keys_rotate(engine: sa.Engine, database_url: str) -> None:
    settings = _settings(database_url)
    first = KeyStore(engine, passphrase_from(settings)).ensure()
    new = cli.keys_rotate(settings)
    assert new != first
    keys = {k.kid: k for k in cli.keys_list(settings)}
    assert keys[new].retire_after is None and keys[first].retire_after is not None


def test_cli_argparse_wiring(
    engine: sa.Engine, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="fhir-norse")
    subparsers = parser.add_subparsers(dest="command", required=True)
    cli.register_commands(subparsers)
    settings = _settings(database_url)
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [ec_jwk("lab-1")]}))

    def run(*argv: str) -> tuple[int, str]:
        args = parser.parse_args(argv)
        assert args.command in cli.COMMANDS
        code = cli.run_command(args, settings)
        return code, capsys.readouterr().out

    code, out = run("clients", "add", "--name", "Lab", "--jwks", str(jwks_file), "--scope", "system/*.rs")
    client_id = out.strip()
    assert code == 0 and client_id
    code, out = run("clients", "list")
    assert code == 0 and client_id in out and "active" in out
    assert run("clients", "revoke", client_id)[0] == 0
    assert "revoked" in run("clients", "list")[1]
    assert run("clients", "revoke", "nobody")[0] == 1
    code, out = run("token", "--scope", "system/Observation.rs", "--ttl", "60")
    assert code == 0 and out.count(".") == 2
    assert run("token", "--scope", "patient/*.rs")[0] == 1
    code, out = run("keys", "rotate")
    assert code == 0 and out.startswith("new signing key ")
    code, out = run("keys", "list")
    assert code == 0 and "signing" in out
    args = parser.parse_args(
        ["clients", "add", "--name", "x", "--jwks", str(tmp_path / "missing.json"), "--scope", "s"]
    )
    assert cli.run_command(args, settings) == 1
