"""The search interaction: a parsed request in, a ``searchset`` Bundle out.

https://hl7.org/fhir/R4/search.html and https://hl7.org/fhir/R4/bundle.html#searchset.
Matched and included resources are copied from the store as JSON text into the Bundle;
only ``_summary`` and ``_elements`` need the resources parsed, to cut them down.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
import sqlalchemy as sa

from fhir_norse import definitions
from fhir_norse.auth import policy as compartments
from fhir_norse.auth.caller import Access
from fhir_norse.outcomes import Forbidden, Issue, UnsupportedMediaType, operation_outcome
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import FhirService, dumps
from fhir_norse.server.resources import check_type
from fhir_norse.server.search.links import page_query, self_query
from fhir_norse.server.search.parse import parse_search
from fhir_norse.store.search import engine
from fhir_norse.store.search.params import SearchParamRegistry
from fhir_norse.store.search.request import CompartmentCriterion, SearchRequest
from fhir_norse.store.storage import StoredResource

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


def search(service: FhirService, ctx: RequestContext, res_type: str, params: list[tuple[str, str]]) -> Result:
    """The search interaction, audited (one AuditEvent per search, success or refusal)."""
    query = f"{res_type}?{urlencode(params)}" if params else res_type
    with service.refusals_audited(ctx, "search-type", res_type, query=query):
        check_type(res_type)
        # One transaction runs the search and records its AuditEvent: one durable commit.
        with service.repo.write() as uow:
            result, patients = _search(service, uow.conn, ctx, res_type, params)
            service.record(
                uow,
                service.audit_event(ctx, "search-type", "success", res_type, query=query, patients=patients),
            )
        return result


def search_in(
    service: FhirService,
    conn: sa.Connection,
    ctx: RequestContext,
    res_type: str,
    params: list[tuple[str, str]],
) -> Result:
    """A search inside another unit of work (a GET entry of a Bundle); audited by the caller."""
    return _search(service, conn, ctx, res_type, params)[0]


def _search(
    service: FhirService,
    conn: sa.Connection,
    ctx: RequestContext,
    res_type: str,
    params: list[tuple[str, str]],
) -> tuple[Result, set[str]]:
    access = service.access(ctx, "search-type", res_type)
    patients = service.reachable_patients(conn, access)
    request = parse_search(
        res_type, params, strict=ctx.prefer.handling == "strict", registry=service.registry
    )
    restriction = compartments.search_restriction(res_type, patients)
    if restriction is not None and patients is not None:
        request = replace(
            request, criteria=(*request.criteria, CompartmentCriterion(res_type, restriction, patients))
        )
    page = engine.execute_search(conn, request)
    if page.includes:
        # Included resources pass the same scope and compartment tests as a read of each.
        allowed: dict[str, Access | None] = {}
        kept = [row for row in page.includes if _include_visible(service, ctx, conn, row, allowed)]
        page = replace(page, includes=kept)
    concerned = set(patients) if patients is not None else _query_patients(request)
    return Result(200, raw=_bundle(ctx, request, page)), concerned


def _include_visible(
    service: FhirService,
    ctx: RequestContext,
    conn: sa.Connection,
    row: Any,
    allowed: dict[str, Access | None],
) -> bool:
    if row.res_type not in allowed:
        try:
            allowed[row.res_type] = service.access(ctx, "read", row.res_type)
        except Forbidden:
            allowed[row.res_type] = None
    access = allowed[row.res_type]
    if access is None:
        return False
    if not access.restricted or not compartments.is_compartment_type(row.res_type):
        return True
    patients = service.reachable_patients(conn, access)
    rows = service.extractor.extract(orjson.loads(row.body_text))
    return compartments.visible(row.res_type, row.res_id, rows, patients)


def _query_patients(request: SearchRequest) -> set[str]:
    """The patients a search names (``patient=``, ``subject=Patient/x``), for the audit trail."""
    found: set[str] = set()
    for name, value in request.params:
        base = name.split(":", 1)[0]
        if base in ("patient", "subject") or name.endswith(":Patient"):
            for part in value.split(","):
                part = part.rsplit("/", 1)[-1] if "Patient/" in part or base == "patient" else ""
                if part:
                    found.add(part)
    return found


def _bundle(ctx: RequestContext, request: SearchRequest, page: engine.SearchPage) -> str:
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


def find_matching(
    conn: sa.Connection,
    registry: SearchParamRegistry,
    res_type: str,
    query: str,
    limit: int,
    *,
    patients: frozenset[str] | None = None,
) -> list[StoredResource]:
    """Resources matching the search ``query`` of a conditional interaction (strict parsing),
    within the compartments of ``patients`` for a restricted caller."""
    params = parse_qsl(query.lstrip("?"), keep_blank_values=True)
    restriction = compartments.search_restriction(res_type, patients)
    extra = (
        (CompartmentCriterion(res_type, restriction, patients),)
        if restriction is not None and patients is not None
        else ()
    )
    request = parse_search(res_type, params, strict=True, registry=registry)
    rows = engine.find_matching(conn, request, limit, extra=extra)
    return [
        StoredResource(r.pk, r.res_type, r.res_id, r.version, r.last_updated, False, r.body_text)
        for r in rows
    ]
