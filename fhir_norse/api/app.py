"""The application factory: settings in, a ready FastAPI app out (no import-time singletons)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import ClassVar

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from fhir_norse.api.auth_setup import install_auth
from fhir_norse.api.bulk_routes import install_bulk_routes
from fhir_norse.api.messaging_routes import install_messaging_routes
from fhir_norse.api.rendering import render_error
from fhir_norse.api.report_routes import install_report
from fhir_norse.api.routes import fhir_router, install_hot_routes
from fhir_norse.api.smart_routes import install_smart_launch
from fhir_norse.auth.refusals import RefusalAudit
from fhir_norse.compose import (
    Journey,
    build_bulk_export,
    build_delivery,
    build_journey,
    build_service,
    event_recorder,
    load_demo_if_empty,
)
from fhir_norse.config import Settings, load_settings
from fhir_norse.logs import request_id
from fhir_norse.outcomes import (
    BadRequest,
    FhirError,
    InternalError,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
)
from fhir_norse.server.content import publish_content
from fhir_norse.server.interactions import FhirService
from fhir_norse.web.report import ReportPages
from fhir_norse.web.report.documents import ReportDocuments
from fhir_norse.web.routes import install_patient_form

log = logging.getLogger("fhir_norse")

_XML_FORMATS = ("xml", "text/xml", "application/xml", "application/fhir+xml", "ttl", "text/turtle")


class RequestIdFilter(logging.Filter):
    """Puts the request id on every log record; resource content is never logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s")
    )
    root = logging.getLogger("fhir_norse")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def freeze_startup_objects() -> None:
    """Move everything loaded at start-up (definitions, models, the content pack) out of the cyclic
    garbage collector's reach, as long-running servers do (``gc.freeze``): a full collection otherwise
    walks them all, a 130-150 ms pause in the middle of a request every few hundred requests (measured
    on ``$next-question``, BENCHMARKS.md). Call once, after the app is built, in the serving process
    (not in tests, which build many apps in one process)."""
    import gc

    gc.collect()
    gc.freeze()
    # A bigger first generation: a request allocates tens of thousands of short-lived objects (a
    # 100-200 kB response parsed and rendered), so the default 700 ran the young collections every few
    # hundred microseconds and, with them, a full collection every few requests (60 in 900 requests,
    # 10-100 ms each, measured on the adaptive benchmark); with these, one in the same run.
    gc.set_threshold(50_000, 20, 100)


def app_from_environment() -> FastAPI:
    """The app of one worker of ``fhir-norse serve --workers N`` (a uvicorn factory, called in each
    worker process): settings from the environment, which the command filled from its flags
    (:func:`fhir_norse.cli._export_settings`). The schema is migrated and the content published by
    the command before the workers start."""
    _exit_with_parent()
    settings = load_settings()
    configure_logging(settings.log_level)
    app = create_app(settings)
    freeze_startup_objects()
    return app


# The process id of ``fhir-norse serve`` supervising the workers (set by the command for them).
SUPERVISOR_PID_ENV = "FHIR_NORSE_SUPERVISOR_PID"


def _exit_with_parent() -> None:
    """On Linux, have the kernel send this worker SIGTERM when its supervising process dies, even by
    ``kill -9``, so that no worker is left serving on the port (and holding the database) alone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if supervisor and supervisor.isdigit() and os.getppid() != int(supervisor):
        # The supervisor died before the line above: nobody would send the signal.
        os.kill(os.getpid(), signal.SIGTERM)


class UriTooLong(FhirError):
    """414: the request target is longer than ``max_url_length``."""

    status: ClassVar[int] = 414
    default_code: ClassVar[str] = "too-costly"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the administration scheduler (every worker runs one; a lease in the database lets one
    tick at a time: :mod:`fhir_norse.rom.scheduler`); at shutdown stop it, close the message
    transports, and record the refusal counts not written yet (:mod:`fhir_norse.auth.refusals`)."""
    journey: Journey = app.state.journey
    settings: Settings = app.state.settings
    if settings.scheduler_interval_s > 0:
        journey.scheduler.start()
    app.state.bulk_export.start()
    # Subscription notifications (Subscriptions R5 Backport): a lease lets one worker deliver at a time.
    delivery = app.state.subscription_delivery
    delivery.start()
    try:
        yield
    finally:
        await run_in_threadpool(delivery.stop)
        await run_in_threadpool(app.state.bulk_export.stop)
        await run_in_threadpool(journey.close)
        await run_in_threadpool(app.state.smart_launch.close)
        refusals: RefusalAudit = app.state.refusal_audit
        await run_in_threadpool(lambda: refusals.write(refusals.flush()))


def create_app(
    settings: Settings,
    service: FhirService | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
) -> FastAPI:
    """The app for ``settings`` (``service``: an already built server to share; ``clock``: the time the
    administrations, links and messages go by, timezone-aware UTC; tests move it)."""
    development = settings.mode == "development"
    app = FastAPI(
        title="fhir-norse",
        version="0.1.0",
        # The interactive API documentation is a development aid: off in production.
        docs_url="/docs" if development else None,
        redoc_url=None,
        openapi_url="/openapi.json" if development else None,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.service = service or build_service(settings)
    app.state.audit = event_recorder(app.state.service, settings)
    app.state.refusal_audit = RefusalAudit(app.state.audit, window=settings.refusal_audit_window_seconds)

    @app.exception_handler(FhirError)
    async def fhir_error(_request: Request, error: FhirError) -> Response:
        if error.status >= 500:
            log.error("%s: %s", type(error).__name__, error.message)
        return render_error(error)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return render_error(BadRequest(f"Invalid request {where}: {first.get('msg', 'invalid')}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 404:
            return render_error(NotFound("No FHIR endpoint at this address"))
        if error.status_code == 405:
            return render_error(MethodNotAllowed("This HTTP method is not allowed on this address"))
        generic = FhirError(str(error.detail))
        generic.status = error.status_code  # type: ignore[misc]
        return render_error(generic)

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(fhir_router())
    install_auth(app, settings, app.state.service.storage.engine)
    # SMART App Launch in the browser (issue 16): authorize, the national logins, picker and consent.
    install_smart_launch(app, app.state.service, settings)
    # The clinician's feedback report (issue 17), a SMART app this server ships.
    install_report(app, app.state.service, settings, now=clock)
    # Bulk Data export (system, Patient and Group $export): the status and file URLs, and the worker.
    app.state.bulk_export = build_bulk_export(settings, app.state.service)
    install_bulk_routes(app)
    install_hot_routes(app)
    app.state.subscription_delivery = build_delivery(settings, app.state.service)
    # The patient's way in (issue 15): personal links, the form, invitations and their delivery reports.
    journey = app.state.journey = build_journey(settings, app.state.service, now=clock)
    if settings.report_documents:
        # Each scored administration's report as a PDF in the record (issue 17), rendered in the tick.
        documents = ReportDocuments(app.state.service, ReportPages(), now=clock)
        journey.scheduler.add_job(documents.render_pending, name="report-documents")
    install_messaging_routes(app, app.state.service, settings, journey.dispatcher)
    install_patient_form(
        app,
        app.state.service,
        settings,
        links=journey.links,
        administrations=journey.administrations,
        send_code=journey.send_code,
        now=clock,
    )
    if settings.publish_content:
        try:
            report = publish_content(app.state.service, settings.content_dir)
        except Exception:
            app.state.service.storage.engine.dispose()
            raise
        log.info("content: %d published, %d unchanged", len(report.created), len(report.unchanged))
        # `make serve` on an empty development database: the demo clinic (issue 17), once.
        load_demo_if_empty(settings, app.state.service)
    # Browser apps (SMART public clients) call the token endpoints and discovery from their own origin:
    # those answer CORS for any origin, without credentials; the FHIR API for the configured origins.
    app.add_middleware(CorsByPath, origins=settings.cors_origins)
    app.add_middleware(
        RequestContextMiddleware,
        max_url_length=settings.max_url_length,
        # Which worker process answered: a development aid (and what the multi-worker test checks).
        worker_header=development,
    )
    if settings.trusted_proxies:
        # Outermost: the client address every later step sees (rate limits, audit) is the one a
        # trusted proxy vouches for; X-Forwarded-For from anyone else is ignored.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    return app


# Paths any origin may call from a browser, without credentials: the OAuth endpoints a public app uses and
# the discovery documents (SMART App Launch: "servers SHALL support CORS" for browser-based apps there).
OPEN_CORS_PATHS = ("/auth/token", "/auth/revoke", "/auth/introspect")
OPEN_CORS_SUFFIX = "/.well-known/"
_CORS_HEADERS = [
    "Authorization",
    "Content-Type",
    "Prefer",
    "If-Match",
    "If-None-Match",
    "If-None-Exist",
    "If-Modified-Since",
    "X-Request-ID",
]


class CorsByPath:
    """CORS in two policies: any origin (no cookies) on :data:`OPEN_CORS_PATHS` and the ``.well-known``
    documents; the configured ``cors_origins`` (none by default: off) everywhere else."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.open = CORSMiddleware(
            app,
            allow_origins=["*"],
            allow_methods=["GET", "POST"],
            allow_headers=_CORS_HEADERS,
            max_age=600,
        )
        self.configured: ASGIApp = (
            CORSMiddleware(
                app,
                allow_origins=origins,
                allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                allow_headers=_CORS_HEADERS,
                expose_headers=["ETag", "Location", "Last-Modified", "X-Request-ID"],
            )
            if origins
            else app
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in OPEN_CORS_PATHS or OPEN_CORS_SUFFIX in path:
            await self.open(scope, receive, send)
        else:
            await self.configured(scope, receive, send)


class RequestContextMiddleware:
    """Pure ASGI middleware (no per-request task or body copy): request id, the URL length limit and
    JSON-only negotiation.

    The request id comes from ``X-Request-ID`` or is generated; it is put on every log record
    of the request and echoed in the response. A request target (path and query) longer than
    ``max_url_length`` is answered 414 with an OperationOutcome (the HTTP server's own limit is set
    above it, see ``fhir-norse serve``).
    """

    def __init__(self, app: ASGIApp, max_url_length: int = 16 * 1024, *, worker_header: bool = False) -> None:
        self.app = app
        self.max_url_length = max_url_length
        self.worker_headers: list[tuple[bytes, bytes]] = (
            [(b"x-worker-pid", str(os.getpid()).encode())] if worker_header else []
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = (headers.get("x-request-id") or uuid.uuid4().hex)[:64]
        token = request_id.set(rid)
        rid_header = (b"x-request-id", rid.encode("latin-1", errors="replace"))

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), rid_header, *self.worker_headers]
            await send(message)

        try:
            if _target_length(scope) > self.max_url_length:
                too_long = UriTooLong(
                    f"The request URL is longer than the limit of {self.max_url_length} bytes"
                )
                await render_error(too_long)(scope, receive, send_with_id)
                return
            if scope["path"].startswith("/fhir") and _wants_non_json(scope, headers):
                error = render_error(NotAcceptable("Only JSON is supported (application/fhir+json)"))
                await error(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Logged with the request id; the client learns nothing of the internals.
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            response = render_error(InternalError(f"Internal server error (request id {rid})"))
            await response(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


def _target_length(scope: Scope) -> int:
    """The length of the request target as received: the raw path, ``?`` and the query."""
    path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    query: bytes = scope.get("query_string", b"")
    return len(path) + (len(query) + 1 if query else 0)


def _wants_non_json(scope: Scope, headers: Headers) -> bool:
    fmt = QueryParams(scope.get("query_string", b"")).get("_format")
    if fmt is not None:
        return fmt.split(";", 1)[0].strip().lower() in _XML_FORMATS
    accept = headers.get("accept", "")
    return bool(accept) and "json" not in accept and "*/*" not in accept and "xml" in accept
