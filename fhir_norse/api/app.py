"""The application factory: settings in, a ready FastAPI app out (no import-time singletons)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhir_norse.api.rendering import render_error
from fhir_norse.api.routes import router
from fhir_norse.auth.caller import Authorizer
from fhir_norse.config import Settings
from fhir_norse.fhir.errors import (
    BadRequest,
    FhirError,
    InternalError,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
)
from fhir_norse.fhir.interactions import FhirService
from fhir_norse.fhir.search.extract import default_extractor
from fhir_norse.fhir.search.registry import default_registry
from fhir_norse.fhir.validation import preload as preload_validation
from fhir_norse.store.db import create_engine
from fhir_norse.store.repository import Repository

log = logging.getLogger("fhir_norse")
request_id: ContextVar[str] = ContextVar("request_id", default="-")

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


def build_service(settings: Settings) -> FhirService:
    engine = create_engine(
        settings.database_url,
        synchronous=settings.sqlite_synchronous,
        busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        pool_size=settings.db_pool_size,
    )
    extractor = default_extractor()
    # Compile every FHIRPath expression and load the definitions now, not on a patient's first write.
    extractor.prepare()
    preload_validation()
    return FhirService(
        Repository(engine),
        default_registry(),
        extractor,
        Authorizer(),
        default_count=settings.default_count,
        max_count=settings.max_count,
    )


def create_app(settings: Settings, service: FhirService | None = None) -> FastAPI:
    app = FastAPI(
        title="fhir-norse", version="0.1.0", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json"
    )
    app.state.settings = settings
    app.state.service = service or build_service(settings)

    @app.middleware("http")
    async def request_context(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        token = request_id.set(rid[:64])
        try:
            fmt = request.query_params.get("_format")
            accept = request.headers.get("accept", "")
            if request.url.path.startswith("/fhir") and (
                (fmt is not None and fmt.lower() in _XML_FORMATS)
                or (accept and "json" not in accept and "*/*" not in accept and "xml" in accept)
            ):
                response = render_error(NotAcceptable("Only JSON is supported (application/fhir+json)"))
            else:
                response = await call_next(request)
        except FhirError as error:  # raised by middleware-level code
            response = render_error(error)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = render_error(InternalError(f"Internal server error (request id {rid[:64]})"))
        finally:
            request_id.reset(token)
        response.headers["X-Request-ID"] = rid[:64]
        return response

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

    @app.exception_handler(Exception)
    async def unexpected(request: Request, _error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return render_error(InternalError(f"Internal server error (request id {request_id.get()})"))

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(router)
    return app
