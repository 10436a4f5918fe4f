"""The patient's web form (issue 15): a personal link opens a short browser session that can answer one
questionnaire Task, one screen at a time, in bokmål or English, without JavaScript.

Routes (all HTML, server-rendered; every POST carries the session's CSRF token):

===============================  ==========================================================================
``GET /p/{token}``               open a personal link: a session cookie, then 303 to ``/form``; refusals as
                                 plain pages (404 unknown, 410 expired/revoked/closed, 409 answered/not yet),
                                 failed look-ups rate-limited per address (429 with ``Retry-After``)
``GET /form``                    resume: the second step if one is due, else the first unanswered screen,
                                 else the review
``GET|POST /form/verify``        the site's second step (date of birth, or a one-time code by SMS)
``POST /form/verify/resend``     a new one-time code
``GET|POST /form/page/{n}``      screen ``n``; the POST saves the answers (autosave) and moves back or on
``POST /form/language``          switch between bokmål and English (remembered in the session)
``GET /form/review``             every answer, with links back to the screens
``POST /form/submit``            store the response completed (scored by the server), complete the Task,
                                 end the session, thank the patient
``GET /static/form/...``         the style sheet and the (optional) script
===============================  ==========================================================================

Every FHIR read and write goes through the repository as the patient (:func:`patient_caller`), so each
leaves the same AuditEvent a patient app's would; adaptive pages come from SDC ``$next-question``
(https://hl7.org/fhir/uv/sdc/STU3/OperationDefinition-Questionnaire-next-question.html) called in process;
the Task moves through the SDC questionnaire-task lifecycle
(https://hl7.org/fhir/uv/sdc/StructureDefinition-sdc-task.html) by :class:`Administrations`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_norse.adaptive.forms import PAGE_CLOSING
from fhir_norse.auth.audit import AUTHENTICATION, THROTTLED
from fhir_norse.auth.caller import Caller
from fhir_norse.auth.links import LinkSession, LinkState, PersonalLink, PersonalLinks
from fhir_norse.auth.ratelimit import SharedRateLimiter, retry_after_header
from fhir_norse.canonicals import CONTEXT_EXTENSION
from fhir_norse.config import Settings
from fhir_norse.logs import request_id
from fhir_norse.outcomes import FhirError
from fhir_norse.rom.administrations import Administrations, task_output, task_questionnaire, task_window
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.operations.registry import OperationCall
from fhir_norse.server.repository import Repository, loads
from fhir_norse.server.resources import instant, now_ms
from fhir_norse.server.search.typed import Where
from fhir_norse.web import forms
from fhir_norse.web.forms import FormView, Screen
from fhir_norse.web.pages import STATIC, Pages, secure

log = logging.getLogger(__name__)

__all__ = ["COOKIE", "PATIENT_SCOPES", "install_patient_form", "patient_caller"]

COOKIE = "fhir_norse_form"
# The cookie's value once the form was submitted (no secret: it only says "answered" to that browser).
DONE = "answered"
PATIENT_SCOPES = frozenset(
    {
        "patient/QuestionnaireResponse.cru",
        "patient/Questionnaire.r",
        "patient/Task.r",
        "patient/Patient.r",
    }
)
_MAX_FORM_BYTES = 64 * 1024
_NEXT_PATH = re.compile(r"/form(?:/(?:page/\d{1,4}|review|verify))?")
_BIRTHDATE_TRIES = 3
_CODE_SENDS_PER_10_MIN = 3


def patient_caller(session: LinkSession) -> Caller:
    """The caller a link session acts as: the patient, for that patient's compartment only."""
    patient = session.link.patient_id
    return Caller(
        client_id="patient-link",
        scopes=PATIENT_SCOPES,
        patient=patient,
        user=f"Patient/{patient}",
        token_id=f"link-session:{session.id}",
        source="link",
    )


def install_patient_form(
    app: FastAPI,
    service: FhirService,
    settings: Settings,
    *,
    links: PersonalLinks,
    administrations: Administrations,
    send_code: Callable[[str, str], None] | None = None,
    now: Callable[[], datetime] | None = None,
) -> None:
    """Mount ``GET /p/{token}``, the form's pages under ``/form/...`` and ``/static/form/...`` (module
    doc). ``send_code(patient_id, code)`` sends the one-time code of the "sms-code" second step;
    ``now`` (timezone-aware UTC) decides whether a Task's window is open (tests control it)."""
    form = PatientForm(
        service, settings, links, administrations, send_code, now or (lambda: datetime.now(UTC))
    )
    app.include_router(form.router())
    app.mount("/static/form", Secured(StaticFiles(directory=STATIC)), name="patient-form-static")


class Secured:
    """The static files with the pages' security headers (nosniff above all)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"cache-control", b"no-cache"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_secured)


@dataclass(slots=True)
class _Work:
    """What one request works on: the Task, its form, and the stored working response (if any)."""

    session: LinkSession
    secret: str
    ctx: RequestContext
    task: dict[str, Any]
    canonical: str
    questionnaire: dict[str, Any]
    response: dict[str, Any] | None  # as stored
    language: str

    @property
    def adaptive_form(self) -> bool:
        return any(
            e.get("url") == forms.SDC_ADAPTIVE and e.get("valueBoolean") is True
            for e in self.questionnaire.get("extension") or []
        )


class _Refusal(Exception):
    """A page to answer instead of going on."""

    def __init__(self, response: Response) -> None:
        self.response = response


class PatientForm:
    def __init__(
        self,
        service: FhirService,
        settings: Settings,
        links: PersonalLinks,
        administrations: Administrations,
        send_code: Callable[[str, str], None] | None,
        now: Callable[[], datetime],
    ) -> None:
        self.service = service
        self.settings = settings
        self.links = links
        self.administrations = administrations
        self.send_code = send_code
        self.now = now
        self.pages = Pages()
        engine = service.storage.engine
        self.link_failures = SharedRateLimiter(engine, "link-address", settings.link_failure_limit_per_minute)
        self.birthdate_failures = SharedRateLimiter(engine, "link-birthdate", _BIRTHDATE_TRIES, 24 * 3600.0)
        self.code_sends = SharedRateLimiter(engine, "link-code-send", _CODE_SENDS_PER_10_MIN, 600.0)
        self.secure_cookie = settings.patient_origin().startswith("https://")

    # ------------------------------------------------------------------ routes
    def router(self) -> APIRouter:
        router = APIRouter(include_in_schema=False)
        router.add_api_route("/p/{token}", self.open_link, methods=["GET"])
        router.add_api_route("/form", self.resume, methods=["GET"])
        router.add_api_route("/form/verify", self.verify_page, methods=["GET"])
        router.add_api_route("/form/verify", self.verify, methods=["POST"])
        router.add_api_route("/form/verify/resend", self.resend_code, methods=["POST"])
        router.add_api_route("/form/page/{number}", self.show_page, methods=["GET"])
        router.add_api_route("/form/page/{number}", self.post_page, methods=["POST"])
        router.add_api_route("/form/language", self.switch_language, methods=["POST"])
        router.add_api_route("/form/review", self.review, methods=["GET"])
        router.add_api_route("/form/submit", self.submit, methods=["POST"])
        return router

    async def open_link(self, request: Request, token: str) -> Response:
        return await self._guarded(self._open_link, request, token)

    async def resume(self, request: Request) -> Response:
        return await self._guarded(self._resume, request)

    async def verify_page(self, request: Request) -> Response:
        return await self._guarded(self._verify_page, request)

    async def verify(self, request: Request) -> Response:
        fields = await _form(request)
        return await self._guarded(self._verify, request, fields)

    async def resend_code(self, request: Request) -> Response:
        fields = await _form(request)
        return await self._guarded(self._resend_code, request, fields)

    async def show_page(self, request: Request, number: str) -> Response:
        return await self._guarded(self._show_page, request, number)

    async def post_page(self, request: Request, number: str) -> Response:
        fields = await _form(request)
        return await self._guarded(self._post_page, request, number, fields)

    async def switch_language(self, request: Request) -> Response:
        fields = await _form(request)
        return await self._guarded(self._switch_language, request, fields)

    async def review(self, request: Request) -> Response:
        return await self._guarded(self._review, request)

    async def submit(self, request: Request) -> Response:
        fields = await _form(request)
        return await self._guarded(self._submit, request, fields)

    async def _guarded(self, handler: Callable[..., Response], request: Request, *args: Any) -> Response:
        """Run a handler off the event loop; a refusal is its page, any other failure a plain 500 page
        (never the API's OperationOutcome: a patient is reading this)."""
        try:
            return await run_in_threadpool(handler, request, *args)
        except _Refusal as refusal:
            return refusal.response
        except _BadForm:
            return self.pages.message("forbidden", status=400)
        except Exception:
            log.exception("patient form: %s %s failed", request.method, request.url.path)
            return self.pages.message("error", status=500)

    # ------------------------------------------------------------------ opening a link
    def _open_link(self, request: Request, token: str) -> Response:
        address = _address(request)
        key = address or "unknown"
        wait = self.link_failures.blocked(key)
        if wait is not None:
            self._audit_refusal(request, THROTTLED, "429: too many failed personal link look-ups")
            return self.pages.message(
                "throttled", status=429, headers={"Retry-After": retry_after_header(wait)}
            )
        state, link = self.links.lookup(token)
        if state is not LinkState.VALID or link is None:
            if state is LinkState.UNKNOWN:
                # Only guesses are counted: opening a real but used-up link again is no attack.
                self.link_failures.hit(key)
            status, page = {
                "expired": (410, "expired"),
                "revoked": (410, "revoked"),
                "completed": (409, "answered"),
            }.get(str(state), (404, "unknown"))
            self._audit_refusal(request, AUTHENTICATION, f"{status}: personal link {state}")
            return self.pages.message(page, status=status)
        return self._start_session(request, link)

    def _start_session(self, request: Request, link: PersonalLink) -> Response:
        verified = self.settings.link_second_factor == "none"
        secret = self.links.open_session(link, verified=verified)
        session = self.links.session(secret)
        if session is None:  # revoked or completed between the look-up and now
            return self.pages.message("session", status=409)
        ctx = self._context(request, session)
        with self.service.audited_session(ctx, "read", "Task", link.task_id, read_only=True) as repo:
            task = loads(repo.read("Task", link.task_id).body_text)
            patient = loads(repo.read("Patient", link.patient_id).body_text)
        refusal = self._task_refusal(task, "nb")
        if refusal is not None:
            self.links.end_session(secret)
            return refusal
        self.links.set_language(secret, _preferred_language(patient))
        if self.settings.link_second_factor == "sms-code":
            self._send_code(secret, link.patient_id)
        response = RedirectResponse("/form", status_code=303)
        response.set_cookie(
            COOKIE, secret, path="/form", httponly=True, samesite="strict", secure=self.secure_cookie
        )
        return secure(response)

    def _task_refusal(self, task: Mapping[str, Any], language: str) -> Response | None:
        status = self.administrations.open_status(task, self.now())
        if status is None:
            return None
        if status == "not-yet":
            start = task_window(task)[0]
            if start is not None:
                when = start.astimezone().strftime("%d.%m.%Y %H:%M")
                return self.pages.message("not_yet", status=409, language=language, start=when)
            return self.pages.message("not_yet", status=409, language=language, start="")
        page, code = {
            "completed": ("answered", 409),
            "cancelled": ("cancelled", 410),
            "failed": ("closed", 410),
            "closed": ("closed", 410),
        }.get(status, ("closed", 410))
        return self.pages.message(page, status=code, language=language)

    def _audit_refusal(self, request: Request, kind: str, reason: str) -> None:
        refusals = getattr(request.app.state, "refusal_audit", None)
        if refusals is not None:
            refusals.write(refusals.authentication_refused(kind, _address(request), reason, request_id.get()))

    # ------------------------------------------------------------------ sessions
    def _session(self, request: Request, *, verified: bool = True) -> tuple[LinkSession, str]:
        secret = request.cookies.get(COOKIE)
        if secret == DONE:
            raise _Refusal(self.pages.message("answered", status=409))
        session = self.links.session(secret) if secret else None
        if session is None or secret is None:
            raise _Refusal(self.pages.message("session", status=403))
        if verified and not session.verified:
            raise _Refusal(_redirect("/form/verify"))
        return session, secret

    def _posted(
        self, request: Request, fields: Mapping[str, str], *, verified: bool = True
    ) -> tuple[LinkSession, str]:
        session, secret = self._session(request, verified=verified)
        if not self.links.check_csrf(secret, fields.get("csrf", "")):
            raise _Refusal(self.pages.message("forbidden", status=403, language=_language(session)))
        return session, secret

    def _context(self, request: Request, session: LinkSession) -> RequestContext:
        return RequestContext(
            caller=patient_caller(session),
            base_url=self.settings.fhir_base_url(),
            source_address=_address(request),
            request_id=request_id.get(),
        )

    # ------------------------------------------------------------------ the second step
    def _verify_page(self, request: Request) -> Response:
        session, secret = self._session(request, verified=False)
        if session.verified:
            return _redirect("/form")
        return self._render_verify(session, secret, None)

    def _render_verify(
        self,
        session: LinkSession,
        secret: str,
        error: str | None,
        *,
        status: int = 200,
        note: str | None = None,
    ) -> Response:
        language = _language(session)
        if self.settings.link_second_factor == "birthdate" and self.birthdate_failures.blocked(
            session.link.id
        ):
            self.links.end_session(secret)
            return self._clear(self.pages.message("locked", status=403, language=language))
        return self.pages.render(
            "verify.html",
            language,
            status=status,
            method=self.settings.link_second_factor,
            error=error,
            note=note,
            csrf=self.links.csrf_token(secret),
            here="/form/verify",
        )

    def _verify(self, request: Request, fields: Mapping[str, str]) -> Response:
        session, secret = self._posted(request, fields, verified=False)
        if session.verified:
            return _redirect("/form")
        if self.settings.link_second_factor == "sms-code":
            if self.links.check_code(secret, fields.get("code", "").strip().replace(" ", "")):
                return _redirect("/form")
            return self._render_verify(session, secret, "code_wrong", status=422)
        link = session.link
        if self.birthdate_failures.blocked(link.id):
            return self._render_verify(session, secret, None)
        given = _parse_date(fields.get("birthdate", ""))
        with self.service.audited_session(
            self._context(request, session), "read", "Patient", link.patient_id, read_only=True
        ) as repo:
            patient = loads(repo.read("Patient", link.patient_id).body_text)
        if given is not None and given.isoformat() == str(patient.get("birthDate") or ""):
            self.links.mark_verified(secret)
            return _redirect("/form")
        self.birthdate_failures.hit(link.id)
        return self._render_verify(session, secret, "birthdate_wrong", status=422)

    def _resend_code(self, request: Request, fields: Mapping[str, str]) -> Response:
        session, secret = self._posted(request, fields, verified=False)
        if session.verified or self.settings.link_second_factor != "sms-code":
            return _redirect("/form")
        sent = self._send_code(secret, session.link.patient_id)
        return self._render_verify(
            session, secret, None if sent else "code_wrong", note="code_sent" if sent else None
        )

    def _send_code(self, secret: str, patient_id: str) -> bool:
        if self.send_code is None:
            log.error("link_second_factor is sms-code but no send_code is configured")
            return False
        session = self.links.session(secret)
        if session is None or self.code_sends.hit(session.link.id) is not None:
            return False
        self.send_code(patient_id, self.links.issue_code(secret))
        return True

    # ------------------------------------------------------------------ loading the work
    def _load(self, request: Request, session: LinkSession, secret: str) -> _Work:
        """The Task, its Questionnaire and the working response, read as the patient (audited)."""
        ctx = self._context(request, session)
        link = session.link
        language = _language(session)
        with self.service.audited_session(ctx, "read", "Task", link.task_id, read_only=True) as repo:
            task = loads(repo.read("Task", link.task_id).body_text)
            refusal = self._task_refusal(task, language)
            if refusal is not None:
                raise _Refusal(refusal)
            canonical = task_questionnaire(task)
            if canonical is None:
                raise _Refusal(self.pages.message("error", status=500, language=language))
            questionnaire = _resolve(repo, canonical)
            if questionnaire is None:
                raise _Refusal(self.pages.message("error", status=500, language=language))
            response = None
            reference = task_output(task)
            if reference is not None:
                response = loads(repo.read("QuestionnaireResponse", reference.split("/", 1)[1]).body_text)
                if response.get("status") != "in-progress":
                    raise _Refusal(self.pages.message("answered", status=409, language=language))
        return _Work(session, secret, ctx, task, canonical, questionnaire, response, language)

    def _working(self, work: _Work) -> dict[str, Any]:
        """The stored working response, or a new one (the first page of an adaptive form)."""
        if work.response is not None:
            return work.response
        patient = {"reference": f"Patient/{work.session.link.patient_id}"}
        start: dict[str, Any] = {
            "resourceType": "QuestionnaireResponse",
            "status": "in-progress",
            "questionnaire": work.canonical,
            "subject": patient,
            "author": patient,
            "source": patient,
        }
        # The administration context the Task was scheduled for (intake, weekly, termination) decides
        # what an adaptive form asks; the response carries it as the Task does.
        context = [e for e in work.task.get("extension") or [] if e.get("url") == CONTEXT_EXTENSION]
        if context:
            start["extension"] = context[:1]
        if work.adaptive_form:
            return self._next_question(work, start)
        return start

    def _next_question(self, work: _Work, response: Mapping[str, Any]) -> dict[str, Any]:
        call = OperationCall(ctx=work.ctx, res_type="Questionnaire", body=dict(response))
        result = self.service.invoke(call, "next-question", method="POST")
        if result.body is None:
            raise FhirError("$next-question answered no response")
        return dict(result.body)

    def _save(self, work: _Work, response: dict[str, Any]) -> dict[str, Any]:
        """Store the working response in progress: created on the first save (and the Task started),
        updated after."""
        body = dict(response)
        body["status"] = "in-progress"
        task_id = work.session.link.task_id
        with self.service.audited_session(work.ctx, "update", "QuestionnaireResponse") as repo:
            if body.get("id"):
                outcome = repo.update("QuestionnaireResponse", str(body["id"]), body)
            else:
                current = loads(repo.read("Task", task_id).body_text)
                existing = task_output(current)
                if existing is not None:  # another tab saved first: continue that response
                    body["id"] = existing.split("/", 1)[1]
                    outcome = repo.update("QuestionnaireResponse", body["id"], body)
                else:
                    outcome = repo.create("QuestionnaireResponse", body)
                    self.administrations.start(
                        repo, task_id, f"QuestionnaireResponse/{outcome.stored.res_id}"
                    )
        work.response = loads(outcome.stored.body_text) if outcome.body is None else dict(outcome.body)
        return work.response

    # ------------------------------------------------------------------ screens
    def _view(self, work: _Work, response: Mapping[str, Any]) -> FormView:
        return forms.build_view(work.questionnaire, response, work.language)

    def _resume(self, request: Request) -> Response:
        session, secret = self._session(request)
        work = self._load(request, session, secret)
        response = self._working(work)
        view = self._view(work, response)
        first = view.first_unanswered()
        if first is not None:
            return _redirect(f"/form/page/{first.number}")
        if view.adaptive and work.response is not None:
            more = self._next_question(work, response)
            if more.get("status") == "in-progress":
                saved = self._save(work, more)
                after = self._view(work, saved)
                return _redirect(f"/form/page/{min(len(view.screens) + 1, len(after.screens))}")
        return _redirect("/form/review")

    def _show_page(self, request: Request, number: str) -> Response:
        session, secret = self._session(request)
        work = self._load(request, session, secret)
        response = self._working(work)
        view = self._view(work, response)
        screen = view.screen(_number(number))
        if screen is None:
            return self.pages.message("not_found", status=404, language=work.language, link="/form")
        return self._render_screen(work, view, screen, {}, response)

    def _render_screen(
        self,
        work: _Work,
        view: FormView,
        screen: Screen,
        errors: Mapping[str, str],
        response: Mapping[str, Any],
        *,
        status: int = 200,
    ) -> Response:
        known = len(view.screens)
        final = not view.adaptive or PAGE_CLOSING in forms.pages_delivered(response)
        total = known if final else known + 1
        return self.pages.render(
            "page.html",
            work.language,
            status=status,
            view=view,
            screen=screen,
            errors=errors,
            total=total,
            final=final,
            last=screen.number == known,
            csrf=self.links.csrf_token(work.secret),
            here=f"/form/page/{screen.number}",
        )

    def _post_page(self, request: Request, number: str, fields: Mapping[str, str]) -> Response:
        session, secret = self._posted(request, fields)
        work = self._load(request, session, secret)
        response = self._working(work)
        view = self._view(work, response)
        screen = view.screen(_number(number))
        if screen is None:
            return self.pages.message("not_found", status=404, language=work.language, link="/form")
        action = fields.get("action", "next")
        changes: dict[str, str | None] = {}
        errors: dict[str, str] = {}
        for question in screen.questions:
            given = fields.get(f"a:{question.link_id}")
            if not given:
                if question.required and question.answer is None and action != "back":
                    errors[question.link_id] = "required"
                continue
            if question.option(given) is None:
                errors[question.link_id] = "invalid"
            elif given != question.answer:
                changes[question.link_id] = given
        if errors and action != "back":
            return self._render_screen(work, view, screen, errors, response, status=422)
        updated = forms.with_answers(work.questionnaire, response, changes)
        if view.adaptive and changes:
            updated = self._redeliver(work, response, updated, changes)
        if changes or work.response is None:
            updated = self._save(work, updated)
        if action == "back":
            return _redirect(f"/form/page/{max(1, screen.number - 1)}")
        after = self._view(work, updated)
        if screen.number < len(after.screens):
            return _redirect(f"/form/page/{screen.number + 1}")
        if after.adaptive:
            more = self._next_question(work, updated)
            if more.get("status") == "in-progress":
                self._save(work, more)
                return _redirect(f"/form/page/{screen.number + 1}")
        return _redirect("/form/review")

    def _redeliver(
        self,
        work: _Work,
        before: Mapping[str, Any],
        updated: dict[str, Any],
        changes: Mapping[str, str | None],
    ) -> dict[str, Any]:
        """An answer changed on an adaptive page that later pages were chosen after (a trigger decides
        which scales are asked): those pages are dropped and asked of ``$next-question`` again, and the
        answers given to questions that come back are kept."""
        pages = forms.pages_delivered(updated)
        changed = [p for p in (forms.page_of(updated, link_id) for link_id in changes) if p is not None]
        if not changed or min(changed) >= len(pages) - 1:
            return updated
        kept = min(changed) + 1
        old = forms.answers_of(before)
        result = forms.truncate_pages(updated, kept)
        for _ in range(len(pages) - kept):
            more = self._next_question(work, result)
            if more.get("status") != "in-progress":
                break
            new_page = forms.pages_delivered(more)[-1]
            form = forms.contained_form(more) or {}
            asked = {
                str(i.get("linkId"))
                for p in form.get("item") or []
                if p.get("linkId") == new_page
                for i in p.get("item") or []
            }
            again = {k: str(v.get("code")) for k, v in old.items() if k in asked}
            result = forms.with_answers(work.questionnaire, more, again)
        return result

    # ------------------------------------------------------------------ language
    def _switch_language(self, request: Request, fields: Mapping[str, str]) -> Response:
        _, secret = self._posted(request, fields, verified=False)
        language = fields.get("language", "")
        if language in forms.LANGUAGES:
            self.links.set_language(secret, language)
        target = fields.get("next", "/form")
        return _redirect(target if _NEXT_PATH.fullmatch(target) else "/form")

    # ------------------------------------------------------------------ review and submit
    def _review(self, request: Request) -> Response:
        session, secret = self._session(request)
        work = self._load(request, session, secret)
        response = self._working(work)
        view = self._view(work, response)
        missing = _missing_required(view)
        return self.pages.render(
            "review.html",
            work.language,
            view=view,
            missing=missing,
            csrf=self.links.csrf_token(secret),
            here="/form/review",
        )

    def _submit(self, request: Request, fields: Mapping[str, str]) -> Response:
        session, secret = self._posted(request, fields)
        work = self._load(request, session, secret)
        if work.response is None:
            return _redirect("/form")
        response = work.response
        view = self._view(work, response)
        missing = _missing_required(view)
        if missing is not None:
            return _redirect(f"/form/page/{missing.number}")
        if view.adaptive:
            final = self._next_question(work, response)
            if final.get("status") == "in-progress":  # a page is still to come
                self._save(work, final)
                return _redirect(f"/form/page/{len(view.screens) + 1}")
        else:
            final = forms.with_answers(work.questionnaire, response, {})
            final["status"] = "completed"
            final["authored"] = instant(now_ms())
        final["status"] = "completed"
        response_id = str(response["id"])
        final["id"] = response_id
        reference = f"QuestionnaireResponse/{response_id}"
        task_id = session.link.task_id
        with self.service.audited_session(work.ctx, "update", "QuestionnaireResponse", response_id) as repo:
            current = repo.read("QuestionnaireResponse", response_id)
            if loads(current.body_text).get("status") != "in-progress":
                raise _Refusal(self.pages.message("answered", status=409, language=work.language))
            repo.update("QuestionnaireResponse", response_id, final)
            self.administrations.complete(repo, task_id, reference)
        self.links.end_session(secret)
        scores = self._scores(work.ctx, response_id) if self.settings.patient_form_show_scores else []
        page = self.pages.render("thanks.html", work.language, scores=scores)
        page.set_cookie(
            COOKIE, DONE, path="/form", httponly=True, samesite="strict", secure=self.secure_cookie
        )
        return page

    def _scores(self, ctx: RequestContext, response_id: str) -> list[tuple[str, str]]:
        """The scores derived from the response (Observation.derivedFrom), as label and value: read after
        the submission committed (showing them can never undo it), by the server on the patient's behalf
        (the patient's scopes name no Observation) and audited as the patient's search."""
        query = f"derived-from=QuestionnaireResponse/{response_id}"
        try:
            with self.service.audited_session(ctx, "search-type", "Observation", query=query) as repo:
                where = Where(
                    "Observation", references={"derived-from": f"QuestionnaireResponse/{response_id}"}
                )
                found = [loads(s.body_text) for s in repo.as_server().find(where, 100)]
                repo.audit(
                    "search-type",
                    "Observation",
                    query=f"Observation?{query}",
                    patients=[ctx.caller.patient or ""],
                )
        except FhirError:
            log.exception(
                "patient form: the scores of QuestionnaireResponse/%s could not be read", response_id
            )
            return []
        out = []
        for obs in found:
            code = obs.get("code") or {}
            codings = code.get("coding") or []
            label = code.get("text") or next((c.get("display") for c in codings if c.get("display")), None)
            value = (obs.get("valueQuantity") or {}).get("value")
            if label and value is not None:
                out.append((str(label), str(value)))
        return sorted(out)

    def _clear(self, response: Response) -> Response:
        response.delete_cookie(
            COOKIE, path="/form", httponly=True, samesite="strict", secure=self.secure_cookie
        )
        return response


# ---------------------------------------------------------------------- helpers


class _BadForm(Exception):
    """The request body is not a form this server sent."""


async def _form(request: Request) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` POST (the only kind the pages send), under a
    small size limit. A field given twice keeps its first value."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise _BadForm()
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            raise _BadForm()
    fields: dict[str, str] = {}
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=500)
    except (UnicodeDecodeError, ValueError):
        raise _BadForm() from None
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


def _redirect(path: str) -> Response:
    return secure(RedirectResponse(path, status_code=303))


def _address(request: Request) -> str | None:
    return request.client.host if request.client else None


def _number(text: str) -> int:
    return int(text) if text.isdigit() and len(text) <= 4 else 0


def _language(session: LinkSession) -> str:
    return session.language if session.language in forms.LANGUAGES else "nb"


def _preferred_language(patient: Mapping[str, Any]) -> str:
    """Bokmål unless the patient's preferred (or only) communication language is English."""
    entries = [c for c in patient.get("communication") or [] if isinstance(c, dict)]
    entries.sort(key=lambda c: not c.get("preferred"))
    for entry in entries:
        for coding in (entry.get("language") or {}).get("coding") or []:
            code = str(coding.get("code") or "").lower().split("-")[0]
            if code == "en":
                return "en"
            if code in ("nb", "no", "nn"):
                return "nb"
    return "nb"


def _parse_date(text: str) -> date | None:
    """A date as a patient types it: 31.01.1980, 31/01/1980, 31-01-1980 or 1980-01-31."""
    text = text.strip()
    iso = re.fullmatch(r"(\d{4})-(\d{1,2})-(\d{1,2})", text)
    local = re.fullmatch(r"(\d{1,2})[./\- ](\d{1,2})[./\- ](\d{4})", text)
    compact = re.fullmatch(r"(\d{2})(\d{2})(\d{4})", text)
    try:
        if iso:
            return date(int(iso[1]), int(iso[2]), int(iso[3]))
        if local:
            return date(int(local[3]), int(local[2]), int(local[1]))
        if compact:
            return date(int(compact[3]), int(compact[2]), int(compact[1]))
    except ValueError:
        return None
    return None


def _resolve(repo: Repository, canonical: str) -> dict[str, Any] | None:
    """The Questionnaire a canonical names (``url|version``; the newest version without one)."""
    url, _, version = canonical.partition("|")
    where = Where("Questionnaire", uris={"url": url}, tokens={"version": version} if version else {})
    # A definition, not patient data (and a patient/Questionnaire.r scope reads, it does not search).
    found = [loads(s.body_text) for s in repo.as_server().find(where, 50)]
    if not found:
        return None
    return max(found, key=lambda q: _version_key(str(q.get("version") or "")))


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _missing_required(view: FormView) -> Screen | None:
    return next((s for s in view.screens if any(q.required and q.answer is None for q in s.questions)), None)
