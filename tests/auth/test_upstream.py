"""The national logins as a relying party (fhir_norse/auth/upstream.py), against a real OpenID Connect
provider (panva's oidc-provider, tests/support/oidc_provider.py) on loopback: the code flow with PKCE,
client_secret_post and private_key_jwt, the identity claim from the id_token or from userinfo.

The tampered answers (another issuer, an unknown key, a wrong audience, expired tokens...) come from a
small provider stub served through ``httpx.MockTransport``: they need id_tokens with a valid signature
that a real provider would never sign."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from pydantic import SecretStr

from fhir_norse.auth.upstream import (
    JWKS_REFETCH_SECONDS,
    LoginFailed,
    LoginProvider,
    UpstreamLogin,
    login_providers,
)
from fhir_norse.config import Settings
from tests.support.oidc_provider import LocalOidc, login_via_http, require_node, rsa_client_key

REDIRECT = "http://127.0.0.1:9/auth/login/callback"
PATIENT_SECRET = "patient-client-secret-0123456789-abcdefghijklmnop"
PID = "01017012345"
HPR = "9144889"
HPR_CLAIM = "helseid://claims/hpr/hpr_number"
ACCOUNTS: dict[str, dict[str, Any]] = {
    "kari": {"pid": PID, "name": "Kari Nordmann"},
    "ola-substantial": {"pid": "02027012345", "acr": "idporten-loa-substantial"},
    "lege": {"sub": "helseid-sub-1", HPR_CLAIM: HPR, "given_name": "Lise", "family_name": "Lege"},
}
CLIENT_KEY, CLIENT_PUBLIC_KEY = rsa_client_key()


# -- the local provider -----------------------------------------------------------------------
def _clients() -> list[dict[str, Any]]:
    return [
        {
            "client_id": "fhir-norse-patients",
            "client_secret": PATIENT_SECRET,
            "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "client_secret_post",
        },
        {
            "client_id": "fhir-norse-clinicians",
            "jwks": {"keys": [CLIENT_PUBLIC_KEY]},
            "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "private_key_jwt",
        },
    ]


@pytest.fixture(scope="module")
def oidc() -> Iterator[LocalOidc]:
    require_node()
    with LocalOidc(clients=_clients(), accounts=ACCOUNTS) as provider:
        print(f"LocalOidc started in {provider.started_in:.2f} s")
        yield provider


def _patient(issuer: str, **overrides: Any) -> LoginProvider:
    values: dict[str, Any] = {
        "role": "patient",
        "name": "ID-porten",
        "issuer": issuer,
        "client_id": "fhir-norse-patients",
        "scopes": ("openid", "profile"),
        "acr_values": ("idporten-loa-high",),
        "claim": "pid",
        "identifier_system": "urn:oid:2.16.578.1.12.4.1.4.1",
        "client_secret": PATIENT_SECRET,
    }
    return LoginProvider(**(values | overrides))


def _clinician(issuer: str) -> LoginProvider:
    return LoginProvider(
        role="clinician",
        name="HelseID",
        issuer=issuer,
        client_id="fhir-norse-clinicians",
        scopes=("openid", "profile", "helseid://scopes/identity/hpr_number"),
        acr_values=(),
        claim=HPR_CLAIM,
        identifier_system="urn:oid:2.16.578.1.12.4.1.4.4",
        client_key={**CLIENT_KEY},
    )


class Recorder:
    """A transport that passes every request on to the real provider and keeps them, with the
    token endpoint's answers."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.token_responses: list[dict[str, Any]] = []
        self._real = httpx.HTTPTransport()

    def close(self) -> None:
        self._real.close()

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = self._real.handle_request(request)
        if request.url.path == "/token":
            response.read()
            self.token_responses.append(response.json())
        return response


_OPEN: list[UpstreamLogin] = []


def _closing(login: UpstreamLogin) -> UpstreamLogin:
    """``login``, closed at the end of the module."""
    _OPEN.append(login)
    return login


@pytest.fixture(scope="module", autouse=True)
def _close_logins() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


@contextmanager
def recording() -> Iterator[tuple[Recorder, httpx.Client]]:
    recorder = Recorder()
    with closing(recorder), httpx.Client(transport=httpx.MockTransport(recorder.handle)) as http:
        yield recorder, http


def _sign_in(login: UpstreamLogin, account: str) -> tuple[dict[str, str], Any]:
    """(the callback's query parameters, the LoginStart) after signing in as ``account``."""
    start = login.start(REDIRECT)
    with httpx.Client() as browser:
        back = login_via_http(browser, start.url, account)
    location = back.headers["location"]
    assert location.startswith(REDIRECT + "?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    return query, start


def _finish(login: UpstreamLogin, query: dict[str, str], start: Any, **overrides: Any) -> Any:
    values = {
        "code": query["code"],
        "redirect_uri": REDIRECT,
        "verifier": start.verifier,
        "nonce": start.nonce,
        "iss": query.get("iss"),
    }
    return login.finish(**(values | overrides))


# -- the authorization request ----------------------------------------------------------------
def test_start_builds_a_pkce_request_with_state_nonce_and_acr(oidc: LocalOidc) -> None:
    login = _closing(UpstreamLogin(_patient(oidc.issuer)))
    start = login.start(REDIRECT, ui_locales="nb en")
    url = urlsplit(start.url)
    assert f"{url.scheme}://{url.netloc}{url.path}" == oidc.issuer + "/auth"
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    challenge = base64.urlsafe_b64encode(hashlib.sha256(start.verifier.encode()).digest()).rstrip(b"=")
    assert query == {
        "response_type": "code",
        "client_id": "fhir-norse-patients",
        "redirect_uri": REDIRECT,
        "scope": "openid profile",
        "state": start.state,
        "nonce": start.nonce,
        "code_challenge": challenge.decode(),
        "code_challenge_method": "S256",
        "acr_values": "idporten-loa-high",
        "ui_locales": "nb en",
    }
    assert 43 <= len(start.verifier) <= 128 and len(start.state) >= 43 and len(start.nonce) >= 43
    again = login.start(REDIRECT)
    assert {again.state, again.nonce, again.verifier}.isdisjoint({start.state, start.nonce, start.verifier})
    assert start.verifier not in repr(start)


# -- successful sign-ins ----------------------------------------------------------------------
def test_patient_signs_in_with_client_secret_post(oidc: LocalOidc) -> None:
    with recording() as (recorder, http):
        login = UpstreamLogin(_patient(oidc.issuer), http=http)
        query, start = _sign_in(login, "kari")
        assert query["state"] == start.state and query["iss"] == oidc.issuer
        verified = _finish(login, query, start)
    assert verified.provider == "ID-porten" and verified.role == "patient"
    assert verified.subject == "kari"
    assert verified.identifier == PID
    assert verified.identifier_system == "urn:oid:2.16.578.1.12.4.1.4.1"
    assert verified.acr == "idporten-loa-high"
    assert verified.display_name == "Kari Nordmann"
    assert verified.auth_time is not None and abs(verified.auth_time - time.time()) < 60
    assert PID not in repr(verified)
    (token_request,) = [r for r in recorder.requests if r.url.path == "/token"]
    form = parse_qs(token_request.content.decode())
    assert form["client_secret"] == [PATIENT_SECRET] and "client_assertion" not in form
    assert form["code_verifier"] == [start.verifier]
    # The claim came in the id_token: userinfo was not asked.
    assert not [r for r in recorder.requests if r.url.path == "/me"]


def test_clinician_signs_in_with_private_key_jwt(oidc: LocalOidc) -> None:
    with recording() as (recorder, http):
        login = UpstreamLogin(_clinician(oidc.issuer), http=http)
        query, start = _sign_in(login, "lege")
        verified = _finish(login, query, start)
    assert (verified.role, verified.subject, verified.identifier) == ("clinician", "helseid-sub-1", HPR)
    assert verified.identifier_system == "urn:oid:2.16.578.1.12.4.1.4.4"
    assert verified.display_name == "Lise Lege"
    (token_request,) = [r for r in recorder.requests if r.url.path == "/token"]
    form = parse_qs(token_request.content.decode())
    assert "client_secret" not in form
    assertion = jwt.decode(form["client_assertion"][0], options={"verify_signature": False})
    assert assertion["iss"] == assertion["sub"] == "fhir-norse-clinicians"
    assert assertion["aud"] == oidc.issuer and assertion["exp"] - assertion["iat"] <= 60


def test_the_claim_is_taken_from_userinfo_when_the_id_token_lacks_it() -> None:
    # OIDC Core 5.4: a provider may release scope claims at the userinfo endpoint only.
    require_node()
    with (
        LocalOidc(clients=_clients(), accounts=ACCOUNTS, id_token_claims=False) as provider,
        recording() as (recorder, http),
    ):
        login = UpstreamLogin(_clinician(provider.issuer), http=http)
        query, start = _sign_in(login, "lege")
        verified = _finish(login, query, start)
    assert verified.identifier == HPR and verified.display_name == "Lise Lege"
    id_token = jwt.decode(recorder.token_responses[0]["id_token"], options={"verify_signature": False})
    assert HPR_CLAIM not in id_token and "family_name" not in id_token
    assert [r.headers["authorization"][:7] for r in recorder.requests if r.url.path == "/me"] == ["Bearer "]


# -- refusals by the real provider ------------------------------------------------------------
def test_a_code_is_good_for_one_exchange(oidc: LocalOidc) -> None:
    login = _closing(UpstreamLogin(_patient(oidc.issuer)))
    query, start = _sign_in(login, "kari")
    assert _finish(login, query, start).identifier == PID
    with pytest.raises(LoginFailed) as refused:
        _finish(login, query, start)
    assert refused.value.error == "refused" and "invalid_grant" in refused.value.reason


def test_wrong_verifier_wrong_nonce_and_a_foreign_iss_are_refused(oidc: LocalOidc) -> None:
    login = _closing(UpstreamLogin(_patient(oidc.issuer)))
    query, start = _sign_in(login, "kari")
    with pytest.raises(LoginFailed, match="invalid_grant"):
        _finish(login, query, start, verifier="x" * 64)

    query, start = _sign_in(login, "kari")
    with pytest.raises(LoginFailed, match="nonce"):
        _finish(login, query, start, nonce="another-sign-in")

    # RFC 9207: the provider names itself in the answer; another name, or none, is refused before the
    # code is spent.
    query, start = _sign_in(login, "kari")
    for iss in ("http://127.0.0.1:1", None):
        with pytest.raises(LoginFailed, match="did not come from ID-porten"):
            _finish(login, query, start, iss=iss)
    assert _finish(login, query, start).identifier == PID


def test_a_lower_level_of_assurance_than_asked_is_refused(oidc: LocalOidc) -> None:
    login = _closing(UpstreamLogin(_patient(oidc.issuer)))
    query, start = _sign_in(login, "ola-substantial")
    with pytest.raises(LoginFailed, match="level of assurance") as refused:
        _finish(login, query, start)
    assert refused.value.error == "refused" and "02027012345" not in refused.value.reason


def test_the_login_page_refuses_an_unknown_user_name(oidc: LocalOidc) -> None:
    login = _closing(UpstreamLogin(_patient(oidc.issuer)))
    with httpx.Client() as browser, pytest.raises(AssertionError, match="Ukjent brukernavn"):
        login_via_http(browser, login.start(REDIRECT).url, "nobody")


def test_an_unreachable_provider_is_a_clear_failure() -> None:
    with httpx.Client() as http:
        login = UpstreamLogin(_patient("http://127.0.0.1:9"), http=http)
        with pytest.raises(LoginFailed, match="could not be reached") as failed:
            login.start(REDIRECT)
    assert failed.value.error == "unavailable"


def test_callback_errors() -> None:
    login = _closing(UpstreamLogin(_patient("http://127.0.0.1:9")))
    assert login.callback_error("access_denied").reason == "the sign-in at ID-porten was cancelled"
    assert login.callback_error("<script>").reason == "ID-porten refused the sign-in (unknown)"


# -- tampered answers: a provider stub ----------------------------------------------------------
STUB = "https://login.test"
STUB_KEY, STUB_PUBLIC_KEY = rsa_client_key("stub-1")
OTHER_KEY, _ = rsa_client_key("stub-2")


class Stub:
    """A provider at https://login.test whose token endpoint answers what the test sets."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.metadata: dict[str, Any] = {
            "issuer": STUB,
            "authorization_endpoint": STUB + "/authorize",
            "token_endpoint": STUB + "/token",
            "jwks_uri": STUB + "/jwks",
            "userinfo_endpoint": STUB + "/userinfo",
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
        }
        self.token: httpx.Response = httpx.Response(500)
        self.userinfo: dict[str, Any] = {}
        self.jwks_fetches = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/.well-known/openid-configuration":
            return httpx.Response(200, json=self.metadata)
        if path == "/jwks":
            self.jwks_fetches += 1
            return httpx.Response(200, json={"keys": [STUB_PUBLIC_KEY]})
        if path == "/token":
            return self.token
        if path == "/userinfo":
            return httpx.Response(200, json=self.userinfo)
        return httpx.Response(404)

    def id_token(self, key: dict[str, str] = STUB_KEY, alg: str = "RS256", **claims: Any) -> str:
        now = int(self.clock())
        payload = {
            "iss": STUB,
            "sub": "stub-subject",
            "aud": "fhir-norse-patients",
            "iat": now,
            "exp": now + 60,
            "nonce": "the-nonce",
            "acr": "idporten-loa-high",
            "pid": PID,
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        if alg == "none":
            return jwt.encode(payload, "", algorithm="none")
        signing = jwt.PyJWK(key, algorithm=alg)
        return jwt.encode(payload, signing.key, algorithm=alg, headers={"kid": key["kid"]})

    def answer(self, id_token: str, access_token: str = "stub-access-token") -> None:
        self.token = httpx.Response(
            200, json={"access_token": access_token, "token_type": "Bearer", "id_token": id_token}
        )


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stub() -> Iterator[tuple[Stub, UpstreamLogin, Clock]]:
    clock = Clock()
    provider = Stub(clock)
    with httpx.Client(transport=httpx.MockTransport(provider.handle)) as http:
        yield provider, UpstreamLogin(_patient(STUB), http=http, clock=clock), clock


def _stub_finish(login: UpstreamLogin) -> Any:
    return login.finish(code="a-code", redirect_uri=REDIRECT, verifier="v" * 43, nonce="the-nonce")


def test_the_stub_accepts_a_good_token(stub: tuple[Stub, UpstreamLogin, Clock]) -> None:
    provider, login, _ = stub
    provider.answer(provider.id_token(name=" Kari   Nordmann "))
    verified = _stub_finish(login)
    assert (verified.subject, verified.identifier, verified.display_name) == (
        "stub-subject",
        PID,
        "Kari Nordmann",
    )


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"iss": "https://elsewhere.test"}, "not issued by ID-porten"),
        ({"aud": "another-client"}, "meant for another client"),
        ({"aud": ["fhir-norse-patients", "another-client"]}, "meant for another client"),
        ({"azp": "another-client"}, "meant for another client"),
        ({"nonce": None}, "nonce"),
        ({"exp": -31}, "expired"),
        ({"iat": 10**10}, "not valid yet"),
        ({"iat": -700}, "too old"),
        ({"sub": None}, "not valid"),
        ({"acr": "idporten-loa-substantial"}, "level of assurance"),
        ({"pid": " 01017012345"}, "usable pid"),
        ({"pid": 1017012345}, "usable pid"),
        ({"pid": "1" * 65}, "usable pid"),
    ],
)
def test_tampered_id_tokens_are_refused(
    stub: tuple[Stub, UpstreamLogin, Clock], claims: dict[str, Any], reason: str
) -> None:
    provider, login, clock = stub
    # Times in the table are relative to the clock.
    for name in ("exp", "iat"):
        if name in claims and claims[name] < 10**9:
            claims[name] = int(clock.now) + claims[name]
    provider.answer(provider.id_token(**claims))
    with pytest.raises(LoginFailed, match=reason) as failed:
        _stub_finish(login)
    assert PID not in failed.value.reason


def test_an_unsigned_or_hmac_token_is_refused(stub: tuple[Stub, UpstreamLogin, Clock]) -> None:
    provider, login, _ = stub
    provider.answer(provider.id_token(alg="none"))
    with pytest.raises(LoginFailed, match="algorithm we do not accept"):
        _stub_finish(login)
    provider.answer(jwt.encode({"iss": STUB}, PATIENT_SECRET, algorithm="HS256"))
    with pytest.raises(LoginFailed, match="algorithm we do not accept"):
        _stub_finish(login)


def test_an_unknown_key_refetches_the_key_set_once_then_refuses(
    stub: tuple[Stub, UpstreamLogin, Clock],
) -> None:
    provider, login, clock = stub
    provider.answer(provider.id_token())
    _stub_finish(login)
    assert provider.jwks_fetches == 1
    provider.answer(provider.id_token(key=OTHER_KEY))
    # Just fetched: no new fetch for a forged token.
    with pytest.raises(LoginFailed, match="key it does not publish"):
        _stub_finish(login)
    assert provider.jwks_fetches == 1
    clock.now += JWKS_REFETCH_SECONDS
    provider.answer(provider.id_token(key=OTHER_KEY))
    with pytest.raises(LoginFailed, match="key it does not publish"):
        _stub_finish(login)
    assert provider.jwks_fetches == 2


def test_a_signature_by_another_key_under_a_known_kid_is_refused(
    stub: tuple[Stub, UpstreamLogin, Clock],
) -> None:
    provider, login, _ = stub
    provider.answer(provider.id_token(key={**OTHER_KEY, "kid": STUB_KEY["kid"]}))
    with pytest.raises(LoginFailed, match="invalid signature"):
        _stub_finish(login)


def test_at_hash_must_match_the_access_token(stub: tuple[Stub, UpstreamLogin, Clock]) -> None:
    provider, login, _ = stub
    digest = hashlib.sha256(b"stub-access-token").digest()[:16]
    good = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    provider.answer(provider.id_token(at_hash=good))
    assert _stub_finish(login).identifier == PID
    provider.answer(provider.id_token(at_hash=good), access_token="another-access-token")
    with pytest.raises(LoginFailed, match="does not belong to its access token"):
        _stub_finish(login)


def test_userinfo_about_someone_else_is_refused(stub: tuple[Stub, UpstreamLogin, Clock]) -> None:
    provider, login, _ = stub
    provider.answer(provider.id_token(pid=None))
    provider.userinfo = {"sub": "someone-else", "pid": PID}
    with pytest.raises(LoginFailed, match="about someone else"):
        _stub_finish(login)
    provider.userinfo = {"sub": "stub-subject"}
    with pytest.raises(LoginFailed, match="usable pid") as failed:
        _stub_finish(login)
    assert failed.value.error == "no_identity"


@pytest.mark.parametrize(
    ("answer", "reason", "error"),
    [
        (
            httpx.Response(400, json={"error": "invalid_grant"}),
            r"refused the sign-in code \(invalid_grant\)",
            "refused",
        ),
        (httpx.Response(503, text="down"), "answered HTTP 503", "unavailable"),
        (httpx.Response(200, text="<html>"), "answered HTTP 200|invalid token response", "unavailable"),
        (httpx.Response(200, json={"access_token": "a"}), "no identity token", "invalid"),
    ],
)
def test_token_endpoint_errors(
    stub: tuple[Stub, UpstreamLogin, Clock], answer: httpx.Response, reason: str, error: str
) -> None:
    provider, login, _ = stub
    provider.token = answer
    with pytest.raises(LoginFailed, match=reason) as failed:
        _stub_finish(login)
    assert failed.value.error == error


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"issuer": "https://elsewhere.test"}, "names another issuer"),
        ({"token_endpoint": "http://login.test/token"}, "no valid token_endpoint"),
        ({"code_challenge_methods_supported": ["plain"]}, "PKCE with S256"),
        ({"id_token_signing_alg_values_supported": ["HS256", "none"]}, "no algorithm we accept"),
        ({"token_endpoint_auth_methods_supported": ["private_key_jwt"]}, "client_secret_post"),
    ],
)
def test_bad_discovery_metadata_is_refused(
    stub: tuple[Stub, UpstreamLogin, Clock], change: dict[str, Any], reason: str
) -> None:
    provider, login, _ = stub
    provider.metadata |= change
    with pytest.raises(LoginFailed, match=reason):
        login.start(REDIRECT)


def test_discovery_is_cached_for_a_bounded_time(stub: tuple[Stub, UpstreamLogin, Clock]) -> None:
    provider, login, clock = stub
    login.start(REDIRECT)
    provider.metadata["authorization_endpoint"] = STUB + "/authorize-v2"
    assert urlsplit(login.start(REDIRECT).url).path == "/authorize"
    clock.now += 3601
    assert urlsplit(login.start(REDIRECT).url).path == "/authorize-v2"


# -- settings ---------------------------------------------------------------------------------
def test_login_providers_from_settings(tmp_path: Path) -> None:
    assert login_providers(Settings(mode="development")) == {}
    key_file = tmp_path / "helseid.json"
    key_file.write_text(json.dumps({"keys": [CLIENT_KEY]}), encoding="utf-8")
    providers = login_providers(
        Settings(
            mode="development",
            patient_login_issuer="https://idporten.no",
            patient_login_client_id="patients",
            patient_login_client_secret=SecretStr("s3cret"),
            clinician_login_issuer="https://helseid-sts.nhn.no",
            clinician_login_client_id="clinicians",
            clinician_login_client_key_file=key_file,
        )
    )
    patient, clinician = providers["patient"], providers["clinician"]
    assert (patient.name, patient.auth_method, patient.claim) == ("ID-porten", "client_secret_post", "pid")
    assert patient.acr_values == ("idporten-loa-high",) and patient.scopes == ("openid", "profile")
    assert (clinician.name, clinician.auth_method, clinician.claim) == (
        "HelseID",
        "private_key_jwt",
        HPR_CLAIM,
    )
    assert clinician.client_key is not None and clinician.client_key["alg"] == "RS256"
    assert "s3cret" not in repr(patient) and CLIENT_KEY["d"] not in repr(clinician)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"patient_login_issuer": "https://idporten.no"}, "must be set together"),
        ({"clinician_login_client_id": "c"}, "must be set together"),
        ({"patient_login_issuer": "http://idporten.no", "patient_login_client_id": "p"}, "https"),
        ({"patient_login_issuer": "https://idporten.no", "patient_login_client_id": "p"}, "client_secret or"),
        (
            {
                "patient_login_issuer": "https://idporten.no",
                "patient_login_client_id": "p",
                "patient_login_client_secret": SecretStr("s"),
                "patient_login_scopes": "profile",
            },
            "must include openid",
        ),
    ],
)
def test_half_configured_logins_are_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        login_providers(Settings(mode="development", **settings))


def test_a_key_file_must_hold_one_private_key(tmp_path: Path) -> None:
    key_file = tmp_path / "key.json"
    base: dict[str, Any] = {
        "clinician_login_issuer": "https://helseid-sts.nhn.no",
        "clinician_login_client_id": "c",
    }
    for content in (json.dumps(CLIENT_PUBLIC_KEY), json.dumps({"keys": [CLIENT_KEY, CLIENT_KEY]}), "{"):
        key_file.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match="clinician_login_client_key_file"):
            login_providers(Settings(mode="development", clinician_login_client_key_file=key_file, **base))
