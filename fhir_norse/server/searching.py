"""The search result: a page of stored rows in, a ``searchset`` Bundle out.

https://hl7.org/fhir/R4/search.html and https://hl7.org/fhir/R4/bundle.html#searchset.
Matched and included resources are copied from the store as JSON text into the Bundle;
only ``_summary`` and ``_elements`` need the resources parsed, to cut them down.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any
from urllib.parse import parse_qsl

import orjson

from fhir_norse import definitions
from fhir_norse.outcomes import Issue, UnsupportedMediaType, operation_outcome
from fhir_norse.server.context import RequestContext
from fhir_norse.server.resources import dumps
from fhir_norse.server.search.links import page_query, self_query
from fhir_norse.store.search import engine
from fhir_norse.store.search.request import SearchRequest

SUMMARY_FILE = definitions.DIR / "summary-elements.json"
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
_ALWAYS = ("resourceType", "id", "meta")


@cache
def _element_lists() -> dict[str, dict[str, frozenset[str]]]:
    data = json.loads(SUMMARY_FILE.read_text(encoding="utf-8"))
    return {t: {k: frozenset(v) for k, v in lists.items()} for t, lists in data.items()}


def summary_elements(res_type: str) -> frozenset[str]:
    """Top-level elements of ``_summary=true`` (isSummary or mandatory)."""
    return _element_lists().get(res_type, {}).get("summary", frozenset())


def mandatory_elements(res_type: str) -> frozenset[str]:
    """Top-level elements with min >= 1, kept by ``_elements`` (R4 search.html#elements)."""
    return _element_lists().get(res_type, {}).get("mandatory", frozenset())


def search_bundle(ctx: RequestContext, request: SearchRequest, page: engine.SearchPage) -> str:
    """The ``searchset`` Bundle of a page, with its paging links and, last, an outcome entry naming
    the parameters that were ignored."""
    path = f"{ctx.base_url}/{request.resource_type}"
    links = [{"relation": "self", "url": _url(path, self_query(request))}]
    if page.next_cursor:
        links.append({"relation": "next", "url": _url(path, page_query(request, page.next_cursor))})
    if page.prev_cursor:
        links.append({"relation": "previous", "url": _url(path, page_query(request, page.prev_cursor))})
    head: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if page.total is not None:
        head["total"] = page.total
    head["link"] = links
    entries = [_entry(ctx.base_url, row, "match", request) for row in page.matches]
    entries += [_entry(ctx.base_url, row, "include", request) for row in page.includes]
    if request.ignored:
        names = ", ".join(sorted({name for name, _ in request.ignored}))
        warning = operation_outcome(
            [
                Issue(
                    f"Unknown or unsupported search parameters ignored: {names}",
                    code="not-supported",
                    severity="warning",
                )
            ]
        )
        entries.append('{"resource":' + dumps(warning) + ',"search":{"mode":"outcome"}}')
    text = dumps(head)[:-1]
    if entries:
        text += ',"entry":[' + ",".join(entries) + "]"
    return text + "}"


def _entry(base: str, row: Any, mode: str, request: SearchRequest) -> str:
    body = _shape(row.body_text, request) if (request.summary or request.elements) else row.body_text
    full_url = dumps(f"{base}/{row.res_type}/{row.res_id}")
    return f'{{"fullUrl":{full_url},"resource":{body},"search":{{"mode":"{mode}"}}}}'


def _shape(body_text: str, request: SearchRequest) -> str:
    """Apply ``_summary`` or ``_elements``; a cut-down resource is tagged SUBSETTED."""
    resource = orjson.loads(body_text)
    res_type = resource["resourceType"]
    if request.summary == "false" or (request.summary is None and not request.elements):
        return body_text
    if request.summary == "text":
        keep = {"text", *mandatory_elements(res_type)}
    elif request.summary == "data":
        keep = set(resource) - {"text"}
    elif request.summary == "true":
        keep = set(summary_elements(res_type))
    else:
        keep = {e.split(".", 1)[0] for e in request.elements} | mandatory_elements(res_type)
    shaped = {k: v for k, v in resource.items() if k in _ALWAYS or k in keep or _choice_of(k, keep)}
    meta = dict(shaped.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    shaped["meta"] = meta
    return dumps(shaped)


def _choice_of(key: str, keep: set[str]) -> bool:
    return any(key.startswith(name) and key[len(name) :][:1].isupper() for name in keep)


def _url(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


async def search_params_from_form(content_type: str, body: bytes) -> list[tuple[str, str]]:
    """The parameters of ``POST [type]/_search``: an ``application/x-www-form-urlencoded`` body."""
    media = content_type.split(";", 1)[0].strip().lower()
    if body and media != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded parameters")
    return parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
