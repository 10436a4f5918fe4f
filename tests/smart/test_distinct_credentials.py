"""The patient web form's link session and the SMART credentials are distinct: neither opens what the
other one opens (an access token is no form session, a link or its session is no access token, and the
sign-in cookies of /auth are neither)."""

from __future__ import annotations

import httpx
import pytest

from tests.intake_support import publish_questionnaires
from tests.smart.flow import Ask, consent_and_code, exchange, follow, sign_in
from tests.smart.site import Clinic
from tests.web.support import PHQ9, Clock, site_of


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_link_sessions_and_tokens_cannot_stand_in_for_each_other(clinic: Clinic) -> None:
    publish_questionnaires(clinic.service)
    form = site_of(clinic.app, Clock())
    link = form.link(form.task(clinic.sonja, PHQ9), clinic.sonja)

    with httpx.Client(follow_redirects=False, timeout=10) as browser:
        opened = browser.get(f"{clinic.root}/p/{link}")
        assert opened.status_code == 303
        form_secret = browser.cookies["fhir_norse_form"]
        # The link session opens the form (the control) ...
        assert browser.get(f"{clinic.root}/form", follow_redirects=True).status_code == 200

        ask = Ask(clinic, scope="patient/*.rs openid fhirUser")
        consent = follow(browser, clinic, sign_in(browser, ask, "sonja"))
        token = exchange(browser, ask, consent_and_code(browser, ask, consent)).json()["access_token"]
        signin_secret = browser.cookies["fhir_norse_signin"]

    patient_url = f"{clinic.base}/Patient/{clinic.sonja}"
    # ... and the access token opens the FHIR API (the control).
    assert httpx.get(patient_url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    for credential in (form_secret, link, signin_secret):
        refused = httpx.get(patient_url, headers={"Authorization": f"Bearer {credential}"})
        assert refused.status_code == 401, credential[:8]

    # An access token in the form's cookie is no session; nor is the sign-in cookie.
    for credential in (token, signin_secret):
        with httpx.Client(cookies={"fhir_norse_form": credential}, timeout=10) as stranger:
            answer = stranger.get(f"{clinic.root}/form", follow_redirects=True)
        assert answer.status_code >= 400 and "csrf" not in answer.text
    # And neither an access token nor the form's session is a sign-in session at /auth.
    for credential in (token, form_secret):
        with httpx.Client(cookies={"fhir_norse_signin": credential}, timeout=10) as stranger:
            again = stranger.get(Ask(clinic, scope="patient/*.rs").url())
        assert again.status_code == 303 and again.headers["location"].startswith(clinic.provider.oidc.issuer)
