"""The client_credentials grant with private_key_jwt assertions, and access-token verification
(https://hl7.org/fhir/smart-app-launch/backend-services.html,
https://hl7.org/fhir/smart-app-launch/client-confidential-asymmetric.html)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from fhir_norse.auth.clients import Client, ClientRegistry
from fhir_norse.auth.keys import KeyStore
from fhir_norse.auth.ratelimit import RateLimiter, TooManyRequests
from fhir_norse.auth.tables import AUTH_TABLES
from fhir_norse.auth.tokens import (
    ASSERTION_TYPE,
    OAuthError,
    OidcProvider,
    RequestAuthenticator,
    TokenService,
    TokenVerifier,
    issuer_for,
    server_root,
    token_endpoint_for,
)
from fhir_norse.config import Settings
from fhir_norse.outcomes import Unauthorized
from fhir_norse.store.db import create_engine

FHIR_BASE = "http://testserver/fhir"
TOKEN_URL = "http://testserver/auth/token"


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """The test database with the auth tables emptied (the PostgreSQL lane shares one schema)."""
    engine = create_engine(database_url)
    with engine.begin() as conn:
        for table in reversed(AUTH_TABLES):
            conn.execute(sa.delete(table))
    yield engine
    engine.dispose()


@dataclass
class ClientKey:
    alg: str
    kid: str
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.alg == "RS384" else ECAlgorithm
        jwk: dict[str, Any] = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        jwk.update(kid=self.kid)
        return jwk


def make_key(alg: str, kid: str | None = None) -> ClientKey:
    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if alg == "RS384"
        else ec.generate_private_key(ec.SECP384R1())
    )
    return ClientKey(alg, kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}", private)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Auth:
    keys: KeyStore
    clients: ClientRegistry
    service: TokenService
    verifier: TokenVerifier
    rsa_key: ClientKey
    ec_key: ClientKey
    client: Client

    def assertion(
        self,
        key: ClientKey | None = None,
        *,
        client_id: str | None = None,
        headers: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
        **claims: Any,
    ) -> str:
        key = key or self.rsa_key
        cid = client_id or self.client.client_id
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": cid,
            "sub": cid,
            "aud": TOKEN_URL,
            "exp": now + 120,
            "jti": uuid.uuid4().hex,
        }
        body.update(claims)
        for name in drop:
            body.pop(name)
        return jwt.encode(body, key.private, algorithm=key.alg, headers={"kid": key.kid, **(headers or {})})

    def form(self, assertion: str | None = None, **extra: str) -> dict[str, str]:
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion if assertion is not None else self.assertion(),
            "scope": "system/Observation.rs",
        }
        form.update(extra)
        return {k: v for k, v in form.items() if v != "<drop>"}


@pytest.fixture
def auth(engine: sa.Engine) -> Auth:
    keys = KeyStore(engine, "test-passphrase")
    keys.ensure()
    clients = ClientRegistry(engine)
    rsa_key, ec_key = make_key("RS384"), make_key("ES384")
    client = clients.add(
        "EHR",
        {"keys": [rsa_key.public_jwk(), ec_key.public_jwk()]},
        "system/Observation.rs system/Patient.read",
    )
    return Auth(
        keys, clients, TokenService(keys, clients), TokenVerifier(keys, clients), rsa_key, ec_key, client
    )


def refused(grant: Callable[[], Any], error: str, status: int = 401) -> OAuthError:
    with pytest.raises(OAuthError) as caught:
        grant()
    assert caught.value.error == error, caught.value.description
    assert caught.value.status == status
    return caught.value


def unauthorized(verify: Callable[[], Any], *, challenge_error: bool = True) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        verify()
    challenge = caught.value.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="fhir-norse"')
    assert ('error="invalid_token"' in challenge) is challenge_error
    assert caught.value.status == 401
    return caught.value


# -- grants -------------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_successful_grant_and_the_token_verifies(auth: Auth, alg: str) -> None:
    key = auth.rsa_key if alg == "RS384" else auth.ec_key
    form = auth.form(auth.assertion(key), scope="system/Observation.rs system/Patient.rs")
    response = auth.service.grant(form, TOKEN_URL)
    assert response["token_type"] == "bearer"
    assert response["expires_in"] == 300
    assert response["scope"] == "system/Observation.rs system/Patient.rs"

    token = response["access_token"]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "kid": auth.keys.signing_key().kid, "typ": "at+jwt"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == "http://testserver/auth"
    assert claims["sub"] == claims["client_id"] == auth.client.client_id
    assert claims["aud"] == FHIR_BASE
    assert claims["exp"] - claims["iat"] == 300
    assert "patient" not in claims and "practitioner" not in claims

    caller = auth.verifier.verify(f"Bearer {token}", FHIR_BASE)
    assert caller.client_id == auth.client.client_id
    assert caller.scopes == {"system/Observation.rs", "system/Patient.rs"}
    assert caller.token_id == claims["jti"] and caller.source == "token"
    assert caller.patient is None and caller.practitioner is None
    # Cached path gives the same caller.
    assert auth.verifier.verify(f"bearer {token}", FHIR_BASE) == caller


def test_grant_details_for_the_audit(auth: Auth) -> None:
    grant = auth.service.authorize(auth.form(), TOKEN_URL, FHIR_BASE)
    assert grant.client_id == auth.client.client_id and grant.scope == "system/Observation.rs"
    assert (
        jwt.decode(grant.response["access_token"], options={"verify_signature": False})["jti"]
        == grant.token_id
    )


def test_tampered_signature(auth: Auth) -> None:
    head, body, sig = auth.assertion().split(".")
    tampered = f"{head}.{body}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}"
    assert (
        "signature"
        in refused(lambda: auth.service.grant(auth.form(tampered), TOKEN_URL), "invalid_client").description
    )
    # A changed payload with the original signature.
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["exp"] += 60
    forged = f"{head}.{b64(json.dumps(claims).encode())}.{sig}"
    refused(lambda: auth.service.grant(auth.form(forged), TOKEN_URL), "invalid_client")


def test_wrong_audience(auth: Auth) -> None:
    assertion = auth.assertion(aud="http://evil.example/auth/token")
    error = refused(lambda: auth.service.grant(auth.form(assertion), TOKEN_URL), "invalid_client")
    assert TOKEN_URL in error.description
    fhir_aud = auth.assertion(aud=FHIR_BASE)
    refused(lambda: auth.service.grant(auth.form(fhir_aud), TOKEN_URL), "invalid_client")


def test_expired_assertion(auth: Auth) -> None:
    assertion = auth.assertion(exp=int(time.time()) - 60)
    assert (
        "expired"
        in refused(lambda: auth.service.grant(auth.form(assertion), TOKEN_URL), "invalid_client").description
    )


def test_exp_more_than_five_minutes_ahead(auth: Auth) -> None:
    assertion = auth.assertion(exp=int(time.time()) + 600)
    assert (
        "5 minutes"
        in refused(lambda: auth.service.grant(auth.form(assertion), TOKEN_URL), "invalid_client").description
    )
    # Just under five minutes is fine.
    auth.service.grant(auth.form(auth.assertion(exp=int(time.time()) + 295)), TOKEN_URL)


def test_replayed_jti(auth: Auth) -> None:
    form = auth.form()
    auth.service.grant(form, TOKEN_URL)
    assert "jti" in refused(lambda: auth.service.grant(form, TOKEN_URL), "invalid_client").description
    # Same jti in a freshly signed assertion: still a replay.
    jti = jwt.decode(form["client_assertion"], options={"verify_signature": False})["jti"]
    again = auth.assertion(auth.ec_key, jti=jti)
    refused(lambda: auth.service.grant(auth.form(again), TOKEN_URL), "invalid_client")


def test_unknown_client(auth: Auth) -> None:
    assertion = auth.assertion(client_id="nobody")
    error = refused(lambda: auth.service.grant(auth.form(assertion), TOKEN_URL), "invalid_client")
    assert error.client_id == "nobody"


def test_revoked_client(auth: Auth) -> None:
    auth.clients.revoke(auth.client.client_id)
    assert (
        "revoked" in refused(lambda: auth.service.grant(auth.form(), TOKEN_URL), "invalid_client").description
    )


def test_scope_escalation(auth: Auth) -> None:
    for scope in ("system/Observation.cruds", "system/*.rs", "system/Task.rs", "patient/Observation.rs"):
        error = refused(partial(auth.service.grant, auth.form(scope=scope), TOKEN_URL), "invalid_scope", 400)
        assert scope in error.description
    # Narrower scopes within the allowed ones are granted.
    response = auth.service.grant(auth.form(scope="system/Observation.r system/Patient.rs"), TOKEN_URL)
    assert response["scope"] == "system/Observation.r system/Patient.rs"


def test_alg_none(auth: Auth) -> None:
    cid = auth.client.client_id
    body = {"iss": cid, "sub": cid, "aud": TOKEN_URL, "exp": int(time.time()) + 60, "jti": uuid.uuid4().hex}
    header = {"alg": "none", "typ": "JWT", "kid": auth.rsa_key.kid}
    unsigned = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}."
    assert (
        "RS384"
        in refused(lambda: auth.service.grant(auth.form(unsigned), TOKEN_URL), "invalid_client").description
    )


def test_hs256_signed_with_the_public_key_as_secret(auth: Auth) -> None:
    """Algorithm confusion: the registered public key (PEM or JWK text) used as an HMAC secret."""
    cid = auth.client.client_id
    public_pem = auth.rsa_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = {"iss": cid, "sub": cid, "aud": TOKEN_URL, "exp": int(time.time()) + 60, "jti": uuid.uuid4().hex}
    for secret in (public_pem, json.dumps(auth.rsa_key.public_jwk()).encode()):
        header = {"alg": "HS256", "typ": "JWT", "kid": auth.rsa_key.kid}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{b64(signature)}"
        refused(partial(auth.service.grant, auth.form(token), TOKEN_URL), "invalid_client")


def test_other_asymmetric_algorithms_are_refused(auth: Auth) -> None:
    for alg in ("RS256", "PS384", "RS512"):
        assertion = jwt.encode(
            {
                "iss": auth.client.client_id,
                "sub": auth.client.client_id,
                "aud": TOKEN_URL,
                "exp": int(time.time()) + 60,
                "jti": uuid.uuid4().hex,
            },
            auth.rsa_key.private,
            algorithm=alg,
            headers={"kid": auth.rsa_key.kid},
        )
        refused(partial(auth.service.grant, auth.form(assertion), TOKEN_URL), "invalid_client")


def test_wrong_key_type_for_alg(auth: Auth) -> None:
    """An ES384 assertion naming the client's RSA key (and the reverse) is refused before verifying."""
    ec_with_rsa_kid = auth.assertion(ClientKey("ES384", auth.rsa_key.kid, auth.ec_key.private))
    assert (
        "does not fit"
        in refused(
            lambda: auth.service.grant(auth.form(ec_with_rsa_kid), TOKEN_URL), "invalid_client"
        ).description
    )
    rsa_with_ec_kid = auth.assertion(ClientKey("RS384", auth.ec_key.kid, auth.rsa_key.private))
    refused(lambda: auth.service.grant(auth.form(rsa_with_ec_kid), TOKEN_URL), "invalid_client")


def test_signed_by_an_unregistered_key(auth: Auth) -> None:
    stranger = make_key("RS384", kid=auth.rsa_key.kid)
    refused(lambda: auth.service.grant(auth.form(auth.assertion(stranger)), TOKEN_URL), "invalid_client")
    unknown_kid = make_key("RS384", kid="not-registered")
    error = refused(
        lambda: auth.service.grant(auth.form(auth.assertion(unknown_kid)), TOKEN_URL), "invalid_client"
    )
    assert "kid" in error.description


@pytest.mark.parametrize("claim", ["jti", "exp", "aud"])
def test_missing_claims(auth: Auth, claim: str) -> None:
    assertion = auth.assertion(drop=(claim,))
    refused(lambda: auth.service.grant(auth.form(assertion), TOKEN_URL), "invalid_client")


def test_missing_kid_and_iss_sub_mismatch(auth: Auth) -> None:
    cid = auth.client.client_id
    body = {"iss": cid, "sub": cid, "aud": TOKEN_URL, "exp": int(time.time()) + 60, "jti": uuid.uuid4().hex}
    no_kid = jwt.encode(body, auth.rsa_key.private, algorithm="RS384")
    assert (
        "kid"
        in refused(lambda: auth.service.grant(auth.form(no_kid), TOKEN_URL), "invalid_client").description
    )
    mismatch = auth.assertion(sub="someone-else")
    refused(lambda: auth.service.grant(auth.form(mismatch), TOKEN_URL), "invalid_client")
    other_client_id = auth.form(client_id="someone-else")
    refused(lambda: auth.service.grant(other_client_id, TOKEN_URL), "invalid_client")


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"grant_type": "authorization_code"}, "unsupported_grant_type"),
        ({"grant_type": "<drop>"}, "invalid_request"),
        ({"client_assertion_type": "urn:other"}, "invalid_request"),
        ({"client_assertion_type": "<drop>"}, "invalid_request"),
        ({"client_assertion": ""}, "invalid_request"),
        ({"scope": "<drop>"}, "invalid_request"),
        ({"scope": "system/Observation.rs \x01"}, "invalid_scope"),
    ],
)
def test_malformed_requests(auth: Auth, extra: dict[str, str], error: str) -> None:
    refused(lambda: auth.service.grant(auth.form(**extra), TOKEN_URL), error, 400)


def test_garbage_assertion(auth: Auth) -> None:
    refused(lambda: auth.service.grant(auth.form("not.a.jwt"), TOKEN_URL), "invalid_client")
    refused(lambda: auth.service.grant(auth.form("x" * 20_000), TOKEN_URL), "invalid_client")


def test_client_rate_limit_after_authentication(auth: Auth) -> None:
    auth.service.client_limiter = RateLimiter(2)
    auth.service.grant(auth.form(), TOKEN_URL)
    auth.service.grant(auth.form(), TOKEN_URL)
    error = refused(lambda: auth.service.grant(auth.form(), TOKEN_URL), "temporarily_unavailable", 429)
    assert int(error.headers["Retry-After"]) >= 1


# -- access token verification ------------------------------------------------------------------
def _token(auth: Auth, service: TokenService | None = None, **kwargs: Any) -> str:
    params: dict[str, Any] = {
        "subject": auth.client.client_id,
        "client_id": auth.client.client_id,
        "scope": "system/Observation.rs",
        "audience": FHIR_BASE,
    }
    params.update(kwargs)
    return (service or auth.service).issue(**params)[0]


def test_missing_or_malformed_authorization(auth: Auth) -> None:
    error = unauthorized(lambda: auth.verifier.verify(None, FHIR_BASE), challenge_error=False)
    assert error.headers["WWW-Authenticate"] == 'Bearer realm="fhir-norse"'
    unauthorized(lambda: auth.verifier.verify("", FHIR_BASE), challenge_error=False)
    token = _token(auth)
    for header in (f"Basic {token}", "Bearer", "Bearer not-a-jwt", "Bearer a.b.c", f"Token {token}"):
        unauthorized(partial(auth.verifier.verify, header, FHIR_BASE))


def test_expired_access_token(auth: Auth) -> None:
    past = TokenService(auth.keys, auth.clients, clock=lambda: time.time() - 3600)
    error = unauthorized(lambda: auth.verifier.verify(f"Bearer {_token(auth, past)}", FHIR_BASE))
    assert error.issues[0].code == "expired"
    assert "expired" in error.headers["WWW-Authenticate"]


def test_a_remembered_token_still_expires(auth: Auth) -> None:
    now = [time.time()]
    verifier = TokenVerifier(auth.keys, auth.clients, clock=lambda: now[0])
    token = _token(auth, ttl=60)
    verifier.verify(f"Bearer {token}", FHIR_BASE)
    now[0] += 120
    unauthorized(lambda: verifier.verify(f"Bearer {token}", FHIR_BASE))


def test_tampered_access_token(auth: Auth) -> None:
    head, body, sig = _token(auth).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["scope"] = "system/*.cruds"
    forged = f"{head}.{b64(json.dumps(claims).encode())}.{sig}"
    unauthorized(lambda: auth.verifier.verify(f"Bearer {forged}", FHIR_BASE))
    flipped = f"{head}.{body}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"
    unauthorized(lambda: auth.verifier.verify(f"Bearer {flipped}", FHIR_BASE))


def test_wrong_audience_and_issuer(auth: Auth) -> None:
    token = _token(auth)
    unauthorized(lambda: auth.verifier.verify(f"Bearer {token}", "http://other.example/fhir"))
    foreign = TokenService(auth.keys, auth.clients, issuer="https://someone-else.example/auth")
    unauthorized(lambda: auth.verifier.verify(f"Bearer {_token(auth, foreign)}", FHIR_BASE))


def test_token_signed_by_an_unknown_key_or_another_alg(auth: Auth) -> None:
    claims = jwt.decode(_token(auth), options={"verify_signature": False})
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": "unknown", "typ": "at+jwt"})
    unauthorized(lambda: auth.verifier.verify(f"Bearer {forged}", FHIR_BASE))
    kid = auth.keys.signing_key().kid
    own_key_rs384 = jwt.encode(
        claims, auth.keys.signing_key().private_key, algorithm="RS384", headers={"kid": kid}
    )
    unauthorized(lambda: auth.verifier.verify(f"Bearer {own_key_rs384}", FHIR_BASE))
    public_pem = auth.keys.verification_keys()[kid].public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "at+jwt", "kid": kid}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    confused = f"{signing_input}.{b64(hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest())}"
    unauthorized(lambda: auth.verifier.verify(f"Bearer {confused}", FHIR_BASE))
    none_header = b64(json.dumps({"alg": "none", "kid": kid, "typ": "at+jwt"}).encode())
    none = f"{none_header}.{b64(json.dumps(claims).encode())}."
    unauthorized(lambda: auth.verifier.verify(f"Bearer {none}", FHIR_BASE))
    # A client assertion is not an access token (no typ at+jwt, not our key).
    unauthorized(lambda: auth.verifier.verify(f"Bearer {auth.assertion()}", FHIR_BASE))


def test_revoked_clients_tokens_are_refused(auth: Auth) -> None:
    token = auth.service.grant(auth.form(), TOKEN_URL)["access_token"]
    auth.verifier.verify(f"Bearer {token}", FHIR_BASE)
    auth.clients.revoke(auth.client.client_id)
    error = unauthorized(lambda: auth.verifier.verify(f"Bearer {token}", FHIR_BASE))
    assert "revoked" in error.message
    # A verifier in another process learns it at its next refresh of the revoked set.
    other = TokenVerifier(auth.keys, ClientRegistry(auth.clients.engine, refresh_seconds=0))
    unauthorized(lambda: other.verify(f"Bearer {token}", FHIR_BASE))


def test_rotation_keeps_old_tokens_valid_and_signs_new_ones_with_the_new_key(auth: Auth) -> None:
    old_kid = auth.keys.signing_key().kid
    old_token = auth.service.grant(auth.form(), TOKEN_URL)["access_token"]
    new_kid = auth.keys.rotate()
    new_token = auth.service.grant(auth.form(), TOKEN_URL)["access_token"]
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid != old_kid
    assert jwt.get_unverified_header(old_token)["kid"] == old_kid
    fresh = TokenVerifier(auth.keys, auth.clients)
    for token in (old_token, new_token):
        assert fresh.verify(f"Bearer {token}", FHIR_BASE).client_id == auth.client.client_id
    assert {k["kid"] for k in auth.keys.public_jwks()["keys"]} == {old_kid, new_kid}
    # Another server process (its own KeyStore on the same database) verifies both too.
    other = TokenVerifier(KeyStore(auth.keys.engine, "test-passphrase"), auth.clients)
    for token in (old_token, new_token):
        other.verify(f"Bearer {token}", FHIR_BASE)


def test_retiring_a_key_now_refuses_even_remembered_tokens(auth: Auth) -> None:
    token = _token(auth)
    auth.verifier.verify(f"Bearer {token}", FHIR_BASE)
    auth.keys.rotate(retire_now=True)
    unauthorized(lambda: auth.verifier.verify(f"Bearer {token}", FHIR_BASE))


def test_minted_context_claims(auth: Auth) -> None:
    token = _token(
        auth, subject="local-operator", client_id="local-operator", patient="p1", practitioner="dr1"
    )
    caller = auth.verifier.verify(f"Bearer {token}", FHIR_BASE)
    assert (caller.client_id, caller.patient, caller.practitioner, caller.user) == (
        "local-operator",
        "p1",
        "dr1",
        "Practitioner/dr1",
    )


def test_failed_authentication_limit(auth: Auth) -> None:
    authenticator = RequestAuthenticator(auth.verifier, RateLimiter(2))
    good = f"Bearer {_token(auth)}"
    assert authenticator.authenticate(good, "10.0.0.1", FHIR_BASE).client_id == auth.client.client_id
    for _ in range(3):  # a missing token is not a failed attempt
        with pytest.raises(Unauthorized):
            authenticator.authenticate(None, "10.0.0.1", FHIR_BASE)
    for _ in range(2):
        with pytest.raises(Unauthorized):
            authenticator.authenticate("Bearer bad.bad.bad", "10.0.0.1", FHIR_BASE)
    with pytest.raises(TooManyRequests) as caught:
        authenticator.authenticate("Bearer bad.bad.other", "10.0.0.1", FHIR_BASE)
    assert caught.value.status == 429 and int(caught.value.headers["Retry-After"]) >= 1
    # Failures throttle failing attempts only: a valid token is accepted from that address too.
    assert authenticator.authenticate(good, "10.0.0.1", FHIR_BASE).client_id == auth.client.client_id
    # The same bad token is throttled from any address (the limit per presented token).
    with pytest.raises(TooManyRequests):
        authenticator.authenticate("Bearer bad.bad.bad", "10.0.0.2", FHIR_BASE)
    with pytest.raises(Unauthorized):
        authenticator.authenticate("Bearer other.bad.token", "10.0.0.2", FHIR_BASE)


def test_urls() -> None:
    assert server_root("https://fhir.example.no/fhir") == "https://fhir.example.no"
    assert server_root("https://example.no/norse/fhir/") == "https://example.no/norse"
    assert server_root("https://example.no/r4") == "https://example.no"
    assert token_endpoint_for("https://example.no/norse/fhir") == "https://example.no/norse/auth/token"
    assert issuer_for("https://fhir.example.no/fhir") == "https://fhir.example.no/auth"
    assert issuer_for("https://fhir.example.no/fhir", "https://idp.example.no/") == "https://idp.example.no"


# -- an external OpenID Connect provider -------------------------------------------------------
def test_oidc_provider_tokens_map_onto_the_caller(auth: Auth, tmp_path: Path) -> None:
    idp_key = make_key("ES384", kid="idp-1")
    jwks_file = tmp_path / "idp.jwks.json"
    jwks_file.write_text(json.dumps({"keys": [idp_key.public_jwk()]}))

    oidc_settings = Settings(
        mode="development",
        oidc_issuer="https://idp.hospital.example",
        oidc_jwks_file=str(jwks_file),
        oidc_audience="fhir-norse",
    )
    provider = OidcProvider.from_settings(oidc_settings)
    assert provider is not None
    verifier = TokenVerifier(auth.keys, auth.clients, oidc=provider)
    now = int(time.time())
    claims = {
        "iss": "https://idp.hospital.example",
        "sub": "u-123",
        "aud": ["fhir-norse", "other"],
        "azp": "clinician-portal",
        "exp": now + 300,
        "iat": now,
        "jti": "idp-jti",
        "scp": ["user/Observation.rs", "user/Patient.rs"],
        "fhirUser": "https://fhir.example.no/fhir/Practitioner/dr-7",
    }
    token = jwt.encode(claims, idp_key.private, algorithm="ES384", headers={"kid": "idp-1"})
    caller = verifier.verify(f"Bearer {token}", FHIR_BASE)
    assert caller.source == "oidc" and caller.client_id == "clinician-portal"
    assert caller.scopes == {"user/Observation.rs", "user/Patient.rs"}
    assert caller.practitioner == "dr-7" and caller.token_id == "idp-jti"

    patient_token = jwt.encode(
        {**claims, "scope": "patient/*.rs", "patient": "p-9", "fhirUser": "Patient/p-9"},
        idp_key.private,
        algorithm="ES384",
        headers={"kid": "idp-1"},
    )
    caller = verifier.verify(f"Bearer {patient_token}", FHIR_BASE)
    assert caller.patient == "p-9" and caller.practitioner is None and caller.scopes == {"patient/*.rs"}

    for bad in (
        {**claims, "iss": "https://evil.example"},
        {**claims, "aud": "someone-else"},
        {**claims, "exp": now - 600},
    ):
        forged = jwt.encode(bad, idp_key.private, algorithm="ES384", headers={"kid": "idp-1"})
        unauthorized(partial(verifier.verify, f"Bearer {forged}", FHIR_BASE))
    # The same token relabelled ES256: the P-384 key does not fit, refused before verifying.
    _head, body, sig = token.split(".")
    relabelled = f"{b64(json.dumps({'alg': 'ES256', 'kid': 'idp-1'}).encode())}.{body}.{sig}"
    unauthorized(lambda: verifier.verify(f"Bearer {relabelled}", FHIR_BASE))
    assert OidcProvider.from_settings(Settings(mode="development")) is None
