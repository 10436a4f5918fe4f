"""Turning interaction results and errors into HTTP responses."""

from __future__ import annotations

import base64
import binascii

import orjson
from fastapi import Response

from fhir_norse.outcomes import FhirError
from fhir_norse.server.context import Result

FHIR_JSON_UTF8 = "application/fhir+json; charset=utf-8"


def render(result: Result) -> Response:
    if result.status in (204, 304):
        return Response(status_code=result.status, headers=result.headers)
    if result.raw is not None:
        content = result.raw.encode()
    elif result.body is not None:
        content = orjson.dumps(result.body)
    else:
        return Response(status_code=result.status, headers=result.headers)
    return Response(
        content=content, status_code=result.status, headers=result.headers, media_type=FHIR_JSON_UTF8
    )


def render_binary(result: Result, accept: str | None) -> Response | None:
    """A Binary read in its own format when the request asks for it by name: R4 says a Binary whose
    ``contentType`` is not FHIR SHOULD be returned natively when the Accept header is not a FHIR format
    (https://hl7.org/fhir/R4/binary.html#rest). Only an Accept that names the content type (or its
    ``type/*``) counts; ``*/*`` and the JSON formats keep the FHIR resource. None: render as usual."""
    if result.status != 200 or not accept or "json" in accept:
        return None
    wanted = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    body = result.body if result.body is not None else orjson.loads(result.raw or "{}")
    content_type = str(body.get("contentType") or "").lower()
    data = body.get("data")
    if not content_type or not isinstance(data, str):
        return None
    if content_type not in wanted and f"{content_type.split('/', 1)[0]}/*" not in wanted:
        return None
    try:
        content = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    headers = {k: v for k, v in result.headers.items() if k.lower() in ("etag", "last-modified")}
    return Response(content=content, status_code=200, headers=headers, media_type=content_type)


def render_error(error: FhirError) -> Response:
    return Response(
        content=orjson.dumps(error.outcome()),
        status_code=error.status,
        headers=error.headers,
        media_type=FHIR_JSON_UTF8,
    )
