"""FastAPI dependencies: the caller (the one authorization seam), the request context, bodies."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from fhir_norse.auth.audit import AUTHENTICATION, THROTTLED
from fhir_norse.auth.caller import Caller
from fhir_norse.auth.ratelimit import TooManyRequests
from fhir_norse.auth.refusals import RefusalAudit
from fhir_norse.auth.tokens import RequestAuthenticator
from fhir_norse.config import Settings
from fhir_norse.logs import request_id
from fhir_norse.outcomes import BadRequest, PayloadTooLarge, Unauthorized, UnsupportedMediaType
from fhir_norse.server.context import Prefer, RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.searching import search_params_from_form

FHIR_JSON = "application/fhir+json"
JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
PATCH_TYPES = frozenset({"application/json-patch+json"})


async def get_caller(request: Request) -> Caller:
    """Every FHIR route depends on this: the single place where a request becomes a caller.

    The bearer token is verified (signature, issuer, audience, expiry; SMART on FHIR): a missing
    or bad token is a 401 with ``WWW-Authenticate``, repeated failures from one address or with one
    token a 429. Both are audited, aggregated per address (:mod:`fhir_norse.auth.refusals`).
    """
    address = client_address(request)
    authenticator: RequestAuthenticator = request.app.state.authenticator
    header = request.headers.get("authorization")
    try:
        # From memory: keys, revoked clients and tokens seen before are cached.
        caller: Caller = authenticator.verifier.verify(header, base_url(request))
    except Unauthorized as error:
        # Counted against the failure limits, in the database: off the event loop.
        refusal = await run_in_threadpool(authenticator.count_failure, error, header, address)
        refusals: RefusalAudit | None = getattr(request.app.state, "refusal_audit", None)
        if refusals is not None:
            kind = THROTTLED if isinstance(refusal, TooManyRequests) else AUTHENTICATION
            reason = f"{refusal.status}: {refusal.message}"
            await write_refusals(
                refusals, refusals.authentication_refused(kind, address, reason, request_id.get())
            )
        raise refusal from None
    return caller


async def write_refusals(refusals: RefusalAudit, events: list[dict[str, Any]]) -> None:
    """Record the refusal events that are due (most refusals only count, and write nothing)."""
    if events:
        await run_in_threadpool(refusals.write, events)


async def get_service(request: Request) -> FhirService:
    service: FhirService = request.app.state.service
    return service


def client_address(request: Request) -> str | None:
    """The client's address: the peer's, or what a trusted proxy says it is (``trusted_proxies``)."""
    return request.client.host if request.client else None


def base_url(request: Request) -> str:
    """The FHIR base URL: what links are built on and what every access token must name as its
    audience. From configuration (:meth:`Settings.fhir_base_url`), never from the request's ``Host``
    header, except in development mode without ``base_url``, for convenience."""
    settings: Settings = request.app.state.settings
    if settings.base_url or settings.mode != "development":
        return settings.fhir_base_url()
    return str(request.base_url).rstrip("/") + "/fhir"


async def get_context(request: Request, caller: Annotated[Caller, Depends(get_caller)]) -> RequestContext:
    return RequestContext(
        caller=caller,
        base_url=base_url(request),
        prefer=Prefer.parse(request.headers.get("prefer")),
        source_address=client_address(request),
        request_id=request_id.get(),
    )


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_bytes(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it is past ``max_body_bytes`` (the declared
    length is checked first, then the bytes as they arrive: nothing larger is ever held)."""
    limit: int = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_media_type(request: Request, allowed: frozenset[str]) -> None:
    content_type = media_type(request)
    if content_type not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type '{content_type or '(none)'}' is not supported; use {', '.join(sorted(allowed))}"
        )


def _parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise BadRequest("The request body is empty")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}", code="structure") from exc


async def read_body(request: Request, allowed: frozenset[str] = JSON_TYPES) -> Any:
    """The parsed JSON body, after the content type and the size limit are checked."""
    _check_media_type(request, allowed)
    return _parse_json(await read_bytes(request))


async def optional_body(request: Request) -> Any:
    """The parsed JSON body of a request that may have none (an operation's POST): None if empty."""
    raw = await read_bytes(request)
    if not raw:
        return None
    _check_media_type(request, JSON_TYPES)
    return _parse_json(raw)


async def search_form(request: Request) -> list[tuple[str, str]]:
    """The parameters of ``POST [type]/_search`` (a form body), under the body limit. No parameter
    may be longer than a whole URL may be (``max_url_length``): the form carries more parameters than
    a URL would, not larger values, and nothing larger is echoed in the answer's links or messages."""
    settings: Settings = request.app.state.settings
    params = await search_params_from_form(request.headers.get("content-type", ""), await read_bytes(request))
    limit = settings.max_url_length
    for name, value in params:
        if len(name) + len(value) > limit:
            raise BadRequest(
                f"The search parameter '{name[:40]}' is longer than {limit} characters", code="too-costly"
            )
    return params


async def resource_body(request: Request) -> Any:
    body = await read_body(request)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object (a FHIR resource)", code="structure")
    return body


async def patch_body(request: Request) -> Any:
    return await read_body(request, PATCH_TYPES | JSON_TYPES)


Context = Annotated[RequestContext, Depends(get_context)]
Service = Annotated[FhirService, Depends(get_service)]
ResourceBody = Annotated[dict[str, Any], Depends(resource_body)]
PatchBody = Annotated[Any, Depends(patch_body)]
