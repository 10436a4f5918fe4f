"""The patient form in a real browser (issue 15): Debian's Chromium driven by Playwright at a phone's
viewport (360 x 740), against the server running for real (uvicorn on a loopback port), on SQLite and
PostgreSQL. The adaptive NF form is answered to the end through the real pages, leaving and resuming
half-way, once with JavaScript on and once off; axe-core checks every page in both languages (no serious
or critical violation); a screenshot of each page is kept under var/test-artifacts/web/."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from tests.intake_support import publish_questionnaires
from tests.web.browser import (
    VIEWPORT,
    Pages,
    answer_screen,
    chromium,
    free_port,
    go_on,
    needs_chromium,
    serving,
)
from tests.web.support import PHQ9, Clock, FormSite, site_of

pytestmark = needs_chromium


@dataclass
class LiveSite:
    form: FormSite
    origin: str
    lane: str


@pytest.fixture
def live(settings: Settings, request: pytest.FixtureRequest) -> Iterator[LiveSite]:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    configured = settings.model_copy(update={"base_url": f"{origin}/fhir", "patient_base_url": origin})
    clock = Clock()
    app: FastAPI = create_app(configured, clock=clock)
    publish_questionnaires(app.state.service)
    form = site_of(app, clock)
    lane = "postgres" if "postgres" in settings.database_url else "sqlite"
    try:
        with serving(app, port):
            yield LiveSite(form, origin, lane)
    finally:
        app.state.service.storage.engine.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def run_journey(browser: Any, live: LiveSite, *, javascript: bool) -> None:
    site = live.form
    patient_id = site.patient()
    task_id = site.task(patient_id)
    token = site.link(task_id, patient_id)
    mode = "js" if javascript else "nojs"
    pages = Pages(f"{live.lane}-{mode}")
    options = {"viewport": VIEWPORT, "java_script_enabled": javascript, "locale": "nb-NO"}

    context = browser.new_context(**options)
    page = context.new_page()
    page.goto(f"{live.origin}/p/{token}")
    assert page.url.endswith("/form/page/1")
    for n in range(1, 3):
        pages.keep_both_languages(page, f"page {n}") if javascript else pages.keep(
            page, f"page {n}", check=False
        )
        answer_screen(page, "4")
        go_on(page)
    # The patient closes the browser half-way ...
    context.close()
    context = browser.new_context(**options)
    page = context.new_page()
    page.goto(f"{live.origin}/p/{token}")
    # ... and opening the same link again resumes at the first unanswered page.
    assert page.url.endswith("/form/page/3"), page.url
    if javascript:
        # The rest in English, switched on a page: the answers given in bokmål stay.
        page.locator("form.language button").click()
        page.wait_for_load_state()
        assert page.get_attribute("html", "lang") == "en"
    n = 3
    while "/form/page/" in page.url:
        if javascript:
            pages.keep_both_languages(page, f"page {n}")
        else:
            pages.keep(page, f"page {n}", check=False)
        answer_screen(page, "4")
        go_on(page)
        n += 1
    assert page.url.endswith("/form/review"), page.url
    if javascript:
        pages.keep_both_languages(page, "review")
    else:
        pages.keep(page, "review", check=False)
    page.locator("form.submit-form button").click()
    page.wait_for_load_state()
    pages.keep(page, "thanks", check=javascript)
    assert page.locator("h1").inner_text() in ("Thank you for your answers", "Takk for svarene dine")

    task = site.read("Task", task_id)
    assert task["status"] == "completed"
    response_id = task["output"][0]["valueReference"]["reference"].split("/")[1]
    assert site.read("QuestionnaireResponse", response_id)["status"] == "completed"
    # A second use of the link is refused with a plain page.
    page.goto(f"{live.origin}/p/{token}")
    assert "allerede svart" in page.content()
    pages.keep(page, "link used", check=javascript)
    context.close()
    assert not pages.violations, "\n".join(pages.violations)


def test_adaptive_form_in_chromium_with_javascript(browser: Any, live: LiveSite) -> None:
    if live.lane == "postgres":
        # The pages are the same HTML on either database; axe-core on every page in both languages
        # takes two minutes, so it runs once. PostgreSQL gets the same walk without JavaScript below,
        # and the whole journey in test_journey_browser.py.
        pytest.skip("axe-core on every page runs on the SQLite lane")
    run_journey(browser, live, javascript=True)


def test_adaptive_form_in_chromium_without_javascript(browser: Any, live: LiveSite) -> None:
    run_journey(browser, live, javascript=False)


def test_error_and_refusal_pages_are_accessible(browser: Any, live: LiveSite) -> None:
    site = live.form
    pages = Pages(f"{live.lane}-other")
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(f"{live.origin}/p/{'x' * 43}")
    assert "Lenken virker ikke" in page.content()
    pages.keep(page, "unknown link")
    patient_id = site.patient()
    token = site.link(site.task(patient_id, PHQ9), patient_id)
    page.goto(f"{live.origin}/p/{token}")
    pages.keep_both_languages(page, "phq9 page 1")
    go_on(page)  # nothing chosen: the required questions say so
    assert page.locator(".error-summary").count() == 1
    assert page.locator("fieldset[aria-describedby]").count() >= 1
    pages.keep(page, "phq9 errors")
    context.close()
    assert not pages.violations, "\n".join(pages.violations)
