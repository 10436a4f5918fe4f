"""The issue's Done-when, in headless Chromium: the official SMART JavaScript client (``fhirclient`` on npm)
in a small app page completes a standalone patient launch and an EHR launch against this server, as a
public app (no secret) and as a confidential-asymmetric one (``private_key_jwt``), with the local OpenID
Connect provider standing in for ID-porten and HelseID, and reads the patient's Observations. A
clinician's standalone launch goes through the patient picker. On SQLite and PostgreSQL; axe-core checks
every page of ours, and each is kept as a screenshot under var/test-artifacts/web/."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.smart.site import SCORES, Clinic, Provider, running_clinic
from tests.support.smart_app import serve_smart_app
from tests.web.browser import VIEWPORT, Pages, chromium, needs_chromium

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def app_origin() -> Iterator[str]:
    with serve_smart_app() as origin:
        yield origin


@pytest.fixture
def live_clinic(database_url: str, provider: Provider, app_origin: str) -> Iterator[Clinic]:
    with running_clinic(database_url, provider, app_origin) as running:
        yield running


def _launch(page: Any, clinic: Clinic, app: str, scope: str, launch: str | None = None) -> None:
    query = {"iss": clinic.base, "client_id": clinic.apps[app], "scope": scope}
    if launch:
        query["launch"] = launch
    if app in clinic.app_keys:
        query["jwk"] = json.dumps(clinic.app_keys[app])
    page.goto(f"{clinic.app_origin}/launch.html?{urlencode(query)}")


def _log_in(page: Any, clinic: Clinic, login: str) -> None:
    page.wait_for_url(f"{clinic.provider.oidc.issuer}/interaction/**")
    page.fill("input[name=login]", login)
    page.click("button[type=submit]")


def _allow(page: Any, pages: Pages, name: str) -> None:
    page.wait_for_url("**/auth/consent")
    pages.keep(page, name)
    page.click('button[name="decision"][value="allow"]')


def _app_result(page: Any, clinic: Clinic) -> dict[str, str]:
    page.wait_for_url(f"{clinic.app_origin}/index.html**")
    page.wait_for_function("document.getElementById('status').textContent !== 'waiting'", timeout=15_000)
    fields = ("status", "error", "patient", "patientName", "fhirUser", "encounter", "observations")
    return {f: page.text_content(f"#{f}") or "" for f in fields}


@pytest.mark.parametrize("app", ["public", "confidential"])
def test_fhirclient_completes_a_standalone_patient_launch_and_an_ehr_launch(
    live_clinic: Clinic, database_url: str, app: str
) -> None:
    clinic = live_clinic
    lane = "postgres" if database_url.startswith("postgresql") else "sqlite"
    pages = Pages(f"{lane}-smart-{app}")
    with chromium() as browser:
        # A patient opens the app on their phone and signs in with ID-porten.
        phone = browser.new_context(viewport=VIEWPORT)
        page = phone.new_page()
        _launch(page, clinic, app, "launch/patient openid fhirUser patient/*.rs offline_access")
        _log_in(page, clinic, "sonja")
        _allow(page, pages, "patient consent")
        result = _app_result(page, clinic)
        assert result["status"] == "done", result["error"]
        assert result["patient"] == clinic.sonja and result["patientName"] == "Sonja Testesen"
        assert result["fhirUser"] == f"Patient/{clinic.sonja}" or result["fhirUser"].endswith(
            f"/Patient/{clinic.sonja}"
        )
        assert result["observations"] == str(SCORES)
        phone.close()

        # The EHR opens the app for the patient on screen; the clinician signs in with HelseID.
        desk = browser.new_context(viewport={"width": 1280, "height": 800})
        page = desk.new_page()
        handle = clinic.launch(patient=clinic.sonja, practitioner=clinic.dr_berg, encounter=clinic.encounter)
        _launch(page, clinic, app, "launch openid fhirUser patient/*.rs user/Patient.rs", handle)
        _log_in(page, clinic, "dr-berg")
        _allow(page, pages, "clinician consent")
        result = _app_result(page, clinic)
        assert result["status"] == "done", result["error"]
        assert result["patient"] == clinic.sonja and result["encounter"] == clinic.encounter
        assert result["fhirUser"].endswith(f"Practitioner/{clinic.dr_berg}")
        assert result["observations"] == str(SCORES)
        desk.close()
    assert not pages.violations, pages.violations


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_clinician_picks_one_of_their_patients_in_a_standalone_launch(live_clinic: Clinic) -> None:
    clinic = live_clinic
    pages = Pages("sqlite-smart-picker")
    with chromium() as browser:
        page = browser.new_context(viewport=VIEWPORT).new_page()
        _launch(page, clinic, "public", "launch/patient openid fhirUser patient/*.rs user/*.rs")
        _log_in(page, clinic, "dr-berg")
        page.wait_for_url("**/auth/pick**")
        pages.keep(page, "picker")
        assert "Harald" not in (page.text_content("main") or "")
        page.get_by_label("Sonja Testesen", exact=False).check()
        page.click("main form[method=post] button[type=submit]")
        _allow(page, pages, "clinician consent after the picker")
        result = _app_result(page, clinic)
        assert result["status"] == "done", result["error"]
        assert result["patient"] == clinic.sonja and result["observations"] == str(SCORES)
    assert not pages.violations, pages.violations
