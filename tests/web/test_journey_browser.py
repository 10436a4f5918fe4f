"""Issue 15's whole journey, as the patient and the clinic live it, in Debian's Chromium at a phone's
viewport, on SQLite and PostgreSQL:

a monitoring CarePlan ("before each appointment") and a booked Appointment -> the scheduler's tick makes
the administration Task and sends the invitation -> the SMS arrives at the local Twilio-contract gateway
(and, for a patient with only an e-mail address, the e-mail at the local SMTP server, over STARTTLS with
AUTH) -> the gateway's signed delivery report completes the Communication -> the patient opens the link,
answers the adaptive pages, leaves, opens the link again and resumes, reviews and submits -> the Task is
completed, the response scored (Observations and a DiagnosticReport), and the link refused on a second
use. Every page is kept as a screenshot under var/test-artifacts/web/ and checked with axe-core.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from pydantic import SecretStr

from fhir_norse.api.app import create_app
from fhir_norse.auth.caller import Caller
from fhir_norse.config import Settings
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from tests.intake_support import publish_questionnaires
from tests.rom.journey_support import appointment, before_appointment_activity, care_plan, patient
from tests.support.fake_twilio import FakeTwilio
from tests.support.smtp_server import LocalSmtp
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
from tests.web.support import PHQ9, Clock

pytestmark = needs_chromium

NF21 = "http://fhir-norse.org/fhir/Questionnaire/nf21-adaptive|2.2.0"
ACCOUNT = "AC" + "0" * 32
TOKEN = "twilio-test-auth-token"
CLINIC = "Poliklinikk Nord"
LINK = re.compile(r"(http://127\.0\.0\.1:\d+/p/[A-Za-z0-9_-]{43})")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def _operator(origin: str) -> RequestContext:
    return RequestContext(caller=Caller.operator(), base_url=f"{origin}/fhir")


def _create(service: FhirService, ctx: RequestContext, body: dict[str, Any]) -> str:
    result = service.create(ctx, body["resourceType"], body)
    assert result.status == 201 and result.body is not None, result.body
    return str(result.body["id"])


def _search(service: FhirService, ctx: RequestContext, res_type: str, **params: str) -> list[dict[str, Any]]:
    from fhir_norse.server.interactions import InteractionRequest, match

    found = match("GET", f"/{res_type}")
    assert found is not None
    interaction, _ = found
    result = service.perform(ctx, interaction, InteractionRequest(res_type, params=list(params.items())))
    import orjson

    bundle = result.body if result.body is not None else orjson.loads(result.raw or "{}")
    return [e["resource"] for e in bundle.get("entry") or [] if e.get("search", {}).get("mode") != "include"]


def _read(service: FhirService, ctx: RequestContext, res_type: str, res_id: str) -> dict[str, Any]:
    import orjson

    result = service.read(ctx, res_type, res_id)
    return result.body if result.body is not None else dict(orjson.loads(result.raw or "{}"))


def _answer_to_the_end(page: Any, pages: Pages, form: str, value: str, *, first: int = 1) -> None:
    """Answer every page from the current one (page ``first``) with ``value``, keep the review, submit,
    and keep the thank-you page."""
    n = first
    while "/form/page/" in page.url:
        # axe-core on the first page of each visit; test_form_browser.py checks every page of the form
        # in both languages (a screenshot of each is kept here all the same).
        pages.keep(page, f"{form} page {n}", check=n == first)
        answer_screen(page, value)
        go_on(page)
        n += 1
    assert page.url.endswith("/form/review"), page.url
    pages.keep(page, f"{form} review")
    page.locator("form.submit-form button").click()
    page.wait_for_load_state()
    pages.keep(page, f"{form} thanks")


def test_from_the_plan_to_the_scored_response_in_a_phone_browser(settings: Settings, browser: Any) -> None:
    lane = "postgres" if "postgres" in settings.database_url else "sqlite"
    clock = Clock()
    with FakeTwilio(ACCOUNT, TOKEN) as gateway, LocalSmtp() as mail:
        port = free_port()
        origin = f"http://127.0.0.1:{port}"
        configured = settings.model_copy(
            update={
                "base_url": f"{origin}/fhir",
                "patient_base_url": origin,
                "clinic_name": CLINIC,
                "messaging_quiet_hours": "",
                "sms_gateway": "twilio",
                "twilio_account_sid": ACCOUNT,
                "twilio_auth_token": SecretStr(TOKEN),
                "twilio_from": "+4759440000",
                "twilio_api_base": gateway.base_url,
                "email_transport": "smtp",
                "smtp_host": mail.host,
                "smtp_port": mail.port,
                "smtp_username": mail.username,
                "smtp_password": SecretStr(mail.password),
                "smtp_from": "no-reply@poliklinikk-nord.example",
                "smtp_ca_file": mail.ca_file,
            }
        )
        app = create_app(configured, clock=clock)
        service: FhirService = app.state.service
        publish_questionnaires(service)
        ctx = _operator(origin)
        try:
            with serving(app, port):
                _journey(app, service, ctx, gateway, mail, browser, origin, lane, clock)
        finally:
            app.state.journey.close()
            service.storage.engine.dispose()


def _journey(
    app: Any,
    service: FhirService,
    ctx: RequestContext,
    gateway: FakeTwilio,
    mail: LocalSmtp,
    browser: Any,
    origin: str,
    lane: str,
    clock: Clock,
) -> None:
    now = clock()
    # The clinic: two patients, each with a monitoring plan and an appointment tomorrow.
    kari = _create(service, ctx, patient(mobile="+4791234567"))
    ola = _create(service, ctx, patient(mobile=None, email="ola@example.no", language="en"))
    for who, questionnaire in ((kari, NF21), (ola, PHQ9)):
        _create(
            service,
            ctx,
            care_plan(
                who,
                before_appointment_activity(questionnaire, hours_before=48, context="weekly"),
                start=now - timedelta(days=1),
            ),
        )
        _create(service, ctx, appointment(who, now + timedelta(hours=24)))

    # The scheduler's tick: the Tasks, their invitations, and the messages.
    app.state.journey.scheduler.tick()
    (sms,) = gateway.messages
    sms_text, email_text = str(sms["body"]), ""
    assert sms["to"] == "+4791234567" and CLINIC in sms_text
    sms_link = LINK.search(sms_text)
    assert sms_link is not None, sms_text
    (email,) = mail.messages
    assert email["To"] == "ola@example.no"
    email_text = str(email.get_content())
    email_link = LINK.search(email_text)
    assert email_link is not None
    assert mail.envelopes[0][2] is True  # (mail from, recipients, over TLS)
    for text in (sms_text, email_text):
        # The message names no questionnaire or condition (the link's random token may spell anything).
        words = LINK.sub("", text)
        assert not re.search(r"\bNF|PHQ|depres|angst|suicid", words, re.IGNORECASE), text

    (task,) = _search(service, ctx, "Task", patient=kari)
    assert task["status"] == "requested" and task["input"][0]["valueCanonical"] == NF21
    # The gateway's delivery report (signed, to the status callback) completes the Communication.
    assert gateway.deliver(str(sms["sid"]), "delivered") == 204
    (communication,) = _search(service, ctx, "Communication", patient=kari)
    assert communication["status"] == "completed" and "received" in communication
    assert sms_link.group(1) not in str(_search(service, ctx, "CommunicationRequest", patient=kari))

    pages = Pages(f"{lane}-journey")
    options = {"viewport": VIEWPORT, "locale": "nb-NO"}
    context = browser.new_context(**options)
    page = context.new_page()
    page.goto(sms_link.group(1))
    assert page.url.endswith("/form/page/1"), page.url
    for n in range(1, 4):
        pages.keep(page, f"nf page {n}", check=n == 1)
        answer_screen(page, "3")
        go_on(page)
    assert _read(service, ctx, "Task", task["id"])["status"] == "in-progress"
    # She closes the browser, and later opens the link from the SMS again: the form resumes.
    context.close()
    context = browser.new_context(**options)
    page = context.new_page()
    page.goto(sms_link.group(1))
    assert page.url.endswith("/form/page/4"), page.url
    _answer_to_the_end(page, pages, "nf", "3", first=4)
    assert page.locator("h1").inner_text() == "Takk for svarene dine"

    task = _read(service, ctx, "Task", task["id"])
    assert task["status"] == "completed"
    response_id = task["output"][0]["valueReference"]["reference"].split("/")[1]
    assert _read(service, ctx, "QuestionnaireResponse", response_id)["status"] == "completed"
    assert _search(service, ctx, "Observation", patient=kari)
    (report,) = _search(service, ctx, "DiagnosticReport", patient=kari)
    assert report["status"] == "final"
    # A second use of the link is refused with a plain page.
    page.goto(sms_link.group(1))
    assert "allerede svart" in page.content()
    pages.keep(page, "nf link used")
    context.close()

    # Ola, from his e-mail, in English (Patient.communication), on PHQ-9.
    context = browser.new_context(**options)
    page = context.new_page()
    page.goto(email_link.group(1))
    assert page.get_attribute("html", "lang") == "en"
    _answer_to_the_end(page, pages, "phq9", "1")
    assert page.locator("h1").inner_text() == "Thank you for your answers"
    context.close()
    (ola_task,) = _search(service, ctx, "Task", patient=ola)
    assert ola_task["status"] == "completed"
    assert _search(service, ctx, "Observation", patient=ola)
    assert not pages.violations, "\n".join(pages.violations)
