"""The clinician's feedback report (issue 17) as a clinician meets it, in headless Chromium, on SQLite and
PostgreSQL: the demo clinic (`fhir-norse demo`), an EHR launch of the report app for Sonja and for Harald
with Kari Berg signing in at the (local) health-sector login, the page checked against the case study's
answers and the mapping (alliance percentages, preference arrows, trigger-only administrations, the
elevated range), the PDF read back with pdftotext and rendered with pdftoppm, the caseload page; a
clinician outside the care team and a patient's token get no report; opening it is audited; axe-core
on every page."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fhir_norse.api.app import create_app
from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.rom.demo.clinic import DemoResult, load_demo
from fhir_norse.rom.demo.scenarios import Report, case_study
from tests.intake_support import nf21, publish_questionnaires
from tests.smart.site import Provider, _settings
from tests.web.browser import ARTIFACTS, Pages, chromium, needs_chromium, serving

pytestmark = needs_chromium

ALLIANCE_PARTS = {"goal": (0,), "bond": (1, 2), "task": (3,), "total": (0, 1, 2, 3)}
# The alliance table's rows, in the order the report shows them (task, goal, bond, total).
ALLIANCE_ROWS = ("task", "goal", "bond", "total")
ARROWS = {"more": "\u2191", "less": "\u2193", "as-now": "\u2013"}  # up, down, en dash


def _percent(report: Report, code: str) -> int:
    parts = [report.alliance[i] for i in ALLIANCE_PARTS[code]]
    return round(sum(parts) / (7 * len(parts)) * 100)


class Demo:
    def __init__(self, app: FastAPI, root: str, provider: Provider, loaded: DemoResult) -> None:
        self.app = app
        self.root = root
        self.base = f"{root}/fhir"
        self.provider = provider
        self.loaded = loaded

    def token(self, scope: str, **context: str) -> str:
        token, _jti = self.app.state.token_service.issue(
            subject="test-ehr", client_id="test-ehr", scope=scope, audience=self.base, **context
        )
        return str(token)

    def get(self, path: str, **params: str) -> dict[str, Any]:
        answer = httpx.get(
            f"{self.base}/{path}",
            params=params,
            headers={"Authorization": f"Bearer {self.token('system/*.rs')}"},
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def launch(self, patient: str) -> str:
        kari = self.loaded.clinician("kari").practitioner_id
        answer = httpx.post(
            f"{self.root}/auth/launch",
            json={"patient": patient, "practitioner": kari},
            headers={"Authorization": f"Bearer {self.token('system/Patient.rs')}"},
        )
        assert answer.status_code in (200, 201), answer.text
        return str(answer.json()["launch"])


@pytest.fixture
def demo(database_url: str, provider: Provider) -> Iterator[Demo]:
    settings = _settings(database_url, provider, [])
    app = create_app(settings)
    with ExitStack() as stack:
        stack.callback(app.state.service.storage.engine.dispose)
        publish_questionnaires(app.state.service)
        loaded = load_demo(app.state.service, base_url=settings.fhir_base_url())
        stack.enter_context(serving(app, provider.server_port))
        yield Demo(app, f"http://127.0.0.1:{provider.server_port}", provider, loaded)


def _sign_in(page: Any, demo: Demo, login: str, pages: Pages, name: str) -> None:
    page.wait_for_url(f"{demo.provider.oidc.issuer}/interaction/**")
    page.fill("input[name=login]", login)
    page.click("button[type=submit]")
    page.wait_for_url("**/auth/consent**")
    pages.keep(page, f"{name} consent")
    page.click('button[name="decision"][value="allow"]')
    page.wait_for_load_state()


def _check_report(page: Any, story: list[Report], number: int, mapping: InstrumentMapping) -> None:
    """The page shows report ``number`` of ``story`` as the answers and the mapping say it must."""
    report = story[number - 1]
    previous = story[number - 2] if number > 1 else None
    # Alliance: each bar's percent of the maximum, now and at the previous administration.
    rows = page.locator("section.alliance table tbody tr").all()
    assert len(rows) == len(ALLIANCE_ROWS)
    for row, code in zip(rows, ALLIANCE_ROWS, strict=True):
        cells = [c.strip() for c in row.locator("td").all_text_contents()]
        assert cells[0] == f"{_percent(report, code)} %", (code, cells)
        if previous is not None:
            assert cells[1] == f"{_percent(previous, code)} %", (code, cells)
    # Preferences: each item's arrow at this administration ("?" where it was not answered then).
    arrows = page.locator("section.preferences li.pref .arrow").all_text_contents()
    assert arrows == [ARROWS.get(report.preferences.get(item, ""), "?") for item in PREFERENCE_ORDER]
    # Trajectories: which administrations are trigger-only, and the shaded range from the mapping.
    for code in report.scales:
        asked_in_full = [k + 1 for k, r in enumerate(story[:number]) if len(r.scales.get(code, (0,))) > 1]
        if not asked_in_full:
            continue
        scale = mapping.scale(code)
        figure = page.locator(f"#scale-{code}")
        label = figure.locator('[role="img"]').get_attribute("aria-label") or ""
        assert f"Elevated range {scale.elevated_low:.2f} to 7." in label, label
        for k, earlier in enumerate(story[:number], start=1):
            trigger_only = len(earlier.scales.get(code, (0,))) == 1
            mark = f"report {k}: "
            point = label.split(mark, 1)[1].split(";", 1)[0] if mark in label else ""
            assert ("(opening question only)" in point) == trigger_only, (code, k, point)
        # The chart is a real SVG with a shaded band (a rect area) drawn by Vega.
        assert figure.locator("svg").count() == 1


PREFERENCE_ORDER = (
    "pref-techniques",
    "pref-style",
    "pref-feelings",
    "pref-feelings-thoughts",
    "pref-relationship",
)


def _pdf_facts(pdf: bytes, stem: str) -> str:
    path = ARTIFACTS / f"{stem}.pdf"
    path.write_bytes(pdf)
    text = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, check=True, text=True
    )
    subprocess.run(
        ["pdftoppm", "-png", "-r", "60", "-f", "1", "-l", "1", str(path), str(ARTIFACTS / stem)], check=True
    )
    return text.stdout


@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="poppler-utils (make test installs it)")
def test_the_report_for_sonja_and_harald_opens_from_the_ehr(demo: Demo, database_url: str) -> None:
    lane = "postgres" if database_url.startswith("postgresql") else "sqlite"
    pages = Pages(f"{lane}-report")
    mapping = nf21("2.1.0")
    sonja = demo.loaded.patient("sonja").patient_id
    harald = demo.loaded.patient("harald").patient_id
    with chromium() as browser:
        desk = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
        page = desk.new_page()
        page.goto(f"{demo.root}/report/launch?iss={demo.base}&launch={demo.launch(sonja)}&lang=en")
        _sign_in(page, demo, "kari", pages, "report")
        page.wait_for_url(f"**/report/Patient/{sonja}**")
        page.goto(f"{demo.root}/report/Patient/{sonja}?lang=en")
        pages.keep(page, "sonja report 13")
        _check_report(page, case_study("sonja").complete(), 13, mapping)

        # Report 3 of Sonja's: the alliance rupture the case study tells of.
        reports = demo.get("DiagnosticReport", subject=f"Patient/{sonja}", _sort="date", _count="50")
        third = reports["entry"][2]["resource"]["id"]
        page.goto(f"{demo.root}/report/Patient/{sonja}?lang=en&administration={third}")
        pages.keep(page, "sonja report 3")
        _check_report(page, case_study("sonja").complete(), 3, mapping)
        assert "rupture" in (page.text_content("section.alliance") or "").lower()

        # Harald at report 18: his first preferences (more techniques, feelings, thoughts and relationship
        # focus; less humour).
        reports = demo.get("DiagnosticReport", subject=f"Patient/{harald}", _sort="date", _count="50")
        eighteenth = reports["entry"][17]["resource"]["id"]
        page.goto(f"{demo.root}/report/Patient/{harald}?lang=en&administration={eighteenth}")
        pages.keep(page, "harald report 18")
        _check_report(page, case_study("harald").complete(), 18, mapping)
        page.goto(f"{demo.root}/report/Patient/{harald}?lang=en")
        pages.keep(page, "harald report 33")
        _check_report(page, case_study("harald").complete(), 33, mapping)

        # The caseload, each row opening a report.
        page.goto(f"{demo.root}/report/caseload?lang=en")
        pages.keep(page, "caseload")
        assert page.locator(f'a[href*="/report/Patient/{sonja}"]').count() == 1

        # The PDF of the same report, read back and rendered.
        pdf = page.request.get(f"{demo.root}/report/Patient/{sonja}/report.pdf?lang=en")
        assert pdf.status == 200 and pdf.headers["content-type"] == "application/pdf"
        text = _pdf_facts(pdf.body(), f"{lane}-report-sonja")
        last = case_study("sonja").complete()[12]
        assert "Sonja" in text and f"{_percent(last, 'total')} %" in text
        assert (ARTIFACTS / f"{lane}-report-sonja-1.png").exists()
        desk.close()

        # A clinician outside the care team signs in to the report app: Sonja's report is "not found".
        other = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
        page = other.new_page()
        page.goto(f"{demo.root}/report/Patient/{sonja}?lang=en")
        _sign_in(page, demo, "jonas", pages, "outsider")
        page.wait_for_url(f"**/report/Patient/{sonja}**")
        assert "Sonja" not in (page.text_content("main") or "")
        answer = page.request.get(f"{demo.root}/report/Patient/{sonja}?lang=en")
        assert answer.status == 404
        other.close()
    assert not pages.violations, pages.violations

    # A patient's own token in the report's cookie: no report either.
    token = demo.token("patient/*.rs", patient=sonja)
    with httpx.Client(cookies={"fhir_norse_report": token}) as http:
        assert http.get(f"{demo.root}/report/Patient/{sonja}").status_code == 404
    # Every opening of a report is an AuditEvent naming the clinician and the patient.
    events = demo.get("AuditEvent", patient=f"Patient/{sonja}", _count="200")
    opened = [
        e["resource"]
        for e in events.get("entry", [])
        if "report" in str(e["resource"].get("subtype", "")) and e["resource"].get("outcome") == "0"
    ]
    kari = demo.loaded.clinician("kari").practitioner_id
    assert opened and any(f"Practitioner/{kari}" in str(e.get("agent")) for e in opened)
