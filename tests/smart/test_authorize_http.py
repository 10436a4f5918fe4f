"""SMART App Launch over HTTP: the browser-facing steps (authorize, the national login, picker, consent)
with the local OpenID Connect provider, the code exchange, and the refusals the issue lists for them.

The token endpoint's own refusals (wrong verifier, code reuse, expired code, refresh rotation and reuse,
scope escalation on refresh, revoked app) are in tests/api/test_smart_token_routes.py."""

from __future__ import annotations

import httpx
import jwt
import pytest

from tests.smart.flow import (
    Ask,
    consent_and_code,
    exchange,
    follow,
    offered_scopes,
    post_form,
    redirect_params,
    sign_in,
)
from tests.smart.site import SCORES, Clinic
from tests.support.oidc_provider import login_via_http

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _http() -> httpx.Client:
    return httpx.Client(follow_redirects=False, timeout=10)


def test_a_patient_signs_in_consents_and_reads_only_their_own_scores(clinic: Clinic) -> None:
    ask = Ask(clinic, scope="patient/*.rs openid fhirUser launch/patient offline_access")
    with _http() as http:
        consent = follow(http, clinic, sign_in(http, ask, "sonja"))
        assert consent.status_code == 200 and "Mitt skjema (public)" in consent.text
        assert set(offered_scopes(consent)) == {"patient/*.rs", "openid", "fhirUser", "offline_access"}
        code = consent_and_code(http, ask, consent)
        token = exchange(http, ask, code)
    assert token.status_code == 200, token.text
    body = token.json()
    assert body["patient"] == clinic.sonja
    assert body["need_patient_banner"] is True
    assert body["fhirUser"] == f"{clinic.base}/Patient/{clinic.sonja}"
    assert "refresh_token" in body and "launch/patient" in body["scope"].split()
    id_token = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert id_token["aud"] == ask.client_id and id_token["fhirUser"] == body["fhirUser"]

    auth = {"Authorization": f"Bearer {body['access_token']}"}
    own = httpx.get(f"{clinic.base}/Observation", params={"patient": clinic.sonja}, headers=auth)
    assert own.status_code == 200 and len(own.json().get("entry", [])) == SCORES
    other = httpx.get(f"{clinic.base}/Patient/{clinic.other_patient}", headers=auth)
    assert other.status_code == 404

    # Every step is an AuditEvent naming the person, the app and the patient.
    events = httpx.get(
        f"{clinic.base}/AuditEvent",
        params={"patient": f"Patient/{clinic.sonja}", "type": "110114", "_count": "50"},
        headers={"Authorization": f"Bearer {clinic.system_token()}"},
    ).json()
    steps = {
        coding["code"]
        for entry in events.get("entry", [])
        for coding in entry["resource"].get("subtype", [])
        if coding.get("system") == "urn:fhir-norse:authorization-step"
    }
    assert {"login", "consent", "authorization_code"} <= steps, steps
    agents = {
        entry["resource"]["agent"][0]["who"].get("reference")
        for entry in events["entry"]
        if entry["resource"]["agent"][0].get("who")
    }
    assert f"Patient/{clinic.sonja}" in str(events)
    assert agents


@SQLITE
@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"state": None}, "invalid_request"),
        ({"aud": "https://elsewhere.example/fhir"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "patient/*.rs made-up-scope"}, "invalid_scope"),
        ({"scope": "system/*.rs"}, "invalid_scope"),
        ({"launch": "no-such-launch"}, "invalid_request"),
    ],
)
def test_a_bad_request_goes_back_to_the_app_with_its_error(
    clinic: Clinic, override: dict[str, str | None], error: str
) -> None:
    ask = Ask(clinic)
    with _http() as http:
        answer = http.get(ask.url(**override))
    params = redirect_params(answer)
    assert answer.headers["location"].startswith(ask.redirect_uri)
    assert params["error"] == error, params
    assert params.get("state") == override.get("state", ask.state)


@SQLITE
def test_an_unknown_app_or_redirect_uri_gets_a_page_never_a_redirect(clinic: Clinic) -> None:
    ask = Ask(clinic)
    with _http() as http:
        mismatch = http.get(ask.url(redirect_uri=clinic.app_origin + "/elsewhere.html"))
        unknown = http.get(ask.url(client_id="no-such-app"))
        clinic.app.state.clients.revoke(ask.client_id)
        revoked = http.get(ask.url())
    for answer, status in ((mismatch, 400), (unknown, 400), (revoked, 403)):
        assert answer.status_code == status and "location" not in answer.headers
        assert answer.headers["content-type"].startswith("text/html")
        assert '<html lang="nb"' in answer.text


@SQLITE
@pytest.mark.parametrize("login", ["ukjent", "tvilling"])
def test_a_patient_who_matches_no_patient_or_two_gets_a_refusal_page(clinic: Clinic, login: str) -> None:
    ask = Ask(clinic)
    with _http() as http:
        answer = sign_in(http, ask, login)
    assert answer.status_code == 403 and "location" not in answer.headers
    assert "code=" not in answer.text and "<h1>" in answer.text


@SQLITE
def test_a_clinician_outside_the_care_team_gets_no_patient(clinic: Clinic) -> None:
    # EHR launch naming Sonja, opened by a clinician not in her care team.
    handle = clinic.launch(patient=clinic.sonja, practitioner=clinic.dr_annen)
    ask = Ask(clinic, scope="launch openid fhirUser patient/*.rs", launch=handle)
    with _http() as http:
        refused = sign_in(http, ask, "dr-annen")
    assert refused.status_code == 403 and "location" not in refused.headers

    # Standalone: the picker lists none of Sonja for him.
    ask = Ask(clinic, scope="launch/patient openid fhirUser patient/*.rs user/*.rs")
    with _http() as http:
        picker = follow(http, clinic, sign_in(http, ask, "dr-annen"))
    assert picker.status_code == 200 and "Sonja" not in picker.text

    # Dr Berg's picker lists Sonja (his patient) and not Harald; choosing Harald anyway is refused.
    with _http() as http:
        picker = follow(http, clinic, sign_in(http, ask, "dr-berg"))
        assert "Sonja Testesen" in picker.text and "Harald" not in picker.text
        chosen = post_form(http, clinic, picker, patient=clinic.other_patient)
    assert chosen.status_code == 403 and "location" not in chosen.headers


@SQLITE
def test_an_ehr_launch_carries_the_ehrs_patient_and_encounter(clinic: Clinic) -> None:
    handle = clinic.launch(patient=clinic.sonja, practitioner=clinic.dr_berg, encounter=clinic.encounter)
    ask = Ask(clinic, scope="launch openid fhirUser patient/*.rs user/Patient.rs", launch=handle)
    with _http() as http:
        consent = follow(http, clinic, sign_in(http, ask, "dr-berg"))
        assert "Sonja Testesen" in consent.text
        code = consent_and_code(http, ask, consent)
        body = exchange(http, ask, code).json()
        # The launch was used: opening the app with it again is refused.
        again = http.get(Ask(clinic, scope=ask.scope, launch=handle).url())
    assert body["patient"] == clinic.sonja and body["encounter"] == clinic.encounter
    assert body["need_patient_banner"] is False
    assert body["fhirUser"].endswith(f"/Practitioner/{clinic.dr_berg}")
    assert redirect_params(again)["error"] == "invalid_request"


@SQLITE
def test_the_person_may_allow_less_or_nothing(clinic: Clinic) -> None:
    ask = Ask(clinic, scope="patient/Observation.rs patient/Patient.rs openid fhirUser offline_access")
    with _http() as http:
        consent = follow(http, clinic, sign_in(http, ask, "sonja"))
        code = consent_and_code(http, ask, consent, ["patient/Observation.rs", "openid", "fhirUser"])
        body = exchange(http, ask, code).json()

        # A second request in the same browser: the sign-in session is reused (no second login), and
        # Deny sends the app access_denied.
        again = Ask(clinic, scope="patient/*.rs openid fhirUser", state="st-2")
        answer = http.get(again.url())
        assert answer.status_code == 303 and answer.headers["location"] == "/auth/consent"
        consent = follow(http, clinic, answer)
        denied = post_form(http, clinic, consent, scope=offered_scopes(consent), decision="deny")
    assert set(body["scope"].split()) == {"patient/Observation.rs", "openid", "fhirUser"}
    assert "refresh_token" not in body
    read = httpx.get(
        f"{clinic.base}/Patient/{clinic.sonja}", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert read.status_code == 403
    assert redirect_params(denied) == {
        "error": "access_denied",
        "error_description": "the person did not allow access",
        "state": "st-2",
    }


@SQLITE
def test_the_steps_are_bound_to_the_browser_and_used_once(clinic: Clinic) -> None:
    ask = Ask(clinic)
    with _http() as http:
        first = http.get(ask.url())
        back = login_via_http(http, first.headers["location"], "sonja")
        callback = back.headers["location"]
        # Another browser (without the request's cookie) cannot finish this sign-in.
        with _http() as stranger:
            assert stranger.get(callback).status_code == 400
        consent = follow(http, clinic, http.get(callback))
        assert consent.status_code == 200
        # The callback is used up.
        assert http.get(callback).status_code == 400
        # The consent form without its CSRF token is refused.
        forged = http.post(
            clinic.root + "/auth/consent",
            data={"scope": "patient/*.rs", "decision": "allow", "request_id": "x"},
        )
        assert forged.status_code == 403
        code = consent_and_code(http, ask, consent)
        # A double submit of the consent form issues no second code.
        resubmit = post_form(http, clinic, consent, scope=offered_scopes(consent), decision="allow")
        assert resubmit.status_code == 400
        assert exchange(http, ask, code).status_code == 200


@SQLITE
def test_signing_out_ends_the_session_and_its_online_access(clinic: Clinic) -> None:
    ask = Ask(clinic, scope="patient/*.rs openid fhirUser online_access")
    with _http() as http:
        consent = follow(http, clinic, sign_in(http, ask, "sonja"))
        body = exchange(http, ask, consent_and_code(http, ask, consent)).json()
        assert "refresh_token" in body
        out = http.post(clinic.root + "/auth/signout")
        assert out.status_code == 200 and "fhir_norse_signin" in out.headers.get("set-cookie", "")
        refreshed = http.post(
            clinic.root + "/auth/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": body["refresh_token"],
                "client_id": ask.client_id,
            },
        )
        # The next authorization needs a new sign-in.
        again = http.get(Ask(clinic, scope="patient/*.rs", state="st-3").url())
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant"
    assert again.headers["location"].startswith(clinic.provider.oidc.issuer)
