"""HTTP: the token endpoint, SMART discovery, our JWK Set, and bearer tokens on a FHIR route
(https://hl7.org/fhir/smart-app-launch/backend-services.html, RFC 6749, RFC 6750)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import Depends, FastAPI, Request, Response
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from fhir_norse.api.auth_routes import CAPABILITIES
from fhir_norse.api.auth_setup import install_auth
from fhir_norse.api.rendering import render_error
from fhir_norse.auth.caller import Caller
from fhir_norse.auth.clients import Client, ClientRegistry
from fhir_norse.auth.ratelimit import RateLimiter
from fhir_norse.auth.tables import AUTH_TABLES
from fhir_norse.auth.tokens import ASSERTION_TYPE, RequestAuthenticator, TokenService
from fhir_norse.config import Settings
from fhir_norse.outcomes import FhirError
from fhir_norse.store.db import create_engine

FHIR_BASE = "http://testserver/fhir"
TOKEN_URL = "http://testserver/auth/token"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@dataclass
class Audit:
    """Stands in for app.state.audit (fhir_norse.auth.audit.AuditRecorder)."""

    grants: list[tuple[Any, ...]] = field(default_factory=list)
    token_ids: list[str | None] = field(default_factory=list)

    def record_token_grant(
        self,
        client_id: str | None,
        outcome: str,
        reason: str | None,
        source_address: str | None,
        scopes: str | None,
        *,
        token_id: str | None = None,
    ) -> None:
        self.grants.append((client_id, outcome, reason, source_address, scopes))
        self.token_ids.append(token_id)


@dataclass
class Env:
    http: TestClient
    app: FastAPI
    audit: Audit
    client: Client
    rsa_private: rsa.RSAPrivateKey
    ec_private: ec.EllipticCurvePrivateKey

    def assertion(self, *, alg: str = "RS384", **claims: Any) -> str:
        cid = self.client.client_id
        body: dict[str, Any] = {
            "iss": cid,
            "sub": cid,
            "aud": TOKEN_URL,
            "exp": int(time.time()) + 120,
            "jti": uuid.uuid4().hex,
        }
        body.update(claims)
        key: Any = self.rsa_private if alg == "RS384" else self.ec_private
        return jwt.encode(body, key, algorithm=alg, headers={"kid": "rsa-1" if alg == "RS384" else "ec-1"})

    def token_request(self, scope: str = "system/Observation.rs", **fields: str) -> Any:
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(),
            "scope": scope,
        }
        form.update(fields)
        return self.http.post("/auth/token", data=form)

    def access_token(self, scope: str = "system/Observation.rs") -> str:
        response = self.token_request(scope)
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token


async def authenticated_caller(request: Request) -> Caller:
    """What fhir_norse.api.deps.get_caller does with the authenticator."""
    authenticator: RequestAuthenticator = request.app.state.authenticator
    address = request.client.host if request.client else None
    return authenticator.authenticate(request.headers.get("authorization"), address, FHIR_BASE)


def _protected_app(settings: Settings) -> FastAPI:
    """A stand-in FHIR route behind the authenticator, as fhir_norse.api.deps.get_caller will use it."""
    app = FastAPI()
    app.state.settings = settings

    @app.exception_handler(FhirError)
    async def fhir_error(_request: Request, error: FhirError) -> Response:
        return render_error(error)

    # Registered before install_auth, like the FHIR router: the auth routes must still win.
    @app.get("/fhir/{res_type}/{res_id}")
    async def read(
        res_type: str, res_id: str, who: Annotated[Caller, Depends(authenticated_caller)]
    ) -> dict[str, Any]:
        return {"resourceType": res_type, "id": res_id, "client": who.client_id, "scopes": sorted(who.scopes)}

    return app


@pytest.fixture
def env(settings: Settings) -> Iterator[Env]:
    engine = create_engine(settings.database_url)
    with engine.begin() as conn:
        for table in reversed(AUTH_TABLES):
            conn.execute(sa.delete(table))
    app = _protected_app(settings)
    install_auth(app, settings, engine)
    audit = Audit()
    app.state.audit = audit
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_private = ec.generate_private_key(ec.SECP384R1())
    rsa_jwk: dict[str, Any] = RSAAlgorithm.to_jwk(rsa_private.public_key(), as_dict=True)
    ec_jwk: dict[str, Any] = ECAlgorithm.to_jwk(ec_private.public_key(), as_dict=True)
    client = ClientRegistry(engine).add(
        "EHR",
        {"keys": [{**rsa_jwk, "kid": "rsa-1"}, {**ec_jwk, "kid": "ec-1"}]},
        "system/Observation.rs system/Patient.rs",
    )
    with TestClient(app) as http:
        yield Env(http, app, audit, client, rsa_private, ec_private)
    engine.dispose()


def test_install_auth_sets_the_documented_state(env: Env) -> None:
    state = env.app.state
    for name in (
        "key_store",
        "clients",
        "token_service",
        "token_verifier",
        "authenticator",
        "token_rate_limiter",
        "auth_failure_limiter",
        "settings",
    ):
        assert getattr(state, name, None) is not None, name
    assert isinstance(state.token_service, TokenService)


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_token_grant_and_a_fhir_request_with_it(env: Env, alg: str) -> None:
    response = env.token_request(client_assertion=env.assertion(alg=alg))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "bearer" and body["scope"] == "system/Observation.rs"

    read = env.http.get("/fhir/Observation/1", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert read.status_code == 200
    assert read.json()["client"] == env.client.client_id
    assert read.json()["scopes"] == ["system/Observation.rs"]

    (grant,) = env.audit.grants
    assert grant == (env.client.client_id, "success", None, "testclient", "system/Observation.rs")
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert env.audit.token_ids == [claims["jti"]]


def test_refusals_are_oauth_json_and_audited_without_secrets(env: Env) -> None:
    assertion = env.assertion(aud="http://evil.example/token")
    response = env.token_request(client_assertion=assertion)
    assert response.status_code == 401
    assert response.headers["cache-control"] == "no-store"
    assert response.json()["error"] == "invalid_client"
    assert set(response.json()) == {"error", "error_description"}

    escalation = env.token_request(scope="system/*.cruds")
    assert escalation.status_code == 400 and escalation.json()["error"] == "invalid_scope"

    unsupported = env.token_request(grant_type="password")
    assert unsupported.status_code == 400 and unsupported.json()["error"] == "unsupported_grant_type"

    outcomes = [(g[0], g[1]) for g in env.audit.grants]
    assert outcomes == [(env.client.client_id, "refused")] * 3
    for grant in env.audit.grants:
        assert assertion not in " ".join(str(x) for x in grant)
    assert env.audit.grants[1][4] == "system/*.cruds"


def test_token_request_must_be_form_encoded_once(env: Env) -> None:
    as_json = env.http.post("/auth/token", json={"grant_type": "client_credentials"})
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"
    twice = env.http.post(
        "/auth/token", content=b"grant_type=client_credentials&grant_type=client_credentials", headers=FORM
    )
    assert twice.status_code == 400 and "more than once" in twice.json()["error_description"]
    huge = env.http.post("/auth/token", content=b"scope=" + b"a" * 70_000, headers=FORM)
    assert huge.status_code == 400
    not_utf8 = env.http.post("/auth/token", content=b"scope=\xff\xfe", headers=FORM)
    assert not_utf8.status_code == 400
    assert env.http.get("/auth/token").status_code == 405


def test_token_endpoint_rate_limit(env: Env) -> None:
    env.app.state.token_rate_limiter = RateLimiter(3)
    statuses = [env.token_request(grant_type="nope").status_code for _ in range(3)]
    assert statuses == [400, 400, 400]
    limited = env.token_request()
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"] == "temporarily_unavailable"
    assert env.audit.grants[-1][1] == "refused"


def test_bad_tokens_get_401_with_a_challenge(env: Env) -> None:
    missing = env.http.get("/fhir/Observation/1")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="fhir-norse"'
    assert missing.json()["resourceType"] == "OperationOutcome"

    token = env.access_token()
    head, body, sig = token.split(".")
    wrong_aud: str = env.app.state.token_service.issue(
        subject=env.client.client_id,
        client_id=env.client.client_id,
        scope="system/Observation.rs",
        audience="http://other.example/fhir",
    )[0]
    expired = TokenService(
        env.app.state.key_store, env.app.state.clients, clock=lambda: time.time() - 3600
    ).issue(
        subject=env.client.client_id,
        client_id=env.client.client_id,
        scope="system/Observation.rs",
        audience=FHIR_BASE,
    )[0]
    tampered = f"{head}.{body}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"
    for bad in (tampered, wrong_aud, expired, "garbage"):
        response = env.http.get("/fhir/Observation/1", headers={"Authorization": f"Bearer {bad}"})
        assert response.status_code == 401
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="fhir-norse", error="invalid_token", error_description="')
        assert response.json()["issue"][0]["code"] in ("login", "expired")
        assert bad not in response.text


def test_revoked_clients_token_is_refused(env: Env) -> None:
    token = env.access_token()
    headers = {"Authorization": f"Bearer {token}"}
    assert env.http.get("/fhir/Observation/1", headers=headers).status_code == 200
    env.app.state.clients.revoke(env.client.client_id)
    refused = env.http.get("/fhir/Observation/1", headers=headers)
    assert refused.status_code == 401 and "revoked" in refused.headers["www-authenticate"]
    assert env.token_request().json()["error"] == "invalid_client"


def test_repeated_failed_authentication_is_throttled(env: Env) -> None:
    env.app.state.authenticator = RequestAuthenticator(env.app.state.token_verifier, RateLimiter(2))
    good = {"Authorization": f"Bearer {env.access_token()}"}
    for _ in range(2):
        assert env.http.get("/fhir/Patient/1", headers={"Authorization": "Bearer x.y.z"}).status_code == 401
    throttled = env.http.get("/fhir/Patient/1", headers={"Authorization": "Bearer x.y.w"})
    assert throttled.status_code == 429
    assert int(throttled.headers["retry-after"]) >= 1
    outcome = throttled.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "throttled"
    # Only failing attempts are throttled: a valid token from the same address is still accepted.
    assert env.http.get("/fhir/Patient/1", headers=good).status_code == 200


@pytest.mark.parametrize(
    "path", ["/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"]
)
def test_smart_configuration(env: Env, path: str) -> None:
    response = env.http.get(path)
    assert response.status_code == 200
    config = response.json()
    assert config == {
        "issuer": "http://testserver/auth",
        "jwks_uri": "http://testserver/.well-known/jwks.json",
        "authorization_endpoint": "http://testserver/auth/authorize",
        "token_endpoint": TOKEN_URL,
        "revocation_endpoint": "http://testserver/auth/revoke",
        "introspection_endpoint": "http://testserver/auth/introspect",
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": config["scopes_supported"],
        "response_types_supported": ["code"],
        "capabilities": CAPABILITIES,
    }
    assert "system/*.rs" in config["scopes_supported"] and "patient/*.rs" in config["scopes_supported"]
    assert {"openid", "fhirUser", "launch", "offline_access"} <= set(config["scopes_supported"])
    wanted = {"launch-ehr", "client-public", "sso-openid-connect", "permission-v1"}
    assert wanted <= set(config["capabilities"])
    # Every advertised endpoint answers.
    assert env.http.get("/.well-known/jwks.json").status_code == 200
    assert env.http.post("/auth/token", data={}).json()["error"] == "invalid_request"


def test_jwks_lists_public_keys_and_both_keys_during_rotation(env: Env) -> None:
    first = env.http.get("/.well-known/jwks.json")
    assert first.status_code == 200
    (key,) = first.json()["keys"]
    assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)
    old_token = env.access_token()
    assert jwt.get_unverified_header(old_token)["kid"] == key["kid"]

    new_kid = env.app.state.key_store.rotate()
    kids = [k["kid"] for k in env.http.get("/.well-known/jwks.json").json()["keys"]]
    assert set(kids) == {key["kid"], new_kid}
    new_token = env.access_token()
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    for token in (old_token, new_token):
        response = env.http.get("/fhir/Observation/1", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        # The published key verifies the token, as an outside resource server would check it.
        kid = jwt.get_unverified_header(token)["kid"]
        jwk = next(k for k in env.http.get("/.well-known/jwks.json").json()["keys"] if k["kid"] == kid)
        jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["RS256"], audience=FHIR_BASE)


def test_keys_survive_a_restart(settings: Settings, env: Env) -> None:
    kid = env.app.state.key_store.signing_key().kid
    token = env.access_token()
    engine = create_engine(settings.database_url)
    try:
        restarted = _protected_app(settings)
        install_auth(restarted, settings, engine)
        assert restarted.state.key_store.signing_key().kid == kid
        with TestClient(restarted) as http:
            response = http.get("/fhir/Observation/1", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200
    finally:
        engine.dispose()


def test_production_mode_needs_a_key_passphrase(settings: Settings) -> None:
    production = settings.model_copy(update={"mode": "production"})
    if getattr(production, "key_passphrase", None):
        pytest.skip("a key passphrase is configured")
    engine = create_engine(settings.database_url)
    try:
        with pytest.raises(RuntimeError, match="KEY_PASSPHRASE"):
            install_auth(FastAPI(), production, engine)
    finally:
        engine.dispose()
