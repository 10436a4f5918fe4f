"""An independent R4 parser for everything the server returns: the SMART ``fhirclient`` models.

fhirclient's R4 (4.0.1) models are generated from the specification independently of
fhir.resources; parsing in strict mode fails on unknown elements and wrong types, so a
response the server invents or gets wrong in shape fails the test that received it.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
from fhirclient.models.fhirelementfactory import FHIRElementFactory


def parse_r4(resource: dict[str, Any]) -> Any:
    """Parse one resource (Bundles and their entries included) with fhirclient, strictly."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise AssertionError(f"response JSON has no resourceType: {str(resource)[:200]}")
    return FHIRElementFactory.instantiate(resource_type, resource)


def check_response(response: httpx.Response) -> None:
    """httpx response hook: every FHIR JSON body must parse as R4."""
    if not response.request.url.path.startswith("/fhir"):
        return
    content_type = response.headers.get("content-type", "")
    # NDJSON (Bulk Data export files) holds one resource a line: its reader parses each.
    if "json" not in content_type or "ndjson" in content_type:
        return
    response.read()
    if not response.content:
        return
    body = orjson.loads(response.content)
    if isinstance(body, dict) and "resourceType" in body:
        parse_r4(body)
