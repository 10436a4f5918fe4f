"""The sign-in pages for apps (issue 16): scopes in plain words, the consent page, the clinician's patient
picker and the refusal pages, in bokmål and English (fhir_norse/web/signin.py).

Unit tests read the words and the HTML; the browser tests serve the pages from a tiny app (the real
style sheets, the real security headers) to Debian's Chromium at 360 x 740, run axe-core on every page
in both languages, keep screenshots under var/test-artifacts/web/signin-*.png, and post the consent
form for real: a ticked-off line is not sent, and the redirect to the app's origin that answers the post
is allowed by the page's Content-Security-Policy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from fhir_norse.web.pages import STATIC
from fhir_norse.web.signin import (
    REFUSAL_KINDS,
    ConsentView,
    Lang,
    PickerView,
    RefusalView,
    Role,
    ScopeLine,
    SigninPages,
    allowed_scopes,
    describe_scopes,
    format_birth_date,
    refusal_text,
    scope_context,
    signin_headers,
)
from tests.web.browser import VIEWPORT, Pages, chromium, free_port, needs_chromium, serving

REQUESTED = (
    "launch/patient openid fhirUser patient/Observation.rs patient/QuestionnaireResponse.cruds "
    "patient/Observation.rs?category=survey offline_access"
)
HOSTILE = '<script>alert("x")</script>'


def texts(lines: list[ScopeLine]) -> dict[str, ScopeLine]:
    return {line.scope: line for line in lines}


# -- scopes in words ----------------------------------------------------------------------------------


def test_v2_scopes_in_both_languages() -> None:
    nb = texts(describe_scopes(["patient/Observation.rs", "patient/Patient.r"], "nb"))
    assert nb["patient/Observation.rs"].text == "Se skårene og målingene dine"
    assert nb["patient/Observation.rs"].detail is None
    assert nb["patient/Patient.r"].text == "Se navnet, fødselsdatoen og kontaktopplysningene dine"
    en = texts(describe_scopes("patient/Observation.rs patient/Flag.cud", "en"))
    assert en["patient/Observation.rs"].text == "See your scores and measurements"
    assert en["patient/Flag.cud"].text == "Change your alerts"
    # "Change" stands for several permissions: the detail names them.
    assert en["patient/Flag.cud"].detail == "The app can add, change and delete."
    assert texts(describe_scopes("patient/Flag.cud", "nb"))["patient/Flag.cud"].detail == (
        "Appen kan legge til, endre og slette."
    )


def test_v1_scopes_read_like_their_v2_equivalents() -> None:
    v1 = describe_scopes("patient/QuestionnaireResponse.read patient/*.read patient/Task.write", "en")
    assert [line.text for line in v1] == [
        "See your answers to questionnaires",
        "See all information about you",
        "Change your tasks, such as questionnaires to fill in",
    ]
    assert [line.scope for line in v1] == [
        "patient/QuestionnaireResponse.read",
        "patient/*.read",
        "patient/Task.write",
    ]
    assert describe_scopes("patient/*.read", "nb")[0].text == "Se alle opplysninger om deg"


def test_whose_data_depends_on_who_signs_in() -> None:
    scopes = "patient/QuestionnaireResponse.rs user/*.cruds user/Observation.rs"
    clinician_nb = [line.text for line in describe_scopes(scopes, "nb", role="clinician")]
    assert clinician_nb == [
        "Se svarene på spørreskjemaer til pasienten",
        "Se og endre alle opplysninger om pasientene dine",
        "Se skårene og målingene til pasientene dine",
    ]
    clinician_en = [line.text for line in describe_scopes(scopes, "en", role="clinician")]
    assert clinician_en == [
        "See the patient's answers to questionnaires",
        "See and change all information about your patients",
        "See your patients' scores and measurements",
    ]
    patient_nb = [line.text for line in describe_scopes(scopes, "nb", role="patient")]
    assert patient_nb[0] == "Se svarene dine på spørreskjemaer"
    assert patient_nb[1] == "Se og endre alle opplysninger om deg"


def test_granular_scopes_say_their_restriction() -> None:
    scope = (
        "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|survey"
    )
    nb = describe_scopes([scope], "nb")[0]
    assert nb.scope == scope
    assert nb.text == "Se skårene og målingene dine"
    assert nb.detail == "Bare de der kategorien er «spørreskjema»."
    en = describe_scopes(["patient/Observation.rs?category=survey,vital-signs&status=final"], "en")[0]
    assert (
        en.detail
        == "Only those where the category is “questionnaire” or “vital signs” and the status is “final”."
    )


def test_unknown_and_non_personal_types() -> None:
    lines = describe_scopes("patient/ImagingStudy.r patient/Questionnaire.rs user/Practitioner.r", "nb")
    assert [line.text for line in lines] == [
        "Se opplysningene dine av typen «ImagingStudy»",
        "Se spørreskjemaer",
        "Se opplysninger om behandlere",
    ]
    assert (
        describe_scopes("patient/ImagingStudy.r", "en")[0].text == "See your records of type “ImagingStudy”"
    )


def test_identity_refresh_and_context_scopes() -> None:
    cases: tuple[tuple[Lang, str, str, str], ...] = (
        (
            "nb",
            "Vite hvem du er (navnet ditt)",
            "Beholde tilgangen når du ikke bruker appen (til du trekker den tilbake)",
            "Beholde tilgangen mens du er logget inn",
        ),
        (
            "en",
            "Know who you are (your name)",
            "Keep access when you are not using the app (until you withdraw it)",
            "Keep access while you are signed in",
        ),
    )
    for lang, identity, offline, online in cases:
        lines = describe_scopes(
            "launch launch/patient launch/encounter fhirUser openid profile patient/Flag.rs offline_access "
            "online_access",
            lang,
        )
        # openid, fhirUser and profile are one line; the launch context is no line at all.
        assert [line.scope for line in lines] == [
            "openid fhirUser profile",
            "patient/Flag.rs",
            "offline_access",
            "online_access",
        ]
        assert [lines[0].text, lines[2].text, lines[3].text] == [identity, offline, online]
        assert all(line.can_refuse for line in lines)
    assert scope_context("openid launch patient/Flag.rs launch/patient") == ["launch", "launch/patient"]


def test_invalid_and_repeated_scopes_get_no_extra_line() -> None:
    lines = describe_scopes(["patient/Flag.rs", "patient/Flag.rs", "bogus", "patient/Flag.dus"], "en")
    assert [line.scope for line in lines] == ["patient/Flag.rs"]


def test_allowed_scopes_keeps_only_what_the_page_offered() -> None:
    lines = describe_scopes(REQUESTED, "nb")
    submitted = ["openid fhirUser", "patient/Observation.rs", "system/*.cruds", "offline_access"]
    assert allowed_scopes(lines, submitted) == [
        "openid",
        "fhirUser",
        "patient/Observation.rs",
        "offline_access",
    ]
    fixed = [replace(lines[0], can_refuse=False), *lines[1:]]
    assert allowed_scopes(fixed, []) == ["openid", "fhirUser"]


def test_refusal_texts_exist_for_every_kind_in_both_languages() -> None:
    expected = {
        "unknown-client",
        "redirect-mismatch",
        "no-patient-match",
        "several-patient-matches",
        "no-practitioner-match",
        "several-practitioner-matches",
        "outside-care-team",
        "launch-invalid",
        "login-failed",
        "login-not-configured",
        "request-expired",
        "session-mismatch",
        "app-revoked",
        "no-patients",
        "signed-out",
        "error",
    }
    assert expected <= REFUSAL_KINDS
    for kind in REFUSAL_KINDS:
        nb, en = refusal_text(kind, "nb"), refusal_text(kind, "en")
        assert all(nb[:2]) and all(en[:2]) and nb != en
    assert refusal_text("no-patient-match", "nb") == (
        "Vi fant deg ikke",
        "Vi fant deg ikke i pasientlisten her.",
        "Ta kontakt med behandlingsstedet.",
    )
    with pytest.raises(ValueError, match="unknown refusal kind"):
        refusal_text("no-such-thing", "en")


def test_birth_dates_and_headers() -> None:
    assert format_birth_date("1980-02-01", "nb") == "1. februar 1980"
    assert format_birth_date("1980-02-01", "en") == "1 February 1980"
    assert format_birth_date("1980-12", "nb") == "desember 1980"
    assert format_birth_date("1980", "en") == "1980"
    assert format_birth_date("not a date", "en") == "not a date"
    csp = signin_headers("https://app.example.org:8443/callback?x=1")["Content-Security-Policy"]
    assert "form-action 'self' https://app.example.org:8443;" in csp
    assert (
        "form-action 'self' no.example.app:;"
        in signin_headers("no.example.app:/cb")["Content-Security-Policy"]
    )
    plain = signin_headers()
    assert "form-action 'self';" in plain["Content-Security-Policy"]
    assert plain["X-Frame-Options"] == "DENY" and plain["Cache-Control"] == "no-store"


# -- the HTML --------------------------------------------------------------------------------------------


class Parsed(HTMLParser):
    """The elements of a page, with their attributes, and its text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def consent_view(lang: Lang = "nb", **changes: Any) -> ConsentView:
    view = ConsentView(
        lang=lang,
        app_name="Min helse",
        person_name="Kari Nordmann",
        role="patient",
        patient_name=None,
        patient_birth_date=None,
        lines=describe_scopes(REQUESTED, lang),
        action="/auth/consent",
        csrf="csrf-token-1",
        request_id="req-1",
        other_lang_url="/auth/consent?request_id=req-1&lang=" + ("en" if lang == "nb" else "nb"),
        clinic="Klinikk Nord",
    )
    return replace(view, **changes)


def picker_view(lang: Lang = "nb", **changes: Any) -> PickerView:
    view = PickerView(
        lang=lang,
        app_name="Skåroversikt",
        person_name="Lege Legesen",
        patients=[("p-1", "Ola Nordmann", "1980-02-01"), ("p-2", "Kari Nordmann", None)],
        action="/auth/pick",
        csrf="csrf-token-2",
        request_id="req-2",
        query="",
        other_lang_url="/auth/pick?request_id=req-2&lang=" + ("en" if lang == "nb" else "nb"),
    )
    return replace(view, **changes)


@pytest.fixture(scope="module")
def pages() -> SigninPages:
    return SigninPages()


def test_consent_form_fields(pages: SigninPages) -> None:
    html = pages.consent(consent_view())
    page = Parsed(html)
    assert page.find("html", lang="nb") and page.find("main", id="main")
    assert page.find("a", href="/auth/consent?request_id=req-1&lang=en", lang="en")
    (form,) = page.find("form")
    assert form["method"] == "post" and form["action"] == "/auth/consent"
    assert page.find("input", type="hidden", name="csrf", value="csrf-token-1")
    assert page.find("input", type="hidden", name="request_id", value="req-1")
    boxes = page.find("input", type="checkbox", name="scope")
    assert [b["value"] for b in boxes] == [
        "openid fhirUser",
        "patient/Observation.rs",
        "patient/QuestionnaireResponse.cruds",
        "patient/Observation.rs?category=survey",
        "offline_access",
    ]
    assert all("checked" in b for b in boxes)
    assert page.find("button", type="submit", name="decision", value="allow")
    assert page.find("button", type="submit", name="decision", value="deny")
    assert page.find("fieldset") and page.find("legend")
    assert not page.find("script") and not page.find("style")
    assert not any("style" in attrs for _, attrs in page.elements)
    text = " ".join(page.text)
    assert "Appen «Min helse» ber om tilgang til opplysningene dine hos Klinikk Nord." in text
    assert "Du er logget inn som Kari Nordmann." in text
    assert ">Tillat<" in html and ">Avvis<" in html


def test_consent_for_a_clinician_names_the_patient(pages: SigninPages) -> None:
    view = consent_view(
        "en",
        role="clinician",
        patient_name="Ola Nordmann",
        patient_birth_date="1980-02-01",
        lines=describe_scopes(REQUESTED, "en", role="clinician"),
        clinic=None,
    )
    text = " ".join(Parsed(pages.consent(view)).text)
    assert (
        "The app “Min helse” asks for access to information about the patient Ola Nordmann, "
        "born 1 February 1980." in text
    )
    assert "See the patient's scores and measurements" in text
    without_patient = consent_view(
        "nb", role="clinician", lines=describe_scopes("user/*.rs", "nb", role="clinician")
    )
    assert "om pasientene dine hos Klinikk Nord." in " ".join(Parsed(pages.consent(without_patient)).text)


def test_a_line_that_cannot_be_refused_is_sent_hidden(pages: SigninPages) -> None:
    lines = describe_scopes(REQUESTED, "en")
    page = Parsed(pages.consent(consent_view("en", lines=[replace(lines[0], can_refuse=False), *lines[1:]])))
    assert page.find("input", type="hidden", name="scope", value="openid fhirUser")
    assert len(page.find("input", type="checkbox", name="scope")) == len(lines) - 1


def test_hostile_names_are_escaped(pages: SigninPages) -> None:
    consent = pages.consent(consent_view(app_name=HOSTILE, person_name=HOSTILE, clinic=HOSTILE))
    picker = pages.picker(picker_view(app_name=HOSTILE, patients=[(HOSTILE, HOSTILE, None)], query=HOSTILE))
    refusal = pages.refusal(RefusalView("en", HOSTILE, HOSTILE, HOSTILE, '"><script>x</script>'))
    for html in (consent, picker, refusal):
        assert "<script" not in html
        assert "&lt;script&gt;" in html
        assert not Parsed(html).find("script")
    assert "Appen «&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;» ber om tilgang" in consent


def test_picker_fields_search_and_empty_list(pages: SigninPages) -> None:
    page = Parsed(pages.picker(picker_view()))
    radios = page.find("input", type="radio", name="patient")
    assert [r["value"] for r in radios] == ["p-1", "p-2"]
    assert "Ola Nordmann (født 1. februar 1980)" in page.text
    assert "Kari Nordmann" in page.text
    (search, pick) = page.find("form")
    assert search["method"] == "get" and pick["method"] == "post" and pick["action"] == "/auth/pick"
    assert page.find("input", type="search", name="q", id="q")
    assert page.find("input", type="hidden", name="csrf", value="csrf-token-2")
    assert len(page.find("input", type="hidden", name="request_id", value="req-2")) == 2
    assert page.find("fieldset") and page.find("legend")
    # No patients at all: the "no-patients" message and no form.
    empty = Parsed(pages.picker(picker_view("en", patients=[])))
    assert not empty.find("form")
    assert refusal_text("no-patients", "en")[0] in empty.text
    # A search that matches nobody keeps the search field and says so.
    none = Parsed(pages.picker(picker_view("en", patients=[], query="Zed")))
    assert none.find("input", name="q", value="Zed")
    assert "None of your patients match “Zed”." in " ".join(none.text)


def test_refusal_page(pages: SigninPages) -> None:
    title, message, advice = refusal_text("outside-care-team", "nb")
    page = Parsed(pages.refusal(RefusalView("nb", title, message, advice, None)))
    assert page.find("html", lang="nb") and page.find("main")
    assert not page.find("form") and not page.find("a", lang="en")
    assert [title, message, advice] == [t for t in page.text if t in (title, message, advice)]


# -- in the browser ----------------------------------------------------------------------------------------


@dataclass
class Site:
    origin: str
    # The same server under another origin: the app the consent form's redirect goes to.
    app_origin: str


def demo_app(port: int) -> FastAPI:
    """The pages as the lead's routes would serve them: the real style sheets and security headers."""
    pages = SigninPages()
    app = FastAPI()
    app.mount("/static/form", StaticFiles(directory=STATIC))
    redirect_uri = f"http://localhost:{port}/callback"

    def lang_of(request: Request) -> Lang:
        return "en" if request.query_params.get("lang") == "en" else "nb"

    def other(request: Request) -> str:
        return str(request.url.include_query_params(lang="nb" if lang_of(request) == "en" else "en"))

    @app.get("/consent/{who}")
    def consent(who: str, request: Request) -> Response:
        lang = lang_of(request)
        role: Role = "clinician" if who == "clinician" else "patient"
        view = consent_view(
            lang,
            role=role,
            patient_name="Ola Nordmann" if role == "clinician" else None,
            patient_birth_date="1980-02-01" if role == "clinician" else None,
            lines=describe_scopes(REQUESTED, lang, role=role),
            action=f"/consent/{who}",
            other_lang_url=other(request),
        )
        csp = redirect_uri if request.query_params.get("csp") != "strict" else None
        return HTMLResponse(pages.consent(view), headers=signin_headers(csp))

    @app.post("/consent/{who}")
    async def decide(who: str, request: Request) -> Response:
        form = parse_qs((await request.body()).decode())
        lines = describe_scopes(REQUESTED, "nb", role="clinician" if who == "clinician" else "patient")
        allowed = allowed_scopes(lines, form.get("scope", []))
        query = json.dumps({"decision": form["decision"][0], "scope": allowed, "csrf": form["csrf"][0]})
        return RedirectResponse(f"{redirect_uri}?{urlencode({'result': query})}", status_code=303)

    @app.get("/callback")
    def callback(result: str) -> JSONResponse:
        return JSONResponse(json.loads(result))

    @app.get("/pick")
    def picker(request: Request, q: str = "") -> Response:
        lang = lang_of(request)
        everyone = [("p-1", "Ola Nordmann", "1980-02-01"), ("p-2", "Kari Nordmann", "1975-11-30")]
        if request.query_params.get("none"):
            everyone = []
        found = [p for p in everyone if q.lower() in p[1].lower()]
        view = picker_view(lang, patients=found, query=q, action="/pick", other_lang_url=other(request))
        return HTMLResponse(pages.picker(view), headers=signin_headers())

    @app.get("/refusal/{kind}")
    def refusal(kind: str, request: Request) -> Response:
        lang = lang_of(request)
        title, message, advice = refusal_text(kind, lang)
        view = RefusalView(lang, title, message, advice, other(request))
        return HTMLResponse(pages.refusal(view), status_code=403, headers=signin_headers())

    return app


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    port = free_port()
    with serving(demo_app(port), port):
        yield Site(f"http://127.0.0.1:{port}", f"http://localhost:{port}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def keep_both(pages: Pages, page: Any, name: str) -> None:
    """This page, then the same page in the other language through its own link."""
    pages.keep(page, name)
    first = page.get_attribute("html", "lang")
    page.locator("a.language-link").click()
    page.wait_for_load_state()
    assert page.get_attribute("html", "lang") == ("en" if first == "nb" else "nb")
    pages.keep(page, name)


@needs_chromium
def test_pages_in_chromium(browser: Any, site: Site) -> None:
    pages = Pages("signin")
    # JavaScript on for axe-core only: the pages have none (the form test below runs without it).
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    for who in ("patient", "clinician"):
        page.goto(f"{site.origin}/consent/{who}")
        keep_both(pages, page, f"consent {who}")
    page.goto(f"{site.origin}/pick")
    keep_both(pages, page, "picker")
    page.fill("#q", "kari")
    page.locator("form.search button").click()
    page.wait_for_load_state()
    assert page.locator("input[name=patient]").count() == 1
    page.goto(f"{site.origin}/pick?q=zed")
    pages.keep(page, "picker no match")
    page.goto(f"{site.origin}/pick?none=1&lang=en")
    pages.keep(page, "picker no patients")
    for kind in ("no-patient-match", "outside-care-team"):
        page.goto(f"{site.origin}/refusal/{kind}")
        keep_both(pages, page, f"refusal {kind}")
    context.close()
    assert not pages.violations, "\n".join(pages.violations)


@needs_chromium
def test_consent_form_posts_what_is_ticked(browser: Any, site: Site) -> None:
    context = browser.new_context(viewport=VIEWPORT, java_script_enabled=False)
    page = context.new_page()
    page.goto(f"{site.origin}/consent/patient")
    # Untick offline access by pressing its label, as a finger would, then allow.
    page.locator("label.option", has_text="Beholde tilgangen").click()
    assert not page.locator("input[value=offline_access]").is_checked()
    page.locator("button[value=allow]").click()
    page.wait_for_load_state()
    assert page.url.startswith(f"{site.app_origin}/callback")
    result = json.loads(page.locator("body").inner_text())
    assert result == {
        "decision": "allow",
        "scope": [
            "openid",
            "fhirUser",
            "patient/Observation.rs",
            "patient/QuestionnaireResponse.cruds",
            "patient/Observation.rs?category=survey",
        ],
        "csrf": "csrf-token-1",
    }
    # Without the app's origin in form-action the browser stops the redirect to the app.
    page.goto(f"{site.origin}/consent/patient?csp=strict")
    with page.expect_console_message(lambda m: "form-action" in m.text) as refused:
        page.locator("button[value=deny]").click()
    assert "Content Security Policy" in refused.value.text
    assert not page.url.startswith(site.app_origin)
    context.close()
