"""SMART App Launch in the browser (issue 16): the authorization endpoint, the national logins' callback,
the clinician's patient picker and the consent page.

https://hl7.org/fhir/smart-app-launch/app-launch.html. This server is the authorization server of its
FHIR API, not an identity provider: people prove who they are at a configured OpenID Connect provider
(:mod:`fhir_norse.auth.upstream`: ID-porten for patients, HelseID for clinicians in Norway), and the
verified identifier must match exactly one ``Patient.identifier`` or ``Practitioner.identifier`` here.

=================================  ===========================================================================
``GET|POST /auth/authorize``       the app's request (``authorize-post`` too): client, exact redirect URI,
                                   ``response_type=code``, ``state``, ``aud`` = our FHIR base, PKCE S256,
                                   scopes, EHR ``launch``. An unknown client or redirect URI gets a page
                                   (never a redirect to an unchecked address); every later error is a
                                   redirect with ``error`` and ``state`` (RFC 6749 4.1.2.1).
``GET /auth/login/callback``       the login provider's answer: the code is exchanged and the id_token
                                   verified; the identifier is matched; a short server-side sign-in session
                                   starts
``GET|POST /auth/pick``            a clinician's standalone launch: choose one of *their* patients (CareTeam
                                   participant or EpisodeOfCare care manager)
``GET|POST /auth/consent``         what the app asks for in plain words; the person may allow less; Allow
                                   issues a single-use code (:class:`fhir_norse.auth.grants.Grants`)
``POST /auth/signout``             end the sign-in session here and the ``online_access`` grants made in it
=================================  ===========================================================================

Every step (authorization, login, consent, refusal) is an AuditEvent naming the person, the app and the
patient (``AuditRecorder.record_authorization``). Two cookies, both ``HttpOnly``, ``SameSite=Lax`` (the
login provider's callback is a top-level navigation), path ``/auth``, ``Secure`` on https: one binds the
steps of one request to the browser, one holds the sign-in session. Neither is an access token, and no
access token opens these pages; the patient form's link session (``/p/...``, ``/form``) is a third,
unrelated cookie.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, RedirectResponse, Response

from fhir_norse.api.auth_routes import audit_step
from fhir_norse.api.browser import display_name, other_lang, preferred_lang, set_private_cookie
from fhir_norse.api.deps import base_url, client_address
from fhir_norse.auth.caller import Access, Caller
from fhir_norse.auth.clients import Client, ClientRegistry
from fhir_norse.auth.grants import CodeGrant, Grants, LaunchContext
from fhir_norse.auth.scopes import ScopeSet
from fhir_norse.auth.signin import CONSENT, DONE, PICK, REFUSED, PendingRequest, SigninSession, SigninStore
from fhir_norse.auth.tokens import server_root
from fhir_norse.auth.upstream import LoginFailed, LoginProvider, UpstreamLogin, login_providers
from fhir_norse.config import Settings
from fhir_norse.logs import request_id
from fhir_norse.outcomes import FhirError
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.repository import loads
from fhir_norse.server.search.typed import Where
from fhir_norse.web.signin import (
    REFUSAL_KINDS,
    ConsentView,
    DevLoginView,
    Lang,
    PickerView,
    RefusalView,
    SigninPages,
    describe_scopes,
    refusal_text,
    signin_headers,
)

log = logging.getLogger(__name__)

__all__ = ["REQUEST_COOKIE", "SESSION_COOKIE", "install_smart_launch"]

REQUEST_COOKIE = "fhir_norse_authorize"
SESSION_COOKIE = "fhir_norse_signin"
COOKIE_PATH = "/auth"
_MAX_FORM_BYTES = 32 * 1024
_MAX_PARAM = 2048
# RFC 7636 4.2: the S256 challenge is BASE64URL(SHA256(verifier)) without padding: 43 characters.
_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
# Scopes that carry launch context rather than access: granted with the context, never shown as a choice.
CONTEXT_SCOPES = frozenset({"launch", "launch/patient", "launch/encounter"})
IDENTITY_SCOPES = frozenset({"openid", "fhirUser", "profile"})
REFRESH_SCOPES = frozenset({"offline_access", "online_access"})
_SIGNIN_CLIENT = "fhir-norse-signin"


@dataclass(frozen=True, slots=True)
class _Refused(Exception):
    """Stop here: a page to show, or a redirect to the app (with ``error``)."""

    response: Response
    reason: str


class SmartLaunch:
    """The routes of the module doc, over the app's services (see :func:`install_smart_launch`)."""

    def __init__(
        self,
        service: FhirService,
        settings: Settings,
        clients: ClientRegistry,
        grants: Grants,
        store: SigninStore,
        logins: Mapping[str, UpstreamLogin],
    ) -> None:
        self.service = service
        self.settings = settings
        self.clients = clients
        self.grants = grants
        self.store = store
        self.logins = logins
        self.pages = SigninPages()

    def close(self) -> None:
        """Close the login providers' HTTP connections (at shutdown)."""
        for login in self.logins.values():
            login.close()

    def router(self) -> APIRouter:
        router = APIRouter(include_in_schema=False)
        router.add_api_route("/auth/authorize", self.authorize, methods=["GET", "POST"], response_model=None)
        router.add_api_route(
            "/auth/login/callback", self.login_callback, methods=["GET"], response_model=None
        )
        router.add_api_route("/auth/pick", self.pick, methods=["GET", "POST"], response_model=None)
        router.add_api_route("/auth/consent", self.consent, methods=["GET", "POST"], response_model=None)
        router.add_api_route("/auth/signout", self.signout, methods=["POST"], response_model=None)
        router.add_api_route("/auth/refused", self.refused, methods=["GET"], response_model=None)
        if self.settings.mode == "development":
            router.add_api_route(
                "/auth/dev-login", self.dev_login, methods=["GET", "POST"], response_model=None
            )
        return router

    # ------------------------------------------------------------------ helpers
    def _lang(self, request: Request, params: Mapping[str, Any] | None = None) -> Lang:
        return preferred_lang(request, (params or {}).get("lang"))

    @staticmethod
    def _page(html: str, status: int = 200, *, redirect_uri: str | None = None) -> Response:
        """A page with the security headers; ``redirect_uri``: the page's form may end at that app."""
        return HTMLResponse(html, status_code=status, headers=signin_headers(redirect_uri))

    def _refusal(self, request: Request, kind: str, status: int, lang: Lang | None = None) -> Response:
        lang = lang or self._lang(request)
        title, message, advice = refusal_text(kind, lang)
        other = other_lang(lang)
        # The other language is the same refusal at an address of its own: the step that was refused
        # (a login callback, a posted form) must not be repeated by following the link.
        view = RefusalView(
            lang=lang,
            title=title,
            message=message,
            advice=advice,
            other_lang_url="/auth/refused?" + urlencode({"kind": kind, "lang": other}),
        )
        return self._page(self.pages.refusal(view), status)

    async def refused(self, request: Request) -> Response:
        """A refusal page by its kind (the language link of every refusal page)."""
        kind = request.query_params.get("kind", "")
        if kind not in REFUSAL_KINDS:
            kind = "request-expired"
        return self._refusal(request, kind, 200)

    @staticmethod
    async def _record(request: Request, step: str, outcome: str, **details: str | None) -> None:
        """One AuditEvent for an authorization step (the person, the app, the patient); a failure to
        record fails the request: no access without a record."""
        await audit_step(request, step, outcome, **details)

    async def _refuse(
        self,
        request: Request,
        kind: str,
        status: int,
        *,
        step: str,
        client_id: str | None,
        person: str | None = None,
        patient: str | None = None,
        scopes: str | None = None,
        pending: PendingRequest | None = None,
        reason: str | None = None,
    ) -> Response:
        """Audit a refusal, close the request, and answer the refusal page."""
        if pending is not None:
            await run_in_threadpool(self.store.finish, pending.id, REFUSED)
        await self._record(
            request,
            step,
            "refused",
            client_id=client_id,
            person=person,
            patient=patient,
            scopes=scopes,
            reason=f"{kind}: {reason}" if reason else kind,
        )
        lang = self._lang(request, pending.params if pending else None)
        return self._page_without_cookie(self._refusal(request, kind, status, lang))

    @staticmethod
    def _page_without_cookie(response: Response) -> Response:
        response.delete_cookie(REQUEST_COOKIE, path=COOKIE_PATH)
        return response

    def _cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        set_private_cookie(response, self.settings, name, value, path=COOKIE_PATH, max_age=max_age)

    def _callback_url(self, request: Request) -> str:
        return server_root(base_url(request)) + "/auth/login/callback"

    async def _form(self, request: Request) -> dict[str, str]:
        """A urlencoded form body (bounded); repeated names are kept as one space-joined value for
        ``scope`` (the consent form's checkboxes) and refused otherwise."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > _MAX_FORM_BYTES:
            return {"__error__": "too large"}
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > _MAX_FORM_BYTES:
                return {"__error__": "too large"}
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
        except (UnicodeDecodeError, ValueError):
            return {"__error__": "unreadable"}
        form: dict[str, str] = {}
        for name, value in pairs:
            if name == "scope" and name in form:
                form[name] = f"{form[name]} {value}"
            elif name in form:
                return {"__error__": f"{name[:40]} repeated"}
            else:
                form[name] = value
        return form

    async def _page_form(
        self, request: Request, secret: str, pending: PendingRequest, lang: Lang
    ) -> dict[str, str] | Response:
        """The form posted from one of the sign-in pages of ``pending``, or the 403 answer when its CSRF
        token or request id is not the page's."""
        form = await self._form(request)
        if not SigninStore.check_csrf(secret, form.get("csrf", "")) or form.get("request_id") != pending.id:
            return self._refusal(request, "session-mismatch", 403, lang)
        return form

    # ------------------------------------------------------------------ /auth/authorize
    async def authorize(self, request: Request) -> Response:
        if request.method == "POST":
            params = await self._form(request)
        else:
            params = {}
            for name, value in request.query_params.multi_items():
                if name in params:
                    params["__error__"] = f"{name[:40]} repeated"
                params[name] = value
        try:
            return await self._authorize(request, params)
        except _Refused as refused:
            return refused.response

    async def _authorize(self, request: Request, params: Mapping[str, str]) -> Response:
        lang = self._lang(request, params)
        client_id = params.get("client_id", "")[:64]
        client = await run_in_threadpool(self.clients.get, client_id) if client_id else None
        if client is None or client.kind not in ("public", "confidential-asymmetric"):
            await self._record(
                request, "authorize", "refused", client_id=client_id or None, reason="unknown client"
            )
            return self._refusal(request, "unknown-client", 400, lang)
        if not client.active:
            await self._record(request, "authorize", "refused", client_id=client_id, reason="app revoked")
            return self._refusal(request, "app-revoked", 403, lang)
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in client.redirect_uris:
            # Never redirect to an address the app did not register (RFC 6749 4.1.2.1).
            await self._record(
                request, "authorize", "refused", client_id=client_id, reason="redirect_uri mismatch"
            )
            return self._refusal(request, "redirect-mismatch", 400, lang)
        state = params.get("state")

        async def fail(error: str, description: str) -> Response:
            await self._record(
                request,
                "authorize",
                "refused",
                client_id=client_id,
                scopes=params.get("scope"),
                reason=description,
            )
            return _redirect_error(redirect_uri, error, description, state)

        if "__error__" in params:
            return await fail("invalid_request", f"the request cannot be read ({params['__error__']})")
        if any(len(v) > _MAX_PARAM for v in params.values()):
            return await fail("invalid_request", "a parameter is too long")
        if params.get("response_type") != "code":
            return await fail("unsupported_response_type", "response_type must be code")
        if not state:
            return await fail("invalid_request", "state is required")
        challenge = params.get("code_challenge", "")
        method = params.get("code_challenge_method", "")
        if not challenge:
            return await fail("invalid_request", "PKCE is required: code_challenge is missing")
        if method != "S256":
            return await fail("invalid_request", "PKCE code_challenge_method must be S256")
        if not _CHALLENGE.match(challenge):
            return await fail("invalid_request", "code_challenge is not an S256 challenge")
        fhir_base = base_url(request)
        if params.get("aud", "").rstrip("/") != fhir_base:
            return await fail("invalid_request", f"aud must be this server's FHIR base URL ({fhir_base})")
        requested = params.get("scope", "").split()
        parsed = ScopeSet.parse(requested)
        if parsed.invalid:
            return await fail("invalid_scope", f"unknown scopes: {' '.join(sorted(parsed.invalid))[:200]}")

        launch: LaunchContext | None = None
        handle = params.get("launch")
        if handle:
            if "ehr" not in client.launch_types:
                return await fail("unauthorized_client", "this app is not registered for EHR launch")
            launch = await run_in_threadpool(self.grants.resolve_launch, handle, client.client_id)
            if launch is None:
                return await fail("invalid_request", "the launch is unknown, expired or already used")
        elif "standalone" not in client.launch_types:
            return await fail("unauthorized_client", "this app is not registered for standalone launch")

        allowed = _grantable(client, requested)
        resource = ScopeSet.parse(allowed)
        contexts = resource.contexts()
        if not contexts:
            return await fail("invalid_scope", "none of the requested scopes can be granted to this app")
        role = "clinician" if (launch is not None or "user" in contexts) else "patient"
        if role == "patient":
            # A patient acts for themself: patient/ scopes only.
            allowed = [s for s in allowed if not s.startswith("user/")]
        login = self.logins.get(role)
        if login is None and self.settings.mode != "development":
            await self._record(
                request, "authorize", "refused", client_id=client_id, reason=f"no {role} login"
            )
            return self._refusal(request, "login-not-configured", 503, lang)
        kept = {
            "redirect_uri": redirect_uri,
            "state": state,
            "code_challenge": challenge,
            "nonce": params.get("nonce") or None,
            "scope": " ".join(allowed),
            "asked": " ".join(requested),
            "lang": lang,
            "launch": _launch_json(launch),
        }
        pending, secret = await run_in_threadpool(self.store.open_request, client.client_id, kept, role)
        await self._record(
            request,
            "authorize",
            "success",
            client_id=client_id,
            patient=launch.patient if launch else None,
            scopes=params.get("scope"),
        )
        response: Response
        session = await run_in_threadpool(self.store.session, request.cookies.get(SESSION_COOKIE))
        if session is not None and session.role == role:
            # Signed in here a moment ago (the session is short): no second login.
            response = await self._after_signin(request, pending, session)
        elif login is None:
            # Development mode without a national login: the development sign-in page (module doc).
            response = RedirectResponse("/auth/dev-login", status_code=303)
        else:
            start = await run_in_threadpool(
                lambda: login.start(
                    self._callback_url(request), ui_locales="nb en" if lang == "nb" else "en nb"
                )
            )
            await run_in_threadpool(
                self.store.await_login,
                pending.id,
                state=start.state,
                nonce=start.nonce,
                verifier=start.verifier,
            )
            response = RedirectResponse(start.url, status_code=303)
        self._cookie(response, REQUEST_COOKIE, secret, int(self.store.lifetime.total_seconds()))
        return response

    # ------------------------------------------------------------------ the login provider's callback
    async def login_callback(self, request: Request) -> Response:
        query = request.query_params
        secret = request.cookies.get(REQUEST_COOKIE)
        pending = await run_in_threadpool(self.store.request_for_login, query.get("state", ""), secret)
        if pending is None:
            await self._record(
                request, "login", "refused", client_id=None, reason="unknown or replayed login state"
            )
            return self._refusal(request, "session-mismatch", 400)
        login = self.logins.get(pending.role)
        if login is None:
            return self._refusal(request, "login-not-configured", 503)
        if query.get("error"):
            # The person cancelled at the login provider (or it refused): the app hears access_denied.
            failed = login.callback_error(query["error"][:64])
            await run_in_threadpool(self.store.finish, pending.id, REFUSED)
            await self._record(request, "login", "refused", client_id=pending.client_id, reason=failed.reason)
            response = _redirect_error(
                pending.params["redirect_uri"],
                "access_denied",
                "the sign-in was not completed",
                pending.params["state"],
            )
            return self._page_without_cookie(response)
        try:
            verified = await run_in_threadpool(
                lambda: login.finish(
                    code=query.get("code", ""),
                    redirect_uri=self._callback_url(request),
                    verifier=pending.login_verifier or "",
                    nonce=pending.login_nonce or "",
                    # RFC 9207: which provider answered (no mix-up of the patients' and clinicians' logins).
                    iss=query.get("iss"),
                )
            )
        except LoginFailed as failed:
            log.info("sign-in at %s failed: %s", login.provider.name, failed.reason)
            return await self._refuse(
                request,
                "login-failed",
                401,
                step="login",
                client_id=pending.client_id,
                pending=pending,
                reason=failed.reason,
            )
        resource_type = "Patient" if pending.role == "patient" else "Practitioner"
        matches = await run_in_threadpool(
            self._match_identity, request, resource_type, verified.identifier_system, verified.identifier
        )
        if len(matches) != 1:
            kind = ("no-" if not matches else "several-") + (
                "patient" if pending.role == "patient" else "practitioner"
            )
            return await self._refuse(
                request,
                kind + ("-match" if not matches else "-matches"),
                403,
                step="login",
                client_id=pending.client_id,
                pending=pending,
            )
        person = f"{resource_type}/{matches[0]}"
        session, session_secret = await run_in_threadpool(
            lambda: self.store.open_session(
                role=pending.role, provider=verified.provider, subject=verified.subject, person=person
            )
        )
        await self._record(request, "login", "success", client_id=pending.client_id, person=person)
        response = await self._after_signin(request, pending, session)
        self._cookie(response, SESSION_COOKIE, session_secret, int(self.store.lifetime.total_seconds()))
        return response

    def _match_identity(self, request: Request, resource_type: str, system: str, value: str) -> list[str]:
        """The ids of the resources whose identifier is ``system|value`` (at most two: one is a match,
        two is a refusal). Searched as the sign-in service; the identifier value is not recorded."""
        ctx = self._context(request)
        with self.service.session(ctx, read_only=True) as repo:
            found = repo.as_server().find(Where(resource_type, tokens={"identifier": (system, value)}), 2)
            return [loads(s.body_text)["id"] for s in found]

    def _context(self, request: Request) -> RequestContext:
        caller = Caller(client_id=_SIGNIN_CLIENT, scopes=frozenset({"system/*.rs"}), source="local")
        return RequestContext(
            caller=caller,
            base_url=self.settings.fhir_base_url(),
            source_address=client_address(request),
            request_id=request_id.get(),
        )

    # ------------------------------------------------------------------ after the sign-in
    async def _after_signin(
        self, request: Request, pending: PendingRequest, session: SigninSession
    ) -> Response:
        """Where a signed-in person goes next: the refusal, the patient picker or the consent page."""
        person_id = session.person.partition("/")[2]
        launch = pending.params.get("launch") or None
        if pending.role == "patient":
            await run_in_threadpool(
                lambda: self.store.advance(pending.id, CONSENT, session_id=session.id, patient_id=person_id)
            )
            return RedirectResponse("/auth/consent", status_code=303)
        if launch is not None:
            if launch.get("practitioner") and launch["practitioner"] != person_id:
                return await self._refuse(
                    request,
                    "launch-invalid",
                    403,
                    step="login",
                    client_id=pending.client_id,
                    person=session.person,
                    patient=launch["patient"],
                    pending=pending,
                )
            reachable = await run_in_threadpool(self._patients_of, request, person_id)
            if launch["patient"] not in reachable:
                return await self._refuse(
                    request,
                    "outside-care-team",
                    403,
                    step="login",
                    client_id=pending.client_id,
                    person=session.person,
                    patient=launch["patient"],
                    pending=pending,
                )
            await run_in_threadpool(
                lambda: self.store.advance(
                    pending.id,
                    CONSENT,
                    session_id=session.id,
                    patient_id=launch["patient"],
                    encounter_id=launch.get("encounter"),
                )
            )
            return RedirectResponse("/auth/consent", status_code=303)
        granted = set(pending.params["scope"].split())
        wants_patient = "launch/patient" in granted or any(s.startswith("patient/") for s in granted)
        stage = PICK if wants_patient else CONSENT
        await run_in_threadpool(lambda: self.store.advance(pending.id, stage, session_id=session.id))
        return RedirectResponse("/auth/pick" if wants_patient else "/auth/consent", status_code=303)

    def _patients_of(self, request: Request, practitioner_id: str) -> frozenset[str]:
        with self.service.session(self._context(request), read_only=True) as repo:
            found = repo.kernel.policy.reachable(repo.uow.conn, Access(practitioner=practitioner_id))
        return found or frozenset()

    def _people(self, request: Request, refs: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
        """The resources named (type, id), read as the sign-in service (names for the pages)."""
        out: dict[str, dict[str, Any]] = {}
        with self.service.session(self._context(request), read_only=True) as repo:
            server = repo.as_server()
            for res_type, res_id in refs:
                try:
                    out[f"{res_type}/{res_id}"] = loads(server.read(res_type, res_id).body_text)
                except FhirError:  # a deleted or unknown resource shows without a name
                    continue
        return out

    async def _current(
        self, request: Request, stage: str
    ) -> tuple[PendingRequest, SigninSession, str] | Response:
        """The browser's request at ``stage`` and its sign-in session, or the refusal page."""
        secret = request.cookies.get(REQUEST_COOKIE) or ""
        pending = await run_in_threadpool(self.store.request, secret)
        if pending is None or pending.stage != stage or pending.session_id is None:
            return self._refusal(request, "request-expired", 400)
        session = await run_in_threadpool(self.store.session_by_id, pending.session_id)
        if session is None:
            return self._refusal(request, "request-expired", 400, self._lang(request, pending.params))
        return pending, session, secret

    # ------------------------------------------------------------------ /auth/dev-login
    async def dev_login(self, request: Request) -> Response:
        """Development mode only, for a role without a configured login: choose who to be among the
        people here who have that login's identifier (the demo clinic's clinicians and patients). Audited
        like a login (the session's provider is "development")."""
        secret = request.cookies.get(REQUEST_COOKIE) or ""
        pending = await run_in_threadpool(self.store.request, secret)
        if pending is None or pending.stage != "login" or pending.session_id is not None:
            return self._refusal(request, "request-expired", 400)
        if self.logins.get(pending.role) is not None:
            return self._refusal(request, "session-mismatch", 400)
        lang = self._lang(request, pending.params)
        people = await run_in_threadpool(self._people_to_be, request, pending.role)
        if request.method == "POST":
            form = await self._page_form(request, secret, pending, lang)
            if isinstance(form, Response):
                return form
            person = form.get("person", "")
            if person not in {reference for reference, _name, _value in people}:
                return self._refusal(request, "session-mismatch", 403, lang)
            session, session_secret = await run_in_threadpool(
                lambda: self.store.open_session(
                    role=pending.role, provider="development", subject=person, person=person
                )
            )
            await self._record(
                request,
                "login",
                "success",
                client_id=pending.client_id,
                person=person,
            )
            response = await self._after_signin(request, pending, session)
            self._cookie(response, SESSION_COOKIE, session_secret, int(self.store.lifetime.total_seconds()))
            return response
        other = other_lang(lang)
        view = DevLoginView(
            lang=lang,
            role="clinician" if pending.role == "clinician" else "patient",
            people=people,
            action="/auth/dev-login",
            csrf=SigninStore.csrf_token(secret),
            request_id=pending.id,
            other_lang_url=_with_lang(request, other),
        )
        return self._page(self.pages.dev_login(view))

    def _people_to_be(self, request: Request, role: str) -> list[tuple[str, str, str]]:
        """(reference, name, identifier value) of the Practitioners (clinicians) or Patients with the
        role's login identifier system, at most 200, by name."""
        res_type = "Practitioner" if role == "clinician" else "Patient"
        system = (
            self.settings.clinician_login_identifier_system
            if role == "clinician"
            else self.settings.patient_login_identifier_system
        )
        found: list[tuple[str, str, str]] = []
        with self.service.session(self._context(request), read_only=True) as repo:
            for stored in repo.as_server().find(Where(res_type), 500):
                body = loads(stored.body_text)
                value = next(
                    (i.get("value") for i in body.get("identifier") or [] if i.get("system") == system), None
                )
                if value:
                    found.append((f"{res_type}/{body['id']}", display_name(body) or body["id"], str(value)))
        return sorted(found, key=lambda p: p[1])[:200]

    # ------------------------------------------------------------------ /auth/pick
    async def pick(self, request: Request) -> Response:
        current = await self._current(request, PICK)
        if isinstance(current, Response):
            return current
        pending, session, secret = current
        lang = self._lang(request, pending.params)
        practitioner_id = session.person.partition("/")[2]
        reachable = sorted(await run_in_threadpool(self._patients_of, request, practitioner_id))
        if request.method == "POST":
            form = await self._page_form(request, secret, pending, lang)
            if isinstance(form, Response):
                return form
            chosen = form.get("patient", "")
            if chosen not in reachable:
                return await self._refuse(
                    request,
                    "outside-care-team",
                    403,
                    step="consent",
                    client_id=pending.client_id,
                    person=session.person,
                    patient=chosen if _FHIR_ID.match(chosen) else None,
                    pending=pending,
                )
            await run_in_threadpool(lambda: self.store.advance(pending.id, CONSENT, patient_id=chosen))
            return RedirectResponse("/auth/consent", status_code=303)
        people = await run_in_threadpool(
            self._people, request, [("Practitioner", practitioner_id), *(("Patient", p) for p in reachable)]
        )
        query = request.query_params.get("q", "").strip()[:100]
        patients = []
        for pid in reachable:
            patient = people.get(f"Patient/{pid}", {})
            name = display_name(patient) or f"Patient/{pid}"
            if query and query.lower() not in name.lower():
                continue
            patients.append((pid, name, patient.get("birthDate")))
        patients.sort(key=lambda p: p[1])
        client = await run_in_threadpool(self.clients.get, pending.client_id)
        other = other_lang(lang)
        view = PickerView(
            lang=lang,
            app_name=client.name if client else pending.client_id,
            person_name=display_name(people.get(session.person, {})) or session.person,
            patients=patients,
            action="/auth/pick",
            csrf=SigninStore.csrf_token(secret),
            request_id=pending.id,
            query=query,
            other_lang_url=_with_lang(request, other),
        )
        return self._page(self.pages.picker(view))

    # ------------------------------------------------------------------ /auth/consent
    async def consent(self, request: Request) -> Response:
        current = await self._current(request, CONSENT)
        if isinstance(current, Response):
            return current
        pending, session, secret = current
        lang = self._lang(request, pending.params)
        client = await run_in_threadpool(self.clients.get, pending.client_id)
        if client is None or not client.active:
            return await self._refuse(
                request,
                "app-revoked",
                403,
                step="consent",
                client_id=pending.client_id,
                person=session.person,
                patient=pending.patient_id,
                pending=pending,
            )
        offered = _offered(pending, session)
        if request.method == "POST":
            form = await self._page_form(request, secret, pending, lang)
            if isinstance(form, Response):
                return form
            return await self._decide(request, pending, session, client, offered, form)
        lines = describe_scopes(offered, lang, role="clinician" if pending.role == "clinician" else "patient")
        person_type, _, person_id = session.person.partition("/")
        refs = [(person_type, person_id)] + ([("Patient", pending.patient_id)] if pending.patient_id else [])
        people = await run_in_threadpool(self._people, request, refs)
        patient = people.get(f"Patient/{pending.patient_id}", {}) if pending.role == "clinician" else {}
        other = other_lang(lang)
        view = ConsentView(
            lang=lang,
            app_name=client.name,
            person_name=display_name(people.get(session.person, {})) or session.person,
            role=pending.role,
            patient_name=(display_name(patient) or None) if patient else None,
            patient_birth_date=patient.get("birthDate") if patient else None,
            lines=lines,
            action="/auth/consent",
            csrf=SigninStore.csrf_token(secret),
            request_id=pending.id,
            other_lang_url=_with_lang(request, other),
            clinic=self.settings.clinic_name,
        )
        return self._page(self.pages.consent(view), redirect_uri=pending.params["redirect_uri"])

    async def _decide(
        self,
        request: Request,
        pending: PendingRequest,
        session: SigninSession,
        client: Client,
        offered: list[str],
        form: Mapping[str, str],
    ) -> Response:
        params = pending.params
        redirect_uri, state = params["redirect_uri"], params["state"]
        chosen = set(form.get("scope", "").split()) & set(offered)
        resource = [s for s in offered if s in chosen and "/" in s and s not in CONTEXT_SCOPES]
        if form.get("decision") != "allow" or not resource:
            if not await run_in_threadpool(self.store.finish, pending.id, REFUSED):
                return self._refusal(request, "request-expired", 400, self._lang(request, params))
            await self._record(
                request,
                "consent",
                "refused",
                client_id=client.client_id,
                person=session.person,
                patient=pending.patient_id,
                reason="the person did not allow access",
            )
            response = _redirect_error(
                redirect_uri, "access_denied", "the person did not allow access", state
            )
            return self._page_without_cookie(response)
        # What the person allowed, in the order offered, with the launch context the request carries.
        granted = [s for s in offered if s in chosen]
        asked = set(params["scope"].split())
        if pending.patient_id and ("launch/patient" in asked or "launch" in asked):
            granted.append("launch/patient")
        if pending.encounter_id and ("launch/encounter" in asked or "launch" in asked):
            granted.append("launch/encounter")
        if "launch" in asked and params.get("launch"):
            granted.append("launch")
        if not await run_in_threadpool(self.store.finish, pending.id, DONE):
            # A second submit of the same consent form: the first one issued the code.
            return self._refusal(request, "request-expired", 400, self._lang(request, params))
        patient = pending.patient_id if (pending.role == "patient" or _has_patient_context(granted)) else None
        grant = CodeGrant(
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            code_challenge=params["code_challenge"],
            scope=" ".join(dict.fromkeys(granted)),
            person=session.person,
            patient=patient,
            encounter=pending.encounter_id if patient else None,
            # Inside an EHR the patient is already on screen; anywhere else the app must show who it is.
            need_patient_banner=params.get("launch") is None,
            nonce=params.get("nonce"),
            auth_time=int(session.auth_time.timestamp()),
            session_id=session.id,
        )
        code = await run_in_threadpool(self.grants.issue_code, grant)
        await self._record(
            request,
            "consent",
            "success",
            client_id=client.client_id,
            person=session.person,
            patient=patient,
            scopes=grant.scope,
        )
        response = RedirectResponse(
            _with_query(redirect_uri, {"code": code, "state": state}), status_code=303
        )
        return self._page_without_cookie(response)

    # ------------------------------------------------------------------ /auth/signout
    async def signout(self, request: Request) -> Response:
        session = await run_in_threadpool(self.store.session, request.cookies.get(SESSION_COOKIE))
        if session is not None:
            await run_in_threadpool(self.store.end_session, session.id)
            await run_in_threadpool(self.grants.end_session, session.id, "signed out")
            await self._record(request, "revoke", "success", client_id=None, person=session.person)
        response = self._refusal(request, "signed-out", 200)
        response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
        return response


# ---------------------------------------------------------------------- functions
def _grantable(client: Client, requested: list[str]) -> list[str]:
    """The requested scopes this app may be given: each resource scope covered by one of its allowed
    scopes, and the identity, launch and refresh scopes it registered."""
    allowed = ScopeSet.parse(client.scopes)
    out = []
    for scope in dict.fromkeys(requested):
        if "/" in scope and scope not in CONTEXT_SCOPES:
            if allowed.covers(ScopeSet.parse([scope])):
                out.append(scope)
        elif scope in client.scopes:
            out.append(scope)
    return out


def _offered(pending: PendingRequest, session: SigninSession) -> list[str]:
    """The scopes the consent page offers: the grantable ones, without the launch context (granted with
    the context, not chosen), and patient/ scopes only with a patient in context."""
    out = []
    for scope in pending.params["scope"].split():
        if scope in CONTEXT_SCOPES:
            continue
        if scope.startswith("patient/") and not pending.patient_id:
            continue
        if scope.startswith("user/") and session.role != "clinician":
            continue
        out.append(scope)
    return out


def _has_patient_context(granted: list[str]) -> bool:
    return any(s.startswith("patient/") or s == "launch/patient" for s in granted)


def _launch_json(launch: LaunchContext | None) -> dict[str, Any] | None:
    if launch is None:
        return None
    return {"patient": launch.patient, "encounter": launch.encounter, "practitioner": launch.practitioner}


def _with_query(uri: str, values: Mapping[str, str | None]) -> str:
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True) + [
        (k, v) for k, v in values.items() if v is not None
    ]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def _redirect_error(redirect_uri: str, error: str, description: str, state: str | None) -> Response:
    """RFC 6749 4.1.2.1: the error goes back to the app's (registered, exact) redirect URI."""
    return RedirectResponse(
        _with_query(redirect_uri, {"error": error, "error_description": description, "state": state}),
        status_code=303,
    )


def _with_lang(request: Request, lang: Literal["nb", "en"]) -> str:
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "lang"] + [("lang", lang)]
    return f"{request.url.path}?{urlencode(query)}"


def install_smart_launch(app: FastAPI, service: FhirService, settings: Settings) -> SmartLaunch:
    """Mount the browser side of SMART App Launch (module doc) on ``app``, after :func:`install_auth`
    (which put ``clients`` and ``grants`` on ``app.state``)."""
    store = SigninStore(service.storage.engine, session_minutes=settings.signin_session_minutes)
    providers: Mapping[str, LoginProvider] = login_providers(settings)
    logins = {role: UpstreamLogin(provider) for role, provider in providers.items()}
    launch = SmartLaunch(
        service,
        settings,
        app.state.clients,
        app.state.grants,
        store,
        logins,
    )
    app.state.signin = store
    app.state.smart_launch = launch
    app.include_router(launch.router())
    return launch
