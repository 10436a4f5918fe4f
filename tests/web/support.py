"""Builders for the patient form's tests: an app with the form installed, a controllable clock, a
patient, a questionnaire Task and its personal link, and a walker that answers the real pages."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.auth.caller import Caller
from fhir_norse.auth.links import PersonalLinks
from fhir_norse.rom.administrations import questionnaire_task
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService

NF21_ADAPTIVE = "http://fhir-norse.org/fhir/Questionnaire/nf21-adaptive|2.1.0"
PHQ9 = "http://fhir-norse.org/fhir/Questionnaire/phq9|1.0.0"


class Clock:
    """A clock the tests move (timezone-aware UTC)."""

    def __init__(self) -> None:
        self.moment = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.moment

    def advance(self, **delta: float) -> None:
        self.moment += timedelta(**delta)


@dataclass
class FormSite:
    app: FastAPI
    links: PersonalLinks
    clock: Clock

    @property
    def sent_codes(self) -> list[tuple[str, str]]:
        """(phone number, code) of every one-time code texted, from the development SMS transport (the
        log), which keeps what it sent."""
        sms = self.app.state.journey.transports["sms"]
        return [(m.to, re.findall(r"\b\d{6}\b", m.body)[0]) for m in sms.sent if m.reference == "code"]

    @property
    def service(self) -> FhirService:
        service: FhirService = self.app.state.service
        return service

    def operator(self) -> RequestContext:
        return RequestContext(caller=Caller.operator(), base_url="http://testserver/fhir")

    def create(self, res_type: str, body: dict[str, Any]) -> dict[str, Any]:
        result = self.service.create(self.operator(), res_type, body)
        assert result.body is not None
        return result.body

    def read(self, res_type: str, res_id: str) -> dict[str, Any]:
        result = self.service.read(self.operator(), res_type, res_id)
        assert result.body is not None or result.raw is not None
        if result.body is not None:
            return result.body
        import orjson

        return dict(orjson.loads(result.raw or "{}"))

    def patient(self, **extra: Any) -> str:
        body = {
            "resourceType": "Patient",
            "name": [{"family": "Nordmann"}],
            "birthDate": "1980-01-31",
            **extra,
        }
        return str(self.create("Patient", body)["id"])

    def task(
        self,
        patient_id: str,
        questionnaire: str = NF21_ADAPTIVE,
        *,
        opens: timedelta = timedelta(hours=-1),
        closes: timedelta = timedelta(days=2),
        status: str | None = None,
        context: str | None = None,
    ) -> str:
        task_id = uuid.uuid4().hex[:16]
        now = self.clock()
        body = questionnaire_task(
            task_id=task_id,
            patient_id=patient_id,
            questionnaire=questionnaire,
            start=now + opens,
            end=now + closes,
            authored=now,
            context=context,
        )
        if status is not None:
            body["status"] = status
        result = self.service.update(self.operator(), "Task", task_id, body)
        assert result.status in (200, 201)
        return task_id

    def link(self, task_id: str, patient_id: str, *, hours: float = 48) -> str:
        return self.links.issue(task_id, patient_id, self.clock() + timedelta(hours=hours))


def site_of(app: FastAPI, clock: Clock) -> FormSite:
    """The form of ``app`` (built by ``create_app(settings, clock=clock)``, which installs it with the
    app's own personal links and administrations)."""
    return FormSite(app, app.state.journey.links, clock)


# ---------------------------------------------------------------------- reading the pages


class PageParser(HTMLParser):
    """What a test needs from a page: the CSRF token, radio groups, checked answers, links, lang."""

    def __init__(self) -> None:
        super().__init__()
        self.csrf: str | None = None
        self.radios: dict[str, list[str]] = {}
        self.checked: dict[str, str] = {}
        self.lang: str | None = None
        self.h1: list[str] = []
        self.links: list[str] = []
        self.forms: list[str] = []
        self._in_h1 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "html":
            self.lang = a.get("lang")
        if tag == "h1":
            self._in_h1 = True
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag == "form":
            self.forms.append(a.get("action", ""))
        if tag == "input" and a.get("name") == "csrf":
            self.csrf = a.get("value")
        if tag == "input" and a.get("type") == "radio":
            name = a["name"]
            self.radios.setdefault(name, []).append(a["value"])
            if "checked" in a:
                self.checked[name] = a["value"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "h1":
            self._in_h1 = False

    def handle_data(self, data: str) -> None:
        if self._in_h1:
            self.h1.append(data)


def parse(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    return parser


def open_link(client: TestClient, token: str) -> Any:
    return client.get(f"/p/{token}", follow_redirects=False)


def page_number(location: str) -> int | None:
    found = re.fullmatch(r"/form/page/(\d+)", location)
    return int(found[1]) if found else None


Chooser = Callable[[str, list[str]], str | None]


def middle(_link_id: str, options: list[str]) -> str | None:
    """Answer 4 on a 1-7 item, "as-now" on a preference, else the first option."""
    for wanted in ("4", "as-now"):
        if wanted in options:
            return wanted
    return options[0]


def walk(client: TestClient, choose: Chooser = middle, *, stop_after: int | None = None) -> Iterator[str]:
    """Answer the form from where it resumes to the review page, yielding each page's path; stops after
    ``stop_after`` pages if given."""
    location = client.get("/form", follow_redirects=False).headers["location"]
    done = 0
    while page_number(location) is not None:
        yield location
        page = client.get(location)
        assert page.status_code == 200, page.text
        parsed = parse(page.text)
        data: dict[str, str] = {"csrf": parsed.csrf or "", "action": "next"}
        for name, options in parsed.radios.items():
            value = choose(name[2:], options)
            if value is not None:
                data[name] = value
        posted = client.post(location, data=data, follow_redirects=False)
        assert posted.status_code == 303, posted.text
        location = posted.headers["location"]
        done += 1
        if stop_after is not None and done >= stop_after:
            return
    assert location == "/form/review", location
    yield location


def answer_map(levels: Mapping[str, str]) -> Chooser:
    def choose(link_id: str, options: list[str]) -> str | None:
        return levels.get(link_id) or middle(link_id, options)

    return choose
