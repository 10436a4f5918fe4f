"""The clinician's feedback report in the browser (issue 17), as a SMART app this server ships.

The report is launched the way an EHR launches any SMART app (https://hl7.org/fhir/smart-app-launch/):
the EHR asks ``POST /auth/launch`` for a handle and opens ``/report/launch?iss=<FHIR base>&launch=<handle>``;
a clinician opens ``/report/`` on their own (standalone launch: sign in at HelseID, choose one of their
patients) or ``/report/caseload``. The app is the public client ``fhir-norse-report`` (registered at
start-up under that fixed id; an operator may revoke it like any app): it sends the browser through
``/auth/authorize`` with PKCE, takes the code back at ``/report/callback`` and exchanges it in process.

Its session is the access token and the ``online_access`` refresh token in two cookies (``HttpOnly``,
``SameSite=Lax``, path ``/report``, ``Secure`` on https): they end with the clinician's sign-in session
here, and every page reads the record through the repository as that token's caller, so scopes and care
teams decide what it shows exactly as for any other app (a patient out of the clinician's reach is 404,
as if absent; a patient's token gets no report). Opening a report is an AuditEvent (``operation:report``).

=========================================  ==================================================================
``GET /report/launch?iss=&launch=``        EHR launch
``GET /report/``                           standalone launch (sign in, pick a patient)
``GET /report/caseload``                   the clinician's patients (sign in first if needed)
``GET /report/callback``                   the code comes back; then the report or the caseload
``GET /report/Patient/{id}``               the report (``administration=<DiagnosticReport id>``, ``all=1``
                                           for every scale, ``lang=nb|en``)
``GET /report/Patient/{id}/report.pdf``    the same as an A4 PDF
=========================================  ==================================================================
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from fhir_norse.api.browser import Lang, display_name, other_lang, preferred_lang, set_private_cookie
from fhir_norse.api.deps import base_url, client_address
from fhir_norse.auth.caller import Caller
from fhir_norse.auth.clients import Client, ClientRegistry
from fhir_norse.auth.grants import Grants
from fhir_norse.auth.tokens import OAuthError, TokenVerifier, server_root
from fhir_norse.config import Settings
from fhir_norse.logs import request_id
from fhir_norse.outcomes import FhirError, NotFound, Unauthorized
from fhir_norse.rom.report import assemble_report, caseload
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.web.report import STATIC as REPORT_STATIC
from fhir_norse.web.report import ReportPages
from fhir_norse.web.routes import Secured
from fhir_norse.web.signin import RefusalView, SigninPages, refusal_text

log = logging.getLogger(__name__)

__all__ = ["REPORT_CLIENT_ID", "install_report"]

REPORT_CLIENT_ID = "fhir-norse-report"
REPORT_APP_NAME = "Tilbakemeldingsrapport / Feedback report"
TOKEN_COOKIE = "fhir_norse_report"
REFRESH_COOKIE = "fhir_norse_report_refresh"
LOGIN_COOKIE = "fhir_norse_report_login"
COOKIE_PATH = "/report"
# What the report app may ask for: the EHR's context, who signs in, reading their patients' records.
REPORT_SCOPES = "launch launch/patient openid fhirUser patient/*.rs user/*.rs online_access"
EHR_SCOPES = "launch openid fhirUser patient/*.rs user/*.rs online_access"
PATIENT_SCOPES = "launch/patient openid fhirUser patient/*.rs user/*.rs online_access"
CASELOAD_SCOPES = "openid fhirUser user/*.rs online_access"


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class ReportApp:
    """The routes of the module doc."""

    def __init__(
        self,
        service: FhirService,
        settings: Settings,
        clients: ClientRegistry,
        grants: Grants,
        verifier: TokenVerifier,
        now: Callable[[], datetime],
    ) -> None:
        self.service = service
        self.settings = settings
        self.clients = clients
        self.grants = grants
        self.verifier = verifier
        self.now = now
        self.pages = ReportPages()
        self.signin_pages = SigninPages()

    def router(self) -> APIRouter:
        router = APIRouter(include_in_schema=False)
        router.add_api_route("/report/launch", self.launch, methods=["GET"], response_model=None)
        router.add_api_route("/report/", self.standalone, methods=["GET"], response_model=None)
        router.add_api_route("/report/caseload", self.caseload, methods=["GET"], response_model=None)
        router.add_api_route("/caseload", self.to_caseload, methods=["GET"], response_model=None)
        router.add_api_route("/report/callback", self.callback, methods=["GET"], response_model=None)
        router.add_api_route(
            "/report/Patient/{patient_id}", self.report, methods=["GET"], response_model=None
        )
        router.add_api_route(
            "/report/Patient/{patient_id}/report.pdf", self.report_pdf, methods=["GET"], response_model=None
        )
        return router

    # ------------------------------------------------------------------ helpers
    def _root(self, request: Request) -> str:
        return server_root(base_url(request))

    def _redirect_uri(self, request: Request) -> str:
        return self._root(request) + "/report/callback"

    def _cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        set_private_cookie(response, self.settings, name, value, path=COOKIE_PATH, max_age=max_age)

    @staticmethod
    def _lang(request: Request) -> Lang:
        return preferred_lang(request)

    def _refusal(self, request: Request, kind: str, status: int) -> Response:
        lang = self._lang(request)
        title, message, advice = refusal_text(kind, lang)
        other = other_lang(lang)
        view = RefusalView(
            lang=lang,
            title=title,
            message=message,
            advice=advice,
            other_lang_url=f"{request.url.path}?{urlencode({'lang': other})}",
        )
        return HTMLResponse(self.signin_pages.refusal(view), status_code=status, headers=self.pages.headers)

    def _authorize(self, request: Request, scope: str, launch: str | None, back: str) -> Response:
        """Send the browser through our own authorization endpoint, as any SMART app would."""
        verifier, challenge = _pkce()
        state = secrets.token_urlsafe(24)
        params = {
            "response_type": "code",
            "client_id": REPORT_CLIENT_ID,
            "redirect_uri": self._redirect_uri(request),
            "scope": scope,
            "state": state,
            "aud": base_url(request),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "lang": self._lang(request),
        }
        if launch:
            params["launch"] = launch
        response = RedirectResponse(
            f"{self._root(request)}/auth/authorize?{urlencode(params)}", status_code=303
        )
        login = json.dumps({"state": state, "verifier": verifier, "back": back}, separators=(",", ":"))
        self._cookie(response, LOGIN_COOKIE, base64.urlsafe_b64encode(login.encode()).decode(), 600)
        return response

    def _client(self) -> Client | None:
        client = self.clients.get(REPORT_CLIENT_ID)
        return client if client is not None and client.active else None

    # ------------------------------------------------------------------ launches
    async def launch(self, request: Request) -> Response:
        """EHR launch: ``iss`` must be this server's FHIR base; ``launch`` is the EHR's handle."""
        iss = request.query_params.get("iss", "").rstrip("/")
        handle = request.query_params.get("launch", "")
        if iss != base_url(request) or not handle:
            return self._refusal(request, "launch-invalid", 400)
        return self._authorize(request, EHR_SCOPES, handle, "")

    async def to_caseload(self, request: Request) -> Response:
        return RedirectResponse("/report/caseload", status_code=303)

    async def standalone(self, request: Request) -> Response:
        return self._authorize(request, PATIENT_SCOPES, None, "")

    async def callback(self, request: Request) -> Response:
        raw = request.cookies.get(LOGIN_COOKIE, "")
        try:
            login = json.loads(base64.urlsafe_b64decode(raw.encode()).decode())
        except (ValueError, UnicodeDecodeError):
            login = None
        query = request.query_params
        if not isinstance(login, dict) or not secrets.compare_digest(
            str(login.get("state")), query.get("state", "")
        ):
            return self._refusal(request, "session-mismatch", 400)
        if query.get("error") or not query.get("code"):
            return self._refusal(request, "login-failed", 403)
        client = await run_in_threadpool(self._client)
        if client is None:
            return self._refusal(request, "app-revoked", 403)
        try:
            grant = await run_in_threadpool(
                self.grants.exchange_code,
                client,
                query["code"],
                self._redirect_uri(request),
                str(login.get("verifier", "")),
                base_url(request),
            )
        except OAuthError as error:
            log.info("report: the code exchange was refused: %s", error.description)
            return self._refusal(request, "request-expired", 400)
        body = grant.response
        back = str(login.get("back") or "")
        if back.startswith("/report/") and "//" not in back:
            target = back
        elif body.get("patient"):
            target = f"/report/Patient/{quote(str(body['patient']))}"
        else:
            target = "/report/caseload"
        response = RedirectResponse(target, status_code=303)
        response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
        self._cookie(response, TOKEN_COOKIE, str(body["access_token"]), int(body.get("expires_in", 300)))
        if body.get("refresh_token"):
            self._cookie(response, REFRESH_COOKIE, str(body["refresh_token"]), 12 * 3600)
        return response

    # ------------------------------------------------------------------ the caller behind the cookies
    async def _caller(self, request: Request) -> tuple[Caller | None, dict[str, str]]:
        """The clinician the report's cookies stand for (refreshing an expired access token), and the
        cookies to set on the answer; None: sign in again."""
        token = request.cookies.get(TOKEN_COOKIE)
        base = base_url(request)
        if token:
            try:
                return self.verifier.verify(f"Bearer {token}", base), {}
            except Unauthorized:
                pass
        refresh = request.cookies.get(REFRESH_COOKIE)
        client = await run_in_threadpool(self._client)
        if not refresh or client is None:
            return None, {}
        try:
            grant = await run_in_threadpool(self.grants.refresh, client, refresh, None, base)
        except OAuthError:
            return None, {}
        body = grant.response
        cookies = {TOKEN_COOKIE: str(body["access_token"])}
        if body.get("refresh_token"):
            cookies[REFRESH_COOKIE] = str(body["refresh_token"])
        try:
            return self.verifier.verify(f"Bearer {body['access_token']}", base), cookies
        except Unauthorized:
            return None, {}

    def _with_cookies(self, response: Response, cookies: dict[str, str]) -> Response:
        for name, value in cookies.items():
            self._cookie(response, name, value, 12 * 3600 if name == REFRESH_COOKIE else 300)
        return response

    def _context(self, request: Request, caller: Caller) -> RequestContext:
        return RequestContext(
            caller=caller,
            base_url=self.settings.fhir_base_url(),
            source_address=client_address(request),
            request_id=request_id.get(),
        )

    # ------------------------------------------------------------------ pages
    async def report(self, request: Request, patient_id: str) -> Response:
        return await self._report(request, patient_id, pdf=False)

    async def report_pdf(self, request: Request, patient_id: str) -> Response:
        return await self._report(request, patient_id, pdf=True)

    async def _report(self, request: Request, patient_id: str, *, pdf: bool) -> Response:
        caller, cookies = await self._caller(request)
        if caller is None:
            return self._authorize(request, CASELOAD_SCOPES, None, request.url.path)
        lang = self._lang(request)
        if caller.practitioner is None:
            # The report is for clinicians; a patient's own token gets none (as if it did not exist).
            return self._with_cookies(self._refusal(request, "request-expired", 404), cookies)
        administration = request.query_params.get("administration") or None
        all_scales = request.query_params.get("all") == "1"
        try:
            built = await run_in_threadpool(
                self._assemble, request, caller, patient_id, administration, all_scales
            )
        except NotFound:
            return self._with_cookies(self._refusal(request, "outside-care-team", 404), cookies)
        except FhirError as error:
            log.info("report: %s", error.message)
            return self._with_cookies(self._refusal(request, "request-expired", error.status), cookies)
        if pdf:
            data = await run_in_threadpool(self.pages.report_pdf, built, lang)
            response: Response = Response(
                data,
                media_type="application/pdf",
                headers={
                    "Content-Disposition": f'inline; filename="report-{patient_id}.pdf"',
                    "Cache-Control": "no-store",
                },
            )
            return self._with_cookies(response, cookies)
        other = other_lang(lang)
        keep = {k: v for k, v in request.query_params.items() if k != "lang"}
        html = self.pages.report_html(
            built,
            lang,
            pdf_url=f"/report/Patient/{quote(patient_id)}/report.pdf?{urlencode({**keep, 'lang': lang})}",
            all_scales_url=None if all_scales else f"{request.url.path}?{urlencode({**keep, 'all': '1'})}",
            other_lang_url=f"{request.url.path}?{urlencode({**keep, 'lang': other})}",
        )
        return self._with_cookies(HTMLResponse(html, headers=self.pages.headers), cookies)

    def _assemble(
        self, request: Request, caller: Caller, patient_id: str, administration: str | None, all_scales: bool
    ) -> Any:
        ctx = self._context(request, caller)
        with self.service.audited_session(
            ctx, "operation:report", "Patient", patient_id, read_only=False
        ) as repo:
            built = assemble_report(repo, patient_id, administration=administration, all_scales=all_scales)
            repo.audit("operation:report", "Patient", patient_id, patients=[patient_id])
        return built

    async def caseload(self, request: Request) -> Response:
        caller, cookies = await self._caller(request)
        if caller is None or caller.practitioner is None:
            return self._authorize(request, CASELOAD_SCOPES, None, "/report/caseload")
        lang = self._lang(request)
        practitioner = caller.practitioner
        ctx = self._context(request, caller)

        def rows() -> tuple[list[Any], str]:
            with self.service.audited_session(ctx, "search-type", "Patient", query="caseload") as repo:
                found = caseload(repo, practitioner, self.now())
                repo.audit("search-type", "Patient", query="caseload", patients=[r.patient_id for r in found])
                try:
                    doctor = repo.read("Practitioner", practitioner)
                    name = display_name(json.loads(doctor.body_text or "{}"))
                except FhirError:
                    name = f"Practitioner/{practitioner}"
            return found, name

        found, name = await run_in_threadpool(rows)
        other = other_lang(lang)
        html = self.pages.caseload_html(
            found,
            lang,
            clinician_name=name,
            report_url=lambda pid: f"/report/Patient/{quote(pid)}?lang={lang}",
            other_lang_url=f"/report/caseload?lang={other}",
        )
        return self._with_cookies(HTMLResponse(html, headers=self.pages.headers), cookies)


def install_report(
    app: FastAPI, service: FhirService, settings: Settings, *, now: Callable[[], datetime] | None = None
) -> ReportApp | None:
    """Register the report app (fixed client id) and mount its routes; None (and a warning) when this
    server's address cannot be an app's redirect URI (http on a host other than loopback)."""
    root = server_root(settings.fhir_base_url())
    try:
        app.state.clients.ensure_builtin_app(
            REPORT_CLIENT_ID,
            REPORT_APP_NAME,
            redirect_uris=[root + "/report/callback"],
            scopes=REPORT_SCOPES,
            launch_types=["ehr", "standalone"],
        )
    except ValueError as error:
        log.warning("the feedback report app is not available at %s: %s", root, error)
        return None
    report = ReportApp(
        service,
        settings,
        app.state.clients,
        app.state.grants,
        app.state.token_verifier,
        now or (lambda: datetime.now(UTC)),
    )
    app.include_router(report.router())
    app.mount("/static/report", Secured(StaticFiles(directory=REPORT_STATIC)), name="report-static")
    return report
