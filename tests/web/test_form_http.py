"""The patient's web form over HTTP (issue 15), on SQLite and PostgreSQL: personal links and their
refusals, the session cookie, CSRF, the security headers, autosave and resume, the language switch,
submission (scored, Task completed) and replays, the second step, and what the session cannot reach."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.web.pages import CSP
from fhir_norse.web.routes import COOKIE
from tests.tokens import bearer
from tests.web.support import PHQ9, FormSite, open_link, page_number, parse, site_of, walk

SECURITY = {
    "content-security-policy": CSP,
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}


def client_for(site: FormSite) -> TestClient:
    return TestClient(site.app, raise_server_exceptions=True)


def system(site: FormSite) -> TestClient:
    client = TestClient(site.app)
    client.headers.update(bearer(site.app))
    return client


def configured(site: FormSite, **overrides: Any) -> FormSite:
    """Another app on the same server and database, with the form installed under other settings."""
    settings = site.app.state.settings.model_copy(update=overrides)
    return site_of(create_app(settings, service=site.service, clock=site.clock), site.clock)


def secured(answer: Any) -> None:
    for name, value in SECURITY.items():
        assert answer.headers.get(name) == value, (name, answer.headers.get(name))


def opened(
    site: FormSite, questionnaire: str | None = None, **patient: Any
) -> tuple[TestClient, str, str, str]:
    patient_id = site.patient(**patient)
    task_id = site.task(patient_id, questionnaire) if questionnaire else site.task(patient_id)
    token = site.link(task_id, patient_id)
    client = client_for(site)
    answer = open_link(client, token)
    assert answer.status_code == 303, answer.text
    return client, patient_id, task_id, token


# ---------------------------------------------------------------------- opening a link


def test_a_valid_link_opens_a_session_cookie(site: FormSite) -> None:
    patient_id = site.patient()
    task_id = site.task(patient_id)
    token = site.link(task_id, patient_id)
    client = client_for(site)
    answer = open_link(client, token)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/form"
    secured(answer)
    cookie = answer.headers["set-cookie"]
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert attributes[0].startswith(f"{COOKIE}=")
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert "path=/form" in attributes
    assert "secure" not in attributes  # the patient origin is http in this test
    assert not any(a.startswith(("max-age", "expires")) for a in attributes)
    # The token is not the session: the cookie holds a secret of its own.
    assert token not in cookie
    first = client.get("/form", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/form/page/1"


def test_the_cookie_is_secure_on_an_https_origin(site: FormSite) -> None:
    other_site = configured(site, patient_base_url="https://survey.example.no")
    other = other_site.app
    patient_id = other_site.patient()
    token = other_site.link(other_site.task(patient_id), patient_id)
    answer = open_link(TestClient(other), token)
    assert "secure" in [p.strip().lower() for p in answer.headers["set-cookie"].split(";")]


def refused(site: FormSite, token: str, status: int, *words: str) -> None:
    client = client_for(site)
    answer = open_link(client, token)
    assert answer.status_code == status, answer.text
    assert "set-cookie" not in answer.headers
    secured(answer)
    page = parse(answer.text)
    assert page.lang == "nb"
    assert 'lang="en"' in answer.text  # the English line
    for word in words:
        assert word in answer.text


def test_refused_links_say_what_happened_and_what_to_do(site: FormSite) -> None:
    patient_id = site.patient()
    task_id = site.task(patient_id)
    token = site.link(task_id, patient_id, hours=1)
    refused(site, "x" * 43, 404, "kontakt klinikken din", "contact your clinic")
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    refused(site, tampered, 404, "Lenken virker ikke")
    refused(site, "short", 404)
    site.clock.advance(hours=2)
    refused(site, token, 410, "Lenken er utløpt", "The link has expired")
    site.clock.advance(hours=-2)
    revoked = site.link(task_id, patient_id)
    site.links.revoke(task_id)
    refused(site, revoked, 410, "trukket tilbake")
    refused(site, token, 410)  # revoked wins over anything else


def test_links_to_tasks_that_cannot_be_answered_are_refused(site: FormSite) -> None:
    patient_id = site.patient()
    cases = [
        (site.task(patient_id, status="completed"), 409, "allerede svart"),
        (site.task(patient_id, status="cancelled"), 410, "avlyst"),
        (site.task(patient_id, opens=timedelta(days=1)), 409, "ikke åpent ennå"),
        (site.task(patient_id, opens=timedelta(days=-3), closes=timedelta(hours=-1)), 410, "Fristen er ute"),
    ]
    for task_id, status, words in cases:
        refused(site, site.link(task_id, patient_id), status, words)


def test_refused_openings_are_audited(site: FormSite) -> None:
    refused(site, "y" * 43, 404)
    events = system(site).get("/fhir/AuditEvent?_count=200").json().get("entry", [])
    assert any("personal link unknown" in str(e["resource"].get("outcomeDesc", "")) for e in events), [
        e["resource"].get("outcomeDesc") for e in events
    ]


def test_failed_lookups_are_rate_limited_per_address(site: FormSite) -> None:
    limit = site.app.state.settings.link_failure_limit_per_minute
    client = client_for(site)
    for n in range(limit):
        assert open_link(client, f"{n:043d}").status_code == 404
    answer = open_link(client, "z" * 43)
    assert answer.status_code == 429
    assert int(answer.headers["retry-after"]) >= 1
    secured(answer)
    # While blocked, even a real link waits: guessing cannot be mixed with real openings.
    patient_id = site.patient()
    token = site.link(site.task(patient_id), patient_id)
    assert open_link(client, token).status_code == 429


# ---------------------------------------------------------------------- the session's reach


def test_the_session_cookie_reaches_no_fhir_endpoint(site: FormSite) -> None:
    client, patient_id, task_id, _ = opened(site)
    secret = client.cookies.get(COOKIE)
    assert secret
    for path in (f"/fhir/Patient/{patient_id}", f"/fhir/Task/{task_id}", "/fhir/QuestionnaireResponse"):
        # The cookie is scoped to /form; sent by hand it still authenticates nothing.
        answer = client.get(path, headers={"Cookie": f"{COOKIE}={secret}"})
        assert answer.status_code == 401, (path, answer.status_code)


def test_csrf_is_checked_on_every_post(site: FormSite) -> None:
    client, _, task_id, _ = opened(site)
    page = client.get("/form/page/1")
    radios = parse(page.text).radios
    answers = {name: options[0] for name, options in radios.items()}
    for data in ({**answers}, {**answers, "csrf": "forged"}):
        for path in ("/form/page/1", "/form/language", "/form/submit"):
            answer = client.post(path, data=data, follow_redirects=False)
            assert answer.status_code == 403, (path, answer.status_code)
            secured(answer)
    assert site.read("Task", task_id)["status"] == "requested"  # nothing was saved


def test_without_a_session_the_form_says_so(site: FormSite) -> None:
    client = client_for(site)
    for path in ("/form", "/form/page/1", "/form/review"):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 403
        secured(answer)
    client.cookies.set(COOKIE, "not-a-session", path="/form")
    assert client.get("/form/page/1").status_code == 403


def test_hidden_fields_and_urls_change_nothing_outside_the_task(site: FormSite) -> None:
    client, patient_id, task_id, _ = opened(site)
    other_patient = site.patient()
    other_task = site.task(other_patient)
    page = parse(client.get("/form/page/1").text)
    data = {name: options[0] for name, options in page.radios.items()}
    data |= {
        "csrf": page.csrf or "",
        "a:not-on-this-page": "1",
        "patient": other_patient,
        "task": other_task,
        "subject": f"Patient/{other_patient}",
    }
    answer = client.post("/form/page/1", data=data, follow_redirects=False)
    assert answer.status_code == 303
    assert site.read("Task", other_task)["status"] == "requested"
    task = site.read("Task", task_id)
    assert task["status"] == "in-progress"
    response_id = task["output"][0]["valueReference"]["reference"].split("/")[1]
    response = site.read("QuestionnaireResponse", response_id)
    assert response["subject"]["reference"] == f"Patient/{patient_id}"
    linkids = {i["linkId"] for group in response["item"] for i in group["item"]}
    assert "not-on-this-page" not in linkids
    # An answer that is not one of the options is refused, and a page that does not exist is 404.
    name = next(iter(page.radios))
    bad = client.post("/form/page/1", data={"csrf": page.csrf or "", name: "99"}, follow_redirects=False)
    assert bad.status_code == 422
    assert 'aria-invalid="true"' in bad.text
    assert client.get("/form/page/999").status_code == 404
    assert client.get("/form/page/abc").status_code == 404


# ---------------------------------------------------------------------- answering


def _response_of(site: FormSite, task_id: str) -> dict[str, Any]:
    task = site.read("Task", task_id)
    return site.read("QuestionnaireResponse", task["output"][0]["valueReference"]["reference"].split("/")[1])


def test_adaptive_form_autosaves_resumes_switches_language_and_submits(site: FormSite) -> None:
    client, patient_id, task_id, token = opened(site)
    pages = list(walk(client, stop_after=2))
    assert pages == ["/form/page/1", "/form/page/2"]
    task = site.read("Task", task_id)
    assert task["status"] == "in-progress"
    saved = _response_of(site, task_id)
    assert saved["status"] == "in-progress"
    assert saved["questionnaire"] == "#q"
    answered = {i["linkId"] for group in saved["item"] for i in group["item"]}
    assert len(answered) == 10

    # Closing the browser: a new client opens the same link and resumes at the first unanswered page.
    again = client_for(site)
    assert open_link(again, token).status_code == 303
    assert again.get("/form", follow_redirects=False).headers["location"] == "/form/page/3"
    # Page 1 keeps its answers; switched to English, the same answers show under English texts.
    before = parse(again.get("/form/page/1").text)
    assert before.lang == "nb" and len(before.checked) == 5
    csrf = before.csrf or ""
    switched = again.post("/form/language", data={"csrf": csrf, "language": "en", "next": "/form/page/1"})
    assert switched.status_code == 200
    after = parse(switched.text)
    assert after.lang == "en"
    assert after.checked == before.checked
    assert "I feel sad and low." in switched.text
    # An open redirect is not possible through the switch.
    away = again.post(
        "/form/language",
        data={"csrf": csrf, "language": "en", "next": "https://evil.example/"},
        follow_redirects=False,
    )
    assert away.headers["location"] == "/form"

    rest = list(walk(again))
    assert rest[-1] == "/form/review"
    secret = again.cookies.get(COOKIE) or ""
    review = again.get("/form/review")
    assert review.status_code == 200
    secured(review)
    assert "/form/page/1" in parse(review.text).links
    done = again.post("/form/submit", data={"csrf": parse(review.text).csrf or ""}, follow_redirects=False)
    assert done.status_code == 200, done.text
    assert "Thank you for your answers" in done.text
    secured(done)

    task = site.read("Task", task_id)
    assert task["status"] == "completed"
    response = _response_of(site, task_id)
    assert response["status"] == "completed"
    listing = system(site)
    observations = listing.get(f"/fhir/Observation?subject=Patient/{patient_id}&_count=200").json()
    assert observations.get("total", len(observations.get("entry", []))) or observations.get("entry")
    reports = listing.get(f"/fhir/DiagnosticReport?subject=Patient/{patient_id}").json()
    assert reports.get("entry"), reports

    # A second submit, or a replayed page, is refused and changes nothing.
    version = response["meta"]["versionId"]
    replay = again.post("/form/submit", data={"csrf": csrf}, follow_redirects=False)
    assert replay.status_code == 409
    assert "allerede svart" in replay.text and "already answered" in replay.text
    page_replay = again.post("/form/page/1", data={"csrf": csrf, "action": "next"}, follow_redirects=False)
    assert page_replay.status_code == 409
    # The old session secret, replayed by hand, opens nothing either.
    stolen = client_for(site)
    stolen.cookies.set(COOKIE, secret, path="/form")
    for path in ("/form/submit", "/form/page/1"):
        assert stolen.post(path, data={"csrf": csrf, "action": "next"}).status_code == 403
    assert _response_of(site, task_id)["meta"]["versionId"] == version
    # The link is used up.
    assert open_link(client_for(site), token).status_code == 409


def test_a_changed_trigger_answer_reopens_the_later_pages(site: FormSite) -> None:
    patient_id = site.patient()
    task_id = site.task(patient_id, context="weekly")
    client = client_for(site)
    open_link(client, site.link(task_id, patient_id))
    low = list(walk(client, lambda _l, o: "1" if "1" in o else o[0]))
    assert low[-1] == "/form/review"
    asked_low = _scale_items(_response_of(site, task_id))
    # Raising every trigger after the fact asks the scales they open instead.
    page = parse(client.get("/form/page/1").text)
    data = {"csrf": page.csrf or "", "action": "next", **{n: "7" for n in page.radios}}
    assert client.post("/form/page/1", data=data, follow_redirects=False).status_code == 303
    rest = list(walk(client, lambda _l, o: "7" if "7" in o else o[0]))
    assert rest[-1] == "/form/review"
    response = _response_of(site, task_id)
    pages = [p["linkId"] for p in response["contained"][0]["item"]]
    assert pages == ["page-triggers", "page-scales", "page-closing"]
    asked_high = _scale_items(response)
    assert asked_high != asked_low
    assert "sad-2" in asked_high and "sad-2" not in asked_low
    # Every question asked again is answered, and no answer is left for a question no longer asked.
    answered = {i["linkId"] for group in response["item"] for i in group["item"]}
    assert asked_high <= answered
    assert not (asked_low - asked_high) & answered


def _scale_items(response: dict[str, Any]) -> set[str]:
    pages = response["contained"][0]["item"]
    return {i["linkId"] for p in pages if p["linkId"] == "page-scales" for i in p["item"]}


def test_static_phq9_form_checks_required_answers_and_is_scored(site: FormSite) -> None:
    client, patient_id, task_id, _ = opened(site, PHQ9)
    page = client.get("/form/page/1")
    parsed = parse(page.text)
    assert "Over the last 2 weeks" in page.text
    # Nothing chosen: every required question says so, tied to its fieldset.
    missing = client.post(
        "/form/page/1", data={"csrf": parsed.csrf or "", "action": "next"}, follow_redirects=False
    )
    assert missing.status_code == 422
    assert 'aria-describedby="q1-error"' in missing.text and 'id="q1-error"' in missing.text
    pages = list(walk(client, lambda _l, o: o[1]))
    assert pages[-1] == "/form/review"
    review = client.get("/form/review")
    done = client.post("/form/submit", data={"csrf": parse(review.text).csrf or ""})
    assert done.status_code == 200
    assert site.read("Task", task_id)["status"] == "completed"
    observations = system(site).get(f"/fhir/Observation?subject=Patient/{patient_id}").json()
    assert observations.get("entry"), observations
    # No scores are shown to the patient unless the site enables it.
    assert "Resultatene" not in done.text and "results" not in done.text


def test_patient_communication_preselects_english(site: FormSite) -> None:
    language = {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en"}]}, "preferred": True}
    client, _, _, _ = opened(site, communication=[language])
    page = client.get("/form/page/1")
    assert parse(page.text).lang == "en"
    assert "I feel sad and low." in page.text


def test_every_use_is_audited_as_the_patient(site: FormSite) -> None:
    client, patient_id, task_id, _ = opened(site)
    list(walk(client, stop_after=1))
    events = system(site).get(f"/fhir/AuditEvent?patient=Patient/{patient_id}&_count=200").json()["entry"]
    by_patient = [
        e["resource"] for e in events if any("patient-link" in str(a) for a in e["resource"].get("agent", []))
    ]
    assert by_patient, [e["resource"]["agent"] for e in events]
    assert any(f"Task/{task_id}" in str(e.get("entity")) for e in by_patient)
    assert any("QuestionnaireResponse" in str(e.get("entity")) for e in by_patient)


# ---------------------------------------------------------------------- the second step


def test_birthdate_step(site: FormSite) -> None:
    site = configured(site, link_second_factor="birthdate")
    client, _, _, token = opened(site)
    assert client.get("/form", follow_redirects=False).headers["location"] == "/form/verify"
    assert client.get("/form/page/1", follow_redirects=False).headers["location"] == "/form/verify"
    page = client.get("/form/verify")
    csrf = parse(page.text).csrf or ""
    wrong = client.post("/form/verify", data={"csrf": csrf, "birthdate": "01.01.1990"})
    assert wrong.status_code == 422
    assert 'aria-describedby="birthdate-hint birthdate-error"' in wrong.text
    right = client.post(
        "/form/verify", data={"csrf": csrf, "birthdate": "31.01.1980"}, follow_redirects=False
    )
    assert right.headers["location"] == "/form"
    assert page_number(client.get("/form", follow_redirects=False).headers["location"]) == 1
    # Three wrong dates for one link (counted across its sessions: opening it again gives no more tries)
    # end the session.
    other = client_for(site)
    open_link(other, token)
    csrf = parse(other.get("/form/verify").text).csrf or ""
    for _ in range(1):
        assert other.post("/form/verify", data={"csrf": csrf, "birthdate": "02.02.1999"}).status_code == 422
    locked = other.post("/form/verify", data={"csrf": csrf, "birthdate": "02.02.1999"})
    assert locked.status_code == 403
    third = client_for(site)
    open_link(third, token)
    assert third.get("/form/verify").status_code == 403


def test_sms_code_step(site: FormSite) -> None:
    site = configured(site, link_second_factor="sms-code")
    mobile = "+4791234567"
    client, _, _, _ = opened(site, telecom=[{"system": "phone", "use": "mobile", "value": mobile}])
    assert site.sent_codes and site.sent_codes[-1][0] == mobile
    page = client.get("/form/verify")
    csrf = parse(page.text).csrf or ""
    assert (
        client.post(
            "/form/verify",
            data={"csrf": csrf, "code": "000000" if site.sent_codes[-1][1] != "000000" else "111111"},
        ).status_code
        == 422
    )
    resent = client.post("/form/verify/resend", data={"csrf": csrf})
    assert resent.status_code == 200 and len(site.sent_codes) == 2
    right = client.post(
        "/form/verify", data={"csrf": csrf, "code": site.sent_codes[-1][1]}, follow_redirects=False
    )
    assert right.headers["location"] == "/form"


def test_scores_are_shown_only_when_the_site_enables_it(site: FormSite) -> None:
    site = configured(site, patient_form_show_scores=True)
    client, _, task_id, _ = opened(site, PHQ9)
    assert list(walk(client, lambda _l, o: o[2]))[-1] == "/form/review"
    done = client.post("/form/submit", data={"csrf": parse(client.get("/form/review").text).csrf or ""})
    assert done.status_code == 200, done.text
    assert "Resultatene dine" in done.text or "Your results" in done.text
    assert site.read("Task", task_id)["status"] == "completed"
