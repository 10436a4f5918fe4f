"""FastAPI dependencies: the caller (the one authorization seam), the request context, bodies."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import Depends, Request

from fhir_norse.auth.caller import Caller
from fhir_norse.logs import request_id
from fhir_norse.outcomes import BadRequest, PayloadTooLarge, UnsupportedMediaType
from fhir_norse.server.context import Prefer, RequestContext
from fhir_norse.server.interactions import FhirService

FHIR_JSON = "application/fhir+json"
JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
PATCH_TYPES = frozenset({"application/json-patch+json"})


async def get_caller(request: Request) -> Caller:
    """Every FHIR route depends on this: the single place where a request becomes a caller.

    The bearer token is verified (signature, issuer, audience, expiry; SMART on FHIR): a missing
    or bad token is a 401 with ``WWW-Authenticate``, repeated failures from one address a 429.
    """
    address = request.client.host if request.client else None
    caller: Caller = request.app.state.authenticator.authenticate(
        request.headers.get("authorization"), address, base_url(request)
    )
    return caller


async def get_service(request: Request) -> FhirService:
    service: FhirService = request.app.state.service
    return service


def base_url(request: Request) -> str:
    configured = request.app.state.settings.base_url
    if configured:
        return str(configured).rstrip("/")
    return str(request.base_url).rstrip("/") + "/fhir"


async def get_context(request: Request, caller: Annotated[Caller, Depends(get_caller)]) -> RequestContext:
    return RequestContext(
        caller=caller,
        base_url=base_url(request),
        prefer=Prefer.parse(request.headers.get("prefer")),
        source_address=request.client.host if request.client else None,
        request_id=request_id.get(),
    )


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, allowed: frozenset[str] = JSON_TYPES) -> Any:
    """The parsed JSON body, after the size limit and the content type are checked."""
    limit: int = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes")
    content_type = media_type(request)
    if content_type not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type '{content_type or '(none)'}' is not supported; use {', '.join(sorted(allowed))}"
        )
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise BadRequest("The request body is empty")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}", code="structure") from exc


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
