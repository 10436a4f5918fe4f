"""The feedback report and caseload as pages (fhir_norse/web/report/): HTML, SVG charts, PDF, axe.

Sonja's record is built once, on SQLite (the facts on both databases are tests/rom/test_report.py's;
the pages only word and draw them). The HTML must carry no script, one SVG chart per scale shown plus
the alliance chart, each with a text alternative; the PDF must render on A4 and hold the same facts
(read with pdftotext when poppler-utils is installed, else from WeasyPrint's own laid-out document);
the pages are opened in Chromium, checked with axe-core and kept as screenshots
(var/test-artifacts/web/report-*.png).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.testclient import TestClient
from starlette.staticfiles import StaticFiles

from fhir_norse.api.app import create_app
from fhir_norse.auth.caller import Caller
from fhir_norse.config import Settings
from fhir_norse.rom.report import CaseloadRow, PatientReport, Text, assemble_report
from fhir_norse.server.context import RequestContext
from fhir_norse.web.report import STATIC, ReportPages
from fhir_norse.web.report.pages import STYLESHEET_URL
from tests.intake_support import publish_questionnaires
from tests.rom.test_case_studies import SONJA, run
from tests.tokens import bearer
from tests.web.browser import Pages, chromium, free_port, needs_chromium, serving


@pytest.fixture(scope="module")
def reports(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: Any
) -> Iterator[dict[int, PatientReport]]:
    """Sonja's report as of report 3 and as of report 13 (the newest)."""
    path = tmp_path_factory.mktemp("report-render") / "fhir.sqlite3"
    shutil.copy(sqlite_template, path)
    settings = Settings(
        database_url=f"sqlite:///{path}",
        base_url="http://testserver/fhir",
        mode="development",
        publish_content=False,
    )
    app = create_app(settings)
    publish_questionnaires(app.state.service)
    try:
        with TestClient(app, headers=bearer(app)) as client:
            sonja = run(client, "Sonja", SONJA, date(2025, 1, 6), 18)
        ctx = RequestContext(caller=Caller.operator(), base_url="http://testserver/fhir")
        with app.state.service.session(ctx, read_only=True) as repo:
            newest = assemble_report(repo, sonja.patient)
            third = assemble_report(repo, sonja.patient, administration=newest.administrations[2][1])
        yield {3: third, 13: newest}
    finally:
        app.state.service.storage.engine.dispose()


@pytest.fixture(scope="module")
def pages() -> ReportPages:
    return ReportPages()


def _html(pages: ReportPages, report: PatientReport, lang: str) -> str:
    return pages.report_html(
        report,
        lang,  # type: ignore[arg-type]
        pdf_url="/report/Patient/x/report.pdf",
        all_scales_url="/report/Patient/x?all=1",
        other_lang_url="/report/Patient/x?lang=en",
    )


def _text(html: str) -> str:
    """The page's text as a reader gets it (tags out, whitespace folded)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_html_has_no_script_and_every_chart_has_a_text_alternative(
    pages: ReportPages, reports: dict[int, PatientReport]
) -> None:
    report = reports[13]
    html = _html(pages, report, "nb")
    assert "<script" not in html.lower() and "javascript:" not in html.lower()
    assert ' style="' not in html  # the CSP allows no inline style
    assert '<html lang="nb">' in html
    shown = sum(len(g.trajectories) for g in report.domains)
    assert shown == 5
    assert html.count("<svg") == shown + 1  # one per scale, and the alliance bars
    figures = re.findall(r'<div class="svg" role="img" aria-label="([^"]+)"><svg', html)
    assert len(figures) == shown + 1
    assert html.count('<figcaption class="visually-hidden">') == shown + 1
    # The text alternative says what the chart shows: trigger-only points and reliable change included
    sad = next(f for f in figures if f.startswith("Tristhet:"))
    assert "rapport 1: 4,00 (bare innledende spørsmål)" in sad
    assert "rapport 13: 7,00, pålitelig forverring" in sad
    assert "Forhøyet område fra 4,02 til 7" in sad
    worry = next(f for f in figures if f.startswith("Bekymring:"))
    assert worry.endswith("Stagnasjon: forhøyet uten pålitelig endring.")
    text = _text(html)
    assert "Pålitelig forverring: Tristhet" in text and "Pålitelig forverring: Håpløshet" in text
    assert "Pålitelig forverring siden forrige rapport: Tristhet og Håpløshet." in text
    assert "Rapport 13 av 13, 10.08.2025" in text
    # the arrows: a glyph hidden from screen readers and the word beside it
    assert re.search(
        r'<li class="pref pref-as-now">\s*<span class="arrow" aria-hidden="true">\u2013</span>', html
    )
    assert "sist endret ved rapport 8 (12.05.2025)" in text
    assert 'href="/report/Patient/x/report.pdf"' in html and f'href="{STYLESHEET_URL}"' in html
    assert re.findall(r'class="pref-word">([^<]+)<', html) == ["Som nå:"] * 5


def test_alliance_and_preferences_at_report_6_and_3_in_english(
    pages: ReportPages, reports: dict[int, PatientReport]
) -> None:
    html = _html(pages, reports[3], "en")
    text = _text(html)
    assert '<html lang="en">' in html
    assert "Report 3 of 13" in text
    assert "Task: 29 % (previous 71 %); Goal: 43 % (previous 71 %); Bond: 50 % (previous 79 %)" in html
    assert "Total: 43 % (previous 75 %)" in html
    assert "Alliance rupture: the total is below 75 % and the total is reliably lower than last time." in text
    assert "The alert has cleared since." in text  # the rupture Flag ended at report 9
    assert "Rupture" in html  # drawn beside the total bar as a word and a triangle


def test_pdf_renders_on_a4_with_the_same_facts(pages: ReportPages, reports: dict[int, PatientReport]) -> None:
    started = time.perf_counter()
    pdf = pages.report_pdf(reports[13], "en")
    elapsed = time.perf_counter() - started
    assert pdf.startswith(b"%PDF-")
    assert elapsed < 20, f"PDF took {elapsed:.1f} s"
    # The same HTML laid out by WeasyPrint: A4 pages (210 x 297 mm at 96 px per inch)
    from weasyprint import HTML
    from weasyprint.formatting_structure.boxes import TextBox

    html = pages._report(reports[13], "en", pdf=True, pdf_url=None, all_scales_url=None, other_lang_url=None)
    document = HTML(string=html).render()
    assert len(document.pages) >= 2
    for page in document.pages:
        assert (round(page.width * 25.4 / 96), round(page.height * 25.4 / 96)) == (210, 297)
    if shutil.which("pdftotext"):
        text = subprocess.run(
            ["pdftotext", "-layout", "-", "-"], input=pdf, capture_output=True, check=True
        ).stdout
        words = re.sub(r"\s+", " ", text.decode())
    else:  # poppler-utils not installed: the text of WeasyPrint's own laid-out document
        words = re.sub(
            r"\s+",
            " ",
            " ".join(
                box.text
                for page in document.pages
                for box in page._page_box.descendants()
                if isinstance(box, TextBox)
            ),
        )
    for fact in (
        "Feedback report for Sonja",
        "Report 13 of 13",
        "Reliable deterioration: Sad Affect",
        "Reliable deterioration: Hopelessness",
        "Stagnation (elevated without reliable change)",
        "Focus on my feelings",
        "last changed at report 8",
    ):
        assert fact in words, fact
    assert "Download as PDF" not in words  # the page's links are not in the document


def test_caseload_html(pages: ReportPages) -> None:
    rows = [
        CaseloadRow(
            "p1",
            "Sonja",
            date(1990, 5, 1),
            ("deterioration",),
            (Text("Bekymring", "Worry"),),
            (),
            date(2025, 8, 10),
            2,
            1,
        ),
        CaseloadRow("p2", "Taus", None, (), (), (), None, 0, 0),
    ]
    html = pages.caseload_html(
        rows,
        "en",
        clinician_name="Dr Berg",
        report_url=lambda pid: f"/report/Patient/{pid}",
        other_lang_url="/x?lang=nb",
    )
    assert "<script" not in html
    text = _text(html)
    assert "Patients of Dr Berg" in text
    assert 'href="/report/Patient/p1"' in html and 'href="/report/Patient/p2"' in html
    assert "Deterioration" in text and "Worry" in text and "Never" in text


def _site(html: dict[str, str]) -> FastAPI:
    app = FastAPI()
    for path, body in html.items():
        app.add_api_route(path, (lambda body=body: HTMLResponse(body)), methods=["GET"])
    app.mount("/static/report", StaticFiles(directory=STATIC), name="report-static")
    return app


@needs_chromium
def test_pages_in_chromium_pass_axe(pages: ReportPages, reports: dict[int, PatientReport]) -> None:
    now = datetime(2025, 9, 1, tzinfo=UTC)
    rows = [
        CaseloadRow(
            "p1",
            "Sonja",
            None,
            ("deterioration",),
            (Text("Bekymring", "Worry"),),
            (Text("Tristhet", "Sad Affect"),),
            now.date(),
            1,
            0,
        )
    ]
    site = _site(
        {
            "/nb": _html(pages, reports[13], "nb"),
            "/en3": _html(pages, reports[3], "en"),
            "/caseload": pages.caseload_html(
                rows, "nb", clinician_name="Dr Berg", report_url=lambda p: f"/nb#{p}", other_lang_url=None
            ),
        }
    )
    port = free_port()
    kept = Pages("report")
    with serving(site, port), chromium() as browser:
        for viewport in ({"width": 1280, "height": 900}, {"width": 390, "height": 844}):
            page = browser.new_page(viewport=viewport)
            for path in ("/nb", "/en3", "/caseload"):
                answer = page.goto(f"http://127.0.0.1:{port}{path}")
                assert answer is not None and answer.ok
                # the style sheet was served and applied (the CSP allows no inline style)
                border = page.evaluate("getComputedStyle(document.querySelector('.top')).borderBottomStyle")
                assert border == "solid", path
                kept.keep(page, f"{path.strip('/')}-{viewport['width']}")
            page.close()
    assert kept.violations == []
