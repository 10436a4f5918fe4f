"""The FHIR RESTful interactions, as one table: https://hl7.org/fhir/R4/http.html.

Each :class:`Interaction` names its capability code, HTTP method, path and level, how its body is
read, and three functions: ``execute`` (one call on the caller's :class:`Repository`, which checks
access, validates, indexes, stores and audits), ``render`` (the HTTP answer) and ``entry`` (the
response entry of a batch or transaction Bundle). The table drives the routes
(:mod:`fhir_norse.api.routes`), the dispatch of Bundle entries (:mod:`fhir_norse.server.bundles`) and
the CapabilityStatement (:mod:`fhir_norse.server.capability`), so the three cannot disagree.

:class:`FhirService` runs an interaction for a request: in one transaction, its refusal or failure
recorded in an AuditEvent of its own (the work itself is rolled back). On SQLite the reads (read,
vread, search, history) run in a read-only transaction, which never takes the write lock; their
AuditEvent is written right after it, before the answer is sent (:meth:`Repository.open
<fhir_norse.server.repository.Repository.open>`). Every body is checked for its nesting depth once,
where it enters (:func:`~fhir_norse.server.validation.check_depth`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from fhir_norse.outcomes import BadRequest, FhirError, Issue, MethodNotAllowed, information, operation_outcome
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.operations.registry import OperationCall, OperationRegistry
from fhir_norse.server.repository import (
    HistoryPage,
    JsonDict,
    Kernel,
    Repository,
    WriteOutcome,
    loads,
    record_event,
    record_refusal,
)
from fhir_norse.server.resources import (
    check_type,
    dumps,
    etag,
    http_date,
    instant,
    parse_etag,
    parse_http_date,
)
from fhir_norse.server.search.parse import parse_search
from fhir_norse.server.searching import search_bundle
from fhir_norse.server.validation import check_depth
from fhir_norse.store.search.params import SearchParamRegistry
from fhir_norse.store.search.values import date_range
from fhir_norse.store.storage import Storage, StoredResource

Level = Literal["system", "type", "instance"]
BodyKind = Literal["none", "resource", "patch", "form"]
# The interactions that only read (on SQLite they run in a read-only transaction: Repository.open).
READ_CODES = frozenset({"read", "vread", "search-type", "history-system", "history-type", "history-instance"})

__all__ = ["FhirService", "Interaction", "InteractionRequest", "JsonDict", "WriteOutcome", "dumps", "loads"]


@dataclass(frozen=True, slots=True)
class InteractionRequest:
    """What an interaction takes from a request, whether it came over HTTP or in a Bundle entry."""

    res_type: str | None = None
    res_id: str | None = None
    version: str | None = None
    params: list[tuple[str, str]] = field(default_factory=list)
    body: Any = None
    if_match: str | None = None
    if_none_match: str | None = None
    if_none_exist: str | None = None
    if_modified_since: str | None = None

    @property
    def query(self) -> str:
        return urlencode(self.params)

    def resource_type(self) -> str:
        assert self.res_type is not None
        return self.res_type

    def resource_id(self) -> str:
        assert self.res_id is not None
        return self.res_id

    def audit_query(self) -> str | None:
        """The request as recorded in the audit trail of a refusal."""
        if self.res_id is None and self.params and self.res_type is not None:
            return f"{self.res_type}?{self.query}"
        return None


Execute = Callable[[Repository, InteractionRequest], Any]
Render = Callable[["FhirService", RequestContext, InteractionRequest, Any], Result]
Entry = Callable[[RequestContext, InteractionRequest, Any], JsonDict]


@dataclass(frozen=True, slots=True)
class Interaction:
    """One row of the interaction table (module doc)."""

    code: str  # the CapabilityStatement code (read, vread, update, ...)
    method: str
    path: str  # below the FHIR base, e.g. "/{res_type}/{res_id}"
    level: Level
    body: BodyKind
    execute: Execute
    render: Render
    entry: Entry | None = None  # None: not allowed as a Bundle entry
    # Conditional variants (PUT/DELETE on a type) need search parameters.
    needs_query: bool = False

    @property
    def read_only(self) -> bool:
        return self.code in READ_CODES

    def pattern(self) -> re.Pattern[str]:
        """The path as a regular expression with named groups (compiled once, cached by ``re``)."""
        regex = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m.group(1)}>[^/]+)", self.path)
        return re.compile(f"^{regex}$")


# ---------------------------------------------------------------------- results


def version_headers(stored: StoredResource) -> dict[str, str]:
    return {"ETag": etag(stored.version), "Last-Modified": http_date(stored.last_updated)}


def write_result(ctx: RequestContext, outcome: WriteOutcome) -> Result:
    """Render a create/update/patch answer, honouring ``Prefer: return``."""
    stored = outcome.stored
    headers = version_headers(stored)
    headers["Location"] = f"{ctx.base_url}/{stored.res_type}/{stored.res_id}/_history/{stored.version}"
    if ctx.prefer.return_ == "minimal":
        return Result(outcome.status, headers=headers)
    if ctx.prefer.return_ == "OperationOutcome":
        verb = "found (no change)" if outcome.noop else "created" if outcome.created else "updated"
        message = Issue(
            f"{stored.res_type}/{stored.res_id} {verb}", code="informational", severity="information"
        )
        return Result(outcome.status, body=operation_outcome([message, *outcome.warnings]), headers=headers)
    return Result(outcome.status, body=outcome.body, headers=headers)


def delete_result(ctx: RequestContext, outcome: WriteOutcome) -> Result:
    headers = {"ETag": etag(outcome.stored.version)}
    if ctx.prefer.return_ == "OperationOutcome":
        text = "was already deleted" if outcome.noop else "deleted"
        return Result(
            200,
            body=information(f"{outcome.stored.res_type}/{outcome.stored.res_id} {text}"),
            headers=headers,
        )
    return Result(204, headers=headers)


def write_entry(ctx: RequestContext, outcome: WriteOutcome) -> JsonDict:
    """The response entry of a write in a batch or transaction."""
    stored = outcome.stored
    status = "201 Created" if outcome.status == 201 else "200 OK"
    response: JsonDict = {
        "status": status,
        "location": f"{stored.res_type}/{stored.res_id}/_history/{stored.version}",
        "etag": etag(stored.version),
        "lastModified": instant(stored.last_updated),
    }
    if outcome.warnings:
        response["outcome"] = operation_outcome(list(outcome.warnings))
    entry: JsonDict = {"fullUrl": f"{ctx.base_url}/{stored.res_type}/{stored.res_id}"}
    if ctx.prefer.return_ == "representation" and outcome.body is not None:
        entry["resource"] = outcome.body
    entry["response"] = response
    return entry


def _etag_matches(header: str, version: int) -> bool:
    if header.strip() == "*":
        return True
    return any(parse_etag(part) == str(version) for part in header.split(",") if part.strip())


# ---------------------------------------------------------------------- the interactions


def _read(repo: Repository, req: InteractionRequest) -> StoredResource:
    return repo.read(req.resource_type(), req.resource_id())


def _render_read(service: FhirService, ctx: RequestContext, req: InteractionRequest, stored: Any) -> Result:
    headers = version_headers(stored)
    if req.if_none_match is not None and _etag_matches(req.if_none_match, stored.version):
        return Result(304, headers=headers)
    if req.if_modified_since is not None:
        since = parse_http_date(req.if_modified_since)
        if since is not None and stored.last_updated.replace(microsecond=0) <= since:
            return Result(304, headers=headers)
    return Result(200, raw=stored.body_text, headers=headers)


def _read_entry(ctx: RequestContext, req: InteractionRequest, stored: Any) -> JsonDict:
    response = {
        "status": "200 OK",
        "etag": etag(stored.version),
        "lastModified": instant(stored.last_updated),
    }
    if req.if_none_match and req.if_none_match.strip() in (etag(stored.version), f'"{stored.version}"'):
        return {"response": {**response, "status": "304 Not Modified"}}
    return {"resource": loads(stored.body_text), "response": response}


def _vread(repo: Repository, req: InteractionRequest) -> StoredResource:
    return repo.read(req.resource_type(), req.resource_id(), version=req.version or "")


def _render_vread(service: FhirService, ctx: RequestContext, req: InteractionRequest, stored: Any) -> Result:
    return Result(200, raw=stored.body_text, headers=version_headers(stored))


def _search(repo: Repository, req: InteractionRequest) -> str:
    res_type = req.resource_type()
    request = parse_search(
        res_type,
        req.params,
        strict=repo.ctx.prefer.handling == "strict",
        registry=repo.kernel.registry,
        limits=repo.kernel.search_limits,
    )
    query = f"{res_type}?{req.query}" if req.params else res_type
    page = repo.search(request, query=query)
    # page.request: the request as run (the AuditEvent search may have ignored parameters it lacks).
    return search_bundle(repo.ctx, page.request, page)


def _render_raw(service: FhirService, ctx: RequestContext, req: InteractionRequest, raw: Any) -> Result:
    return Result(200, raw=raw)


def _search_entry(ctx: RequestContext, req: InteractionRequest, raw: Any) -> JsonDict:
    return {"resource": loads(raw), "response": {"status": "200 OK"}}


def _create(repo: Repository, req: InteractionRequest) -> WriteOutcome:
    return repo.create(req.resource_type(), req.body, if_none_exist=req.if_none_exist, res_id=req.res_id)


def _render_write(service: FhirService, ctx: RequestContext, req: InteractionRequest, outcome: Any) -> Result:
    return write_result(ctx, outcome)


def _write_entry(ctx: RequestContext, req: InteractionRequest, outcome: Any) -> JsonDict:
    return write_entry(ctx, outcome)


def _update(repo: Repository, req: InteractionRequest) -> WriteOutcome:
    return repo.update(req.resource_type(), req.resource_id(), req.body, if_match=req.if_match)


def _conditional_update(repo: Repository, req: InteractionRequest) -> WriteOutcome:
    return repo.conditional_update(req.resource_type(), req.query, req.body, if_match=req.if_match)


def _patch(repo: Repository, req: InteractionRequest) -> WriteOutcome:
    return repo.patch(req.resource_type(), req.resource_id(), req.body, if_match=req.if_match)


def _delete(repo: Repository, req: InteractionRequest) -> WriteOutcome:
    return repo.delete(req.resource_type(), req.resource_id())


def _render_delete(
    service: FhirService, ctx: RequestContext, req: InteractionRequest, outcome: Any
) -> Result:
    return delete_result(ctx, outcome)


def _delete_entry(ctx: RequestContext, req: InteractionRequest, outcome: Any) -> JsonDict:
    if outcome is None:
        return {"response": {"status": "204 No Content"}}
    return {"response": {"status": "204 No Content", "etag": etag(outcome.stored.version)}}


def _conditional_delete(repo: Repository, req: InteractionRequest) -> WriteOutcome | None:
    return repo.conditional_delete(req.resource_type(), req.query)


def _render_conditional_delete(
    service: FhirService, ctx: RequestContext, req: InteractionRequest, outcome: Any
) -> Result:
    if outcome is not None:
        return delete_result(ctx, outcome)
    if ctx.prefer.return_ != "OperationOutcome":
        return Result(204)
    return Result(200, body=information(f"No {req.res_type} matched '{req.query}'; nothing deleted"))


def _history(repo: Repository, req: InteractionRequest) -> tuple[HistoryPage, list[tuple[str, str]]]:
    since: datetime | None = None
    count = repo.kernel.default_count
    before: int | None = None
    after: int | None = None
    for name, value in req.params:
        if name == "_since":
            since = date_range(value)[0]
        elif name == "_count":
            count = _parse_count(value, repo.kernel.max_count)
        elif name == "_cursor":
            before, after = _parse_history_cursor(value)
        elif name in ("_format", "_pretty"):
            continue
        elif repo.ctx.prefer.handling == "strict":
            raise BadRequest(f"Unknown parameter '{name}' for history")
    page = repo.history(
        req.res_type,
        req.res_id,
        since=since,
        before=before,
        after=after,
        count=count,
        query=_query_text(_history_path(req), req.params),
    )
    return page, [(k, v) for k, v in req.params if k in ("_since", "_count")]


def _history_path(req: InteractionRequest) -> str:
    return "/".join(p for p in (req.res_type, req.res_id, "_history") if p)


def _render_history(
    service: FhirService, ctx: RequestContext, req: InteractionRequest, answer: Any
) -> Result:
    page, base_query = answer
    path = _history_path(req)
    links = [{"relation": "self", "url": _link(ctx.base_url, path, req.params)}]
    if page.older:
        links.append(
            {"relation": "next", "url": _link(ctx.base_url, path, [*base_query, ("_cursor", page.older)])}
        )
    if page.newer:
        links.append(
            {"relation": "previous", "url": _link(ctx.base_url, path, [*base_query, ("_cursor", page.newer)])}
        )
    entries = [_history_entry(ctx.base_url, h) for h in page.entries]
    # FHIR forbids empty arrays, so an empty page has no "entry" at all.
    entry_json = ',"entry":[' + ",".join(entries) + "]" if entries else ""
    return Result(
        200, raw='{"resourceType":"Bundle","type":"history","link":' + dumps(links) + entry_json + "}"
    )


def _no_operation(service: FhirService, ctx: RequestContext, req: InteractionRequest, answer: Any) -> Result:
    raise MethodNotAllowed("This HTTP method is not allowed on this address")


INTERACTIONS: tuple[Interaction, ...] = (
    Interaction("history-system", "GET", "/_history", "system", "none", _history, _render_history),
    Interaction("search-type", "GET", "/{res_type}", "type", "none", _search, _render_raw, _search_entry),
    Interaction("search-type", "POST", "/{res_type}/_search", "type", "form", _search, _render_raw),
    Interaction("history-type", "GET", "/{res_type}/_history", "type", "none", _history, _render_history),
    Interaction("create", "POST", "/{res_type}", "type", "resource", _create, _render_write, _write_entry),
    Interaction(
        "update",
        "PUT",
        "/{res_type}",
        "type",
        "resource",
        _conditional_update,
        _render_write,
        _write_entry,
        True,
    ),
    Interaction(
        "delete",
        "DELETE",
        "/{res_type}",
        "type",
        "none",
        _conditional_delete,
        _render_conditional_delete,
        _delete_entry,
        True,
    ),
    Interaction("read", "GET", "/{res_type}/{res_id}", "instance", "none", _read, _render_read, _read_entry),
    Interaction(
        "update", "PUT", "/{res_type}/{res_id}", "instance", "resource", _update, _render_write, _write_entry
    ),
    Interaction(
        "patch", "PATCH", "/{res_type}/{res_id}", "instance", "patch", _patch, _render_write, _write_entry
    ),
    Interaction(
        "delete", "DELETE", "/{res_type}/{res_id}", "instance", "none", _delete, _render_delete, _delete_entry
    ),
    Interaction(
        "history-instance",
        "GET",
        "/{res_type}/{res_id}/_history",
        "instance",
        "none",
        _history,
        _render_history,
    ),
    Interaction(
        "vread",
        "GET",
        "/{res_type}/{res_id}/_history/{version}",
        "instance",
        "none",
        _vread,
        _render_vread,
        _read_entry,
    ),
)

# The codes the CapabilityStatement lists per resource type, in the table's order.
TYPE_INTERACTION_CODES: tuple[str, ...] = tuple(
    dict.fromkeys(i.code for i in INTERACTIONS if i.level != "system" and not i.needs_query)
)
SYSTEM_INTERACTION_CODES: tuple[str, ...] = (
    "transaction",
    "batch",
    *dict.fromkeys(i.code for i in INTERACTIONS if i.level == "system"),
)


def match(method: str, path: str) -> tuple[Interaction, dict[str, str]] | None:
    """The interaction of ``method`` on ``path`` (below the base, e.g. ``Patient/1``), with its path
    parameters: how a Bundle entry's ``request`` is dispatched."""
    path = "/" + path.strip("/")
    for interaction in INTERACTIONS:
        if interaction.method != method:
            continue
        found = interaction.pattern().match(path)
        if found is not None:
            return interaction, found.groupdict()
    return None


# ---------------------------------------------------------------------- the service


class FhirService:
    """Runs interactions and operations for requests, over one :class:`Kernel` (built once)."""

    def __init__(self, kernel: Kernel, operations: OperationRegistry | None = None) -> None:
        self.kernel = kernel
        self.operations = operations or OperationRegistry()

    @property
    def storage(self) -> Storage:
        return self.kernel.storage

    @property
    def registry(self) -> SearchParamRegistry:
        return self.kernel.registry

    @contextmanager
    def session(self, ctx: RequestContext, *, read_only: bool = False) -> Iterator[Repository]:
        """The caller's repository on a new transaction, committed when the block ends without error
        (``read_only``: see :meth:`Repository.open`)."""
        with Repository.open(self.kernel, ctx, read_only=read_only) as repo:
            yield repo

    def record_now(self, event: JsonDict) -> None:
        """Store an AuditEvent in a transaction of its own, committed before this returns (the sink of
        events outside a FHIR interaction: token grants)."""
        record_event(self.kernel, event)

    @contextmanager
    def audited_session(
        self,
        ctx: RequestContext,
        interaction: str,
        res_type: str | None,
        res_id: str | None = None,
        query: str | None = None,
        *,
        read_only: bool = False,
    ) -> Iterator[Repository]:
        """A session whose refusal or failure is recorded in an AuditEvent of its own, after its work
        was rolled back (what every interaction and operation runs in)."""
        try:
            with self.session(ctx, read_only=read_only) as repo:
                yield repo
        except FhirError as error:
            outcome = "failed" if error.status >= 500 else "refused"
            reason = f"{error.status}: {error.message}"
            record_refusal(self.kernel, ctx, interaction, outcome, res_type, res_id, query, reason)
            raise
        except Exception:
            record_refusal(
                self.kernel, ctx, interaction, "failed", res_type, res_id, query, "500: internal error"
            )
            raise

    def perform(self, ctx: RequestContext, interaction: Interaction, req: InteractionRequest) -> Result:
        """Run one interaction of the table for a request."""
        if interaction.needs_query and not req.params:
            raise MethodNotAllowed(
                f"{interaction.method} on a resource type needs search parameters (conditional "
                f"{interaction.code}) or an id"
            )
        query = req.audit_query()
        if interaction.code.startswith("history"):
            query = _query_text(_history_path(req), req.params)
        with self.audited_session(
            ctx, interaction.code, req.res_type, req.res_id, query, read_only=interaction.read_only
        ) as repo:
            check_depth(req.body)
            answer = interaction.execute(repo, req)
        return interaction.render(self, ctx, req, answer)

    def invoke(self, call: OperationCall, name: str, *, method: str) -> Result:
        """Run the operation ``$name`` (https://hl7.org/fhir/R4/operations.html)."""
        check_type(call.res_type)
        check_depth(call.body)
        operation = self.operations.find(name, call.res_type, instance=call.res_id is not None, method=method)
        return operation.handler(self, call)

    def invoke_system(self, call: OperationCall, name: str, *, method: str) -> Result:
        """Run the system-level operation ``[base]/$name`` (``call.res_type`` is "")."""
        check_depth(call.body)
        return self.operations.find_system(name, method=method).handler(self, call)

    # In-process callers (commands, tools, tests) run the same table rows as HTTP does.
    def read(self, ctx: RequestContext, res_type: str, res_id: str) -> Result:
        return self.perform(
            ctx, _by_path("GET", "/{res_type}/{res_id}"), InteractionRequest(res_type, res_id)
        )

    def create(
        self, ctx: RequestContext, res_type: str, body: JsonDict, if_none_exist: str | None = None
    ) -> Result:
        request = InteractionRequest(res_type, body=body, if_none_exist=if_none_exist)
        return self.perform(ctx, _by_path("POST", "/{res_type}"), request)

    def update(
        self, ctx: RequestContext, res_type: str, res_id: str, body: JsonDict, if_match: str | None = None
    ) -> Result:
        request = InteractionRequest(res_type, res_id, body=body, if_match=if_match)
        return self.perform(ctx, _by_path("PUT", "/{res_type}/{res_id}"), request)

    def delete(self, ctx: RequestContext, res_type: str, res_id: str) -> Result:
        request = InteractionRequest(res_type, res_id)
        return self.perform(ctx, _by_path("DELETE", "/{res_type}/{res_id}"), request)


def _by_path(method: str, path: str) -> Interaction:
    return next(i for i in INTERACTIONS if i.method == method and i.path == path)


def _query_text(path: str, params: list[tuple[str, str]]) -> str:
    query = urlencode(params)
    return f"{path}?{query}" if query else path


def _parse_count(value: str, maximum: int) -> int:
    if not value.isdigit():
        raise BadRequest(f"_count must be a non-negative integer, not '{value}'")
    return min(int(value), maximum)


def _parse_history_cursor(value: str) -> tuple[int | None, int | None]:
    if len(value) > 1 and value[0] in "ab" and value[1:].isdigit():
        pk = int(value[1:])
        return (pk, None) if value[0] == "b" else (None, pk)
    raise BadRequest(f"Invalid history paging cursor '{value}'")


def _link(base: str, path: str, params: list[tuple[str, str]]) -> str:
    query = urlencode(params)
    return f"{base}/{path}" + (f"?{query}" if query else "")


def _history_entry(base: str, h: StoredResource) -> str:
    url = f"{h.res_type}/{h.res_id}"
    method = {"create": "POST", "update": "PUT", "patch": "PATCH", "delete": "DELETE"}.get(
        h.method or "", "PUT"
    )
    request = {"method": method, "url": url if method != "POST" else h.res_type}
    status = {"POST": "201 Created", "DELETE": "204 No Content"}.get(method, "200 OK")
    response = {"status": status, "etag": etag(h.version), "lastModified": instant(h.last_updated)}
    parts = ['{"fullUrl":', dumps(f"{base}/{url}")]
    if h.body_text is not None:
        parts += [',"resource":', h.body_text]
    parts += [',"request":', dumps(request), ',"response":', dumps(response), "}"]
    return "".join(parts)


def parse_query(query: str) -> list[tuple[str, str]]:
    return parse_qsl(query.lstrip("?"), keep_blank_values=True)
