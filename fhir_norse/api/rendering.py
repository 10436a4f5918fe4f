"""Turning interaction results and errors into HTTP responses."""

from __future__ import annotations

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


def render_error(error: FhirError) -> Response:
    return Response(
        content=orjson.dumps(error.outcome()),
        status_code=error.status,
        headers=error.headers,
        media_type=FHIR_JSON_UTF8,
    )
