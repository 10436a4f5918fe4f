"""HTTP: SMART App Launch at the token endpoint (authorization_code with PKCE, refresh_token), revocation
(RFC 7009), introspection (RFC 7662), EHR launch handles and discovery, through the whole app.

Codes are made with ``app.state.grants.issue_code`` (what the consent step does), so no browser is
needed; every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from jwt.algorithms import RSAAlgorithm

from fhir_norse.auth.grants import CodeGrant
from fhir_norse.auth.smart_tables import AUTH_SESSION
from fhir_norse.auth.tokens import ASSERTION_TYPE
from tests.tokens import bearer

BASE = "http://testserver/fhir"
TOKEN_URL = "http://testserver/auth/token"
REDIRECT = "https://app.example/callback"
APP_SCOPES = (
    "launch launch/patient launch/encounter openid fhirUser offline_access online_access"
    " patient/*.rs user/*.rs"
)


def _verifier() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


@dataclass
class Env:
    app: FastAPI
    http: TestClient
    public_id: str
    confidential_id: str
    backend_id: str
    key: rsa.RSAPrivateKey
    system: dict[str, str]

    def assertion(self, client_id: str, **claims: Any) -> str:
        body = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": int(time.time()) + 120}
        body["jti"] = uuid.uuid4().hex
        body.update(claims)
        return jwt.encode(body, self.key, algorithm="RS384", headers={"kid": "k1"})

    def auth(self, client_id: str) -> dict[str, str]:
        if client_id == self.public_id:
            return {"client_id": client_id}
        return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": self.assertion(client_id)}

    def code(
        self,
        client_id: str | None = None,
        *,
        scope: str = "launch/patient openid fhirUser offline_access patient/*.rs",
        person: str = "Patient/p1",
        patient: str | None = "p1",
        encounter: str | None = None,
        session_id: str | None = None,
        nonce: str | None = "n-0S6_WzA2Mj",
    ) -> tuple[str, str]:
        verifier, challenge = _verifier()
        code = self.app.state.grants.issue_code(
            CodeGrant(
                client_id=client_id or self.public_id,
                redirect_uri=REDIRECT,
                code_challenge=challenge,
                scope=scope,
                person=person,
                patient=patient,
                encounter=encounter,
                need_patient_banner=True,
                nonce=nonce,
                auth_time=int(time.time()) - 5,
                session_id=session_id,
            )
        )
        return code, verifier

    def exchange(
        self, code: str, verifier: str, client_id: str | None = None, /, **fields: str | None
    ) -> Any:
        form: dict[str, str | None] = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
            **self.auth(client_id or self.public_id),
        }
        form.update(fields)
        return self.http.post("/auth/token", data={k: v for k, v in form.items() if v is not None})

    def refresh(self, token: str, client_id: str | None = None, **fields: str) -> Any:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": token,
            **self.auth(client_id or self.public_id),
        }
        form.update(fields)
        return self.http.post("/auth/token", data=form)

    def tokens(self, client_id: str | None = None, **code_args: Any) -> dict[str, Any]:
        code, verifier = self.code(client_id, **code_args)
        response = self.exchange(code, verifier, client_id)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def read(self, token: str, path: str = "Patient/p1") -> int:
        status: int = self.http.get(f"/fhir/{path}", headers={"Authorization": f"Bearer {token}"}).status_code
        return status

    def audit(self, step: str) -> list[dict[str, Any]]:
        found = self.http.get(
            "/fhir/AuditEvent",
            params={"subtype": f"urn:fhir-norse:authorization-step|{step}"},
            headers=self.system,
        )
        assert found.status_code == 200, found.text
        return [e["resource"] for e in found.json().get("entry", [])]


@pytest.fixture
def env(app: FastAPI) -> Iterator[Env]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = {"keys": [{**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1"}]}
    clients = app.state.clients
    public = clients.add_app(
        "Mood diary",
        kind="public",
        redirect_uris=[REDIRECT],
        scopes=APP_SCOPES,
        launch_types=["ehr", "standalone"],
    )
    confidential = clients.add_app(
        "Clinic app",
        kind="confidential-asymmetric",
        redirect_uris=[REDIRECT],
        scopes=APP_SCOPES,
        launch_types=["ehr"],
        jwks=jwks,
    )
    backend = clients.add("EHR", jwks, "system/Patient.rs")
    system = bearer(app)
    with TestClient(app, raise_server_exceptions=False) as http:
        for body in (
            {"resourceType": "Patient", "id": "p1"},
            {"resourceType": "Practitioner", "id": "dr1"},
        ):
            put = http.put(f"/fhir/{body['resourceType']}/{body['id']}", json=body, headers=system)
            assert put.status_code in (200, 201), put.text
        yield Env(app, http, public.client_id, confidential.client_id, backend.client_id, key, system)


def test_public_app_code_flow_with_id_token_context_and_audit(env: Env) -> None:
    response = env.exchange(*env.code())
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["access-control-allow-origin"] == "*"
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] > 0
    assert body["scope"] == "launch/patient openid fhirUser offline_access patient/*.rs"
    assert body["patient"] == "p1" and body["need_patient_banner"] is True
    assert body["fhirUser"] == f"{BASE}/Patient/p1" and "encounter" not in body
    assert body["refresh_token"] and body["id_token"]

    # The id_token verifies with our published keys (OpenID Connect Core 3.1.3.7).
    config = env.http.get("/auth/.well-known/openid-configuration").json()
    jwks = env.http.get("/.well-known/jwks.json").json()
    header = jwt.get_unverified_header(body["id_token"])
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    claims = jwt.decode(
        body["id_token"],
        jwt.PyJWK(jwk).key,
        algorithms=config["id_token_signing_alg_values_supported"],
        audience=env.public_id,
        issuer=config["issuer"],
    )
    assert claims["fhirUser"] == f"{BASE}/Patient/p1" and claims["nonce"] == "n-0S6_WzA2Mj"
    assert claims["sub"] == "Patient/p1" and claims["auth_time"] <= claims["iat"]

    access = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert access["patient"] == "p1" and access["fhirUser"] == f"{BASE}/Patient/p1" and access["grant"]
    assert env.read(body["access_token"]) == 200
    assert env.read(body["access_token"], "Patient/other") in (403, 404)

    (event,) = env.audit("authorization_code")
    assert event["outcome"] == "0"
    who = [a["who"] for a in event["agent"] if "who" in a]
    assert {"reference": "Patient/p1"} in who
    assert {"identifier": {"system": "urn:fhir-norse:client", "value": env.public_id}} in who
    assert {"reference": "Patient/p1"} in [e.get("what") for e in event["entity"]]
    assert body["access_token"] not in str(event) and body["refresh_token"] not in str(event)


def test_clinician_ehr_context_in_token_and_caller(env: Env) -> None:
    body = env.tokens(
        env.confidential_id,
        scope="launch openid fhirUser user/*.rs",
        person="Practitioner/dr1",
        encounter="e1",
        nonce=None,
    )
    assert body["patient"] == "p1" and body["encounter"] == "e1"
    assert body["fhirUser"] == f"{BASE}/Practitioner/dr1" and "refresh_token" not in body
    caller = env.app.state.token_verifier.verify(f"Bearer {body['access_token']}", BASE)
    assert caller.practitioner == "dr1" and caller.patient == "p1" and caller.user == "Practitioner/dr1"
    assert "nonce" not in jwt.decode(body["id_token"], options={"verify_signature": False})


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"code_verifier": "x" * 43}, "invalid_grant"),  # wrong verifier
        ({"code_verifier": "short"}, "invalid_request"),  # not an RFC 7636 verifier
        ({"redirect_uri": "https://app.example/other"}, "invalid_grant"),
        ({"code": "not-a-code"}, "invalid_grant"),
        ({"client_id": None}, "invalid_client"),  # a public app without client_id
    ],
)
def test_code_exchange_refusals(env: Env, change: dict[str, Any], error: str) -> None:
    code, verifier = env.code()
    response = env.exchange(code, verifier, **change)
    assert response.status_code in (400, 401) and response.json()["error"] == error
    assert response.headers["access-control-allow-origin"] == "*"


def test_expired_code_another_clients_code_and_client_kinds(env: Env) -> None:
    grants = env.app.state.grants
    code, verifier = env.code()
    grants._clock = lambda: time.time() + 61  # the code lives authorization_code_seconds (60)
    assert env.exchange(code, verifier).json()["error"] == "invalid_grant"
    grants._clock = time.time

    code, verifier = env.code(env.confidential_id)
    stolen = env.exchange(code, verifier, env.public_id)
    assert stolen.status_code == 400 and "another client" in stolen.json()["error_description"]

    code, verifier = env.code(env.confidential_id)
    bad = env.exchange(code, verifier, env.confidential_id, client_assertion=env.assertion("x" * 8))
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"
    wrong_aud = env.assertion(env.confidential_id, aud="https://evil.example/token")
    assert env.exchange(code, verifier, env.confidential_id, client_assertion=wrong_aud).status_code == 401

    code, verifier = env.code(env.backend_id)
    backend = env.exchange(code, verifier, env.backend_id)
    assert backend.status_code == 400 and backend.json()["error"] == "unauthorized_client"
    # An app cannot use client_credentials either.
    creds = env.http.post(
        "/auth/token",
        data={"grant_type": "client_credentials", "scope": "patient/*.rs", **env.auth(env.confidential_id)},
    )
    assert creds.json()["error"] == "unauthorized_client"


def test_code_reuse_revokes_the_grant(env: Env) -> None:
    code, verifier = env.code()
    first = env.exchange(code, verifier)
    assert first.status_code == 200
    token = first.json()["access_token"]
    assert env.read(token) == 200
    again = env.exchange(code, verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert env.read(token) == 401
    assert env.refresh(first.json()["refresh_token"]).json()["error"] == "invalid_grant"
    refusals = env.audit("authorization_code")
    assert [e["outcome"] for e in refusals].count("4") == 1


def test_refresh_rotation_and_reuse_revokes_the_family(env: Env) -> None:
    first = env.tokens(env.confidential_id)
    second = env.refresh(first["refresh_token"], env.confidential_id)
    assert second.status_code == 200, second.text
    newest = second.json()
    assert newest["refresh_token"] != first["refresh_token"] and newest["patient"] == "p1"
    assert "nonce" not in jwt.decode(newest["id_token"], options={"verify_signature": False})
    assert env.read(newest["access_token"]) == 200

    reused = env.refresh(first["refresh_token"], env.confidential_id)
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    assert env.refresh(newest["refresh_token"], env.confidential_id).json()["error"] == "invalid_grant"
    assert env.read(newest["access_token"]) == 401
    assert env.read(first["access_token"]) == 401
    # Another client cannot refresh this app's token.
    other = env.tokens()
    assert env.refresh(other["refresh_token"], env.confidential_id).json()["error"] == "invalid_grant"


def test_refresh_scope_may_narrow_never_widen(env: Env) -> None:
    first = env.tokens()
    wider = env.refresh(first["refresh_token"], scope="patient/*.rs user/*.rs offline_access")
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    narrower = env.refresh(first["refresh_token"], scope="patient/Observation.rs")
    assert narrower.status_code == 200, narrower.text
    assert narrower.json()["scope"] == "patient/Observation.rs"
    # The new refresh token keeps the grant's scopes (RFC 6749 6).
    again = env.refresh(narrower.json()["refresh_token"])
    assert again.json()["scope"] == "launch/patient openid fhirUser offline_access patient/*.rs"


def test_online_access_refresh_ends_with_the_session(env: Env) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    with env.app.state.service.storage.engine.begin() as conn:
        conn.execute(
            sa.insert(AUTH_SESSION).values(
                id="s1",
                secret_hash="0" * 64,
                role="patient",
                provider="ID-porten",
                subject="sub-1",
                person="Patient/p1",
                auth_time=now,
                created_at=now,
                expires_at=now + timedelta(minutes=30),
            )
        )
    first = env.tokens(scope="launch/patient online_access patient/*.rs", session_id="s1")
    second = env.refresh(first["refresh_token"])
    assert second.status_code == 200, second.text
    assert env.app.state.grants.end_session("s1", "signed out") == 1
    assert env.refresh(second.json()["refresh_token"]).json()["error"] == "invalid_grant"
    assert env.read(second.json()["access_token"]) == 401


def test_revoked_app_gets_nothing(env: Env) -> None:
    body = env.tokens()
    code, verifier = env.code()
    env.app.state.clients.revoke(env.public_id)
    assert env.read(body["access_token"]) == 401
    assert env.exchange(code, verifier).json()["error"] == "invalid_client"
    assert env.refresh(body["refresh_token"]).json()["error"] == "invalid_client"


def test_revocation_endpoint(env: Env) -> None:
    by_refresh = env.tokens()
    response = env.http.post(
        "/auth/revoke", data={"token": by_refresh["refresh_token"], "client_id": env.public_id}
    )
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"
    assert env.refresh(by_refresh["refresh_token"]).json()["error"] == "invalid_grant"
    assert env.read(by_refresh["access_token"]) == 401

    by_access = env.tokens(env.confidential_id)
    form = {
        "token": by_access["access_token"],
        "token_type_hint": "access_token",
        **env.auth(env.confidential_id),
    }
    assert env.http.post("/auth/revoke", data=form).status_code == 200
    assert env.read(by_access["access_token"]) == 401

    unknown = env.http.post("/auth/revoke", data={"token": "nothing-we-know", "client_id": env.public_id})
    assert unknown.status_code == 200
    theirs = env.tokens(env.confidential_id)
    refused = env.http.post(
        "/auth/revoke", data={"token": theirs["refresh_token"], "client_id": env.public_id}
    )
    assert refused.status_code == 400 and refused.json()["error"] == "unauthorized_client"
    assert env.read(theirs["access_token"]) == 200
    assert env.http.post("/auth/revoke", data={"token": "x"}).json()["error"] == "invalid_client"
    assert len([e for e in env.audit("revoke") if e["outcome"] == "0"]) == 2


def test_introspection(env: Env) -> None:
    body = env.tokens()
    rs = bearer(env.app, "system/Patient.rs")

    def ask(token: str, headers: dict[str, str] | None = None, **extra: str) -> Any:
        return env.http.post(
            "/auth/introspect", data={"token": token, **extra}, headers=rs if headers is None else headers
        )

    access = ask(body["access_token"]).json()
    assert access["active"] is True and access["client_id"] == env.public_id and access["patient"] == "p1"
    assert access["fhirUser"] == f"{BASE}/Patient/p1" and access["scope"] == body["scope"]
    assert access["token_type"] == "Bearer" and access["exp"] > access["iat"] and access["aud"] == BASE
    refresh = ask(body["refresh_token"]).json()
    assert (
        refresh["active"] is True
        and refresh["token_type"] == "refresh_token"
        and refresh["sub"] == "Patient/p1"
    )
    assert ask("garbage").json() == {"active": False}

    # The confidential app by assertion sees its own tokens only.
    own = env.tokens(env.confidential_id)
    assert ask(own["access_token"], {}, **env.auth(env.confidential_id)).json()["active"] is True
    assert ask(body["access_token"], {}, **env.auth(env.confidential_id)).json() == {"active": False}

    grant = jwt.decode(body["access_token"], options={"verify_signature": False})["grant"]
    assert env.app.state.grants.revoke_grant(grant, "revoked by the operator")
    assert ask(body["access_token"]).json() == {"active": False}
    assert ask(body["refresh_token"]).json() == {"active": False}

    assert env.http.post("/auth/introspect", data={"token": body["access_token"]}).status_code == 401
    patient_token = bearer(env.app, "patient/*.rs", patient="p1")
    assert ask(body["access_token"], patient_token).status_code == 403
    assert any(e["outcome"] == "0" for e in env.audit("introspect"))


def test_launch_endpoint(env: Env) -> None:
    ehr = bearer(env.app, "system/Patient.rs")
    created = env.http.post(
        "/auth/launch",
        json={"patient": "Patient/p1", "practitioner": "dr1", "client_id": env.confidential_id},
        headers=ehr,
    )
    assert created.status_code == 200, created.text
    assert created.headers["cache-control"] == "no-store"
    handle, lifetime = created.json()["launch"], created.json()["expires_in"]
    assert lifetime == 300
    grants = env.app.state.grants
    assert grants.resolve_launch(handle, env.public_id) is None  # made for another app
    context = grants.resolve_launch(handle, env.confidential_id)
    assert context is not None and (context.patient, context.practitioner) == ("p1", "dr1")
    assert context.created_by == "test-operator"
    assert grants.resolve_launch(handle, env.confidential_id) is None  # single use

    form = env.http.post("/auth/launch", data={"patient": "p1"}, headers=ehr)
    assert form.status_code == 200
    unknown = env.http.post("/auth/launch", json={"patient": "nobody"}, headers=ehr)
    assert unknown.status_code == 400 and unknown.json()["error"] == "invalid_request"
    missing = env.http.post("/auth/launch", json={}, headers=ehr)
    assert missing.status_code == 400 and "patient" in missing.json()["error_description"]
    not_an_app = env.http.post(
        "/auth/launch", json={"patient": "p1", "client_id": env.backend_id}, headers=ehr
    )
    assert not_an_app.status_code == 400
    no_token = env.http.post("/auth/launch", json={"patient": "p1"})
    assert no_token.status_code == 401 and no_token.json()["error"] == "invalid_token"
    weak = env.http.post(
        "/auth/launch", json={"patient": "p1"}, headers=bearer(env.app, "system/Observation.rs")
    )
    assert weak.status_code == 403 and weak.json()["error"] == "insufficient_scope"
    (event,) = [e for e in env.audit("launch") if e["outcome"] == "0"][:1]
    assert {"reference": "Practitioner/dr1"} in [a.get("who") for a in event["agent"]]


def test_cors_preflight_and_discovery(env: Env) -> None:
    preflight = env.http.options(
        "/auth/token",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    # Answered by the app-wide CORS middleware where it is installed, else by the route itself.
    assert preflight.status_code in (200, 204)
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers

    smart = env.http.get("/fhir/.well-known/smart-configuration").json()
    oidc = env.http.get("/auth/.well-known/openid-configuration").json()
    assert oidc["issuer"] == smart["issuer"] == "http://testserver/auth"
    assert oidc["jwks_uri"] == smart["jwks_uri"] and oidc["token_endpoint"] == TOKEN_URL
    assert oidc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert {"sub", "fhirUser", "nonce"} <= set(oidc["claims_supported"])
    assert oidc["subject_types_supported"] == ["public"] and oidc["response_types_supported"] == ["code"]
    assert smart["code_challenge_methods_supported"] == ["S256"]
    assert {
        "launch-ehr",
        "launch-standalone",
        "client-public",
        "context-ehr-encounter",
        "authorize-post",
    } <= set(smart["capabilities"])
