"""Batch and transaction Bundles: https://hl7.org/fhir/R4/http.html#transaction.

A transaction runs every entry in one unit of work: all succeed or nothing is stored.
Entries are processed in the order the specification fixes (DELETE, POST, PUT/PATCH, GET),
``urn:uuid`` full URLs and conditional references (``Patient?identifier=...``) are resolved
and rewritten before any resource is validated; the criteria of conditional creates and
updates are locked first, as a conditional create on its own locks them. A batch runs each
entry on its own and reports each outcome in its response entry.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from fhir_norse.outcomes import (
    BadRequest,
    FhirError,
    Issue,
    NotFound,
    PreconditionFailed,
)
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import (
    FhirService,
    InteractionRequest,
    dumps,
    match,
    write_entry,
)
from fhir_norse.server.repository import PendingCreate, Repository, WriteOutcome, loads, record_refusal
from fhir_norse.server.resources import check_type, new_id
from fhir_norse.server.validation import check_depth
from fhir_norse.store.resource_types import SUPPORTED_TYPE_SET
from fhir_norse.store.search.request import SearchRequest

JsonDict = dict[str, Any]
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_ENTRY_INTERACTION = {
    "DELETE": "delete",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "GET": "read",
    "HEAD": "read",
}


@dataclass(slots=True)
class EntryRequest:
    index: int
    method: str
    url: str
    res_type: str
    res_id: str | None
    query: str | None
    resource: JsonDict | None
    full_url: str | None
    if_match: str | None
    if_none_exist: str | None
    if_none_match: str | None

    @property
    def path(self) -> str:
        """The entry's path below the base, without the query (``Type``, ``Type/id``, ...); a
        conditional update whose target was resolved becomes an update of that id."""
        path = urlsplit(self.url).path.strip("/")
        if self.res_id is not None and "/" not in path:
            return f"{self.res_type}/{self.res_id}"
        return path


def _parse_url(url: str) -> tuple[str, str | None, str | None, str | None]:
    """``Type``, ``Type/id``, ``Type/id/_history/v`` or ``Type?query`` -> (type, id, version, query)."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    segments = path.split("/") if path else []
    if not segments:
        raise BadRequest(f"Entry request url '{url}' names no resource type")
    res_type = segments[0]
    res_id = segments[1] if len(segments) > 1 else None
    version = None
    if len(segments) == 4 and segments[2] == "_history":
        version = segments[3]
    elif len(segments) > 2:
        raise BadRequest(f"Entry request url '{url}' is not supported in a Bundle")
    return res_type, res_id, version, parts.query or None


def parse_entries(bundle: JsonDict, kind: str) -> list[EntryRequest]:
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be an array", expression="Bundle.entry")
    parsed = []
    for i, entry in enumerate(entries):
        where = f"Bundle.entry[{i}]"
        if not isinstance(entry, dict):
            raise BadRequest("A Bundle entry must be an object", expression=where)
        request = entry.get("request")
        if not isinstance(request, dict) or not request.get("method") or not request.get("url"):
            raise BadRequest(
                f"Each {kind} entry needs request.method and request.url", expression=f"{where}.request"
            )
        method = str(request["method"]).upper()
        if method not in _ORDER:
            raise BadRequest(f"Unsupported entry method '{method}'", expression=f"{where}.request.method")
        resource = entry.get("resource")
        if resource is not None and not isinstance(resource, dict):
            raise BadRequest("Bundle.entry.resource must be an object", expression=f"{where}.resource")
        if method in ("POST", "PUT") and resource is None:
            raise BadRequest(f"A {method} entry needs a resource", expression=f"{where}.resource")
        url = str(request["url"])
        res_type, res_id, _version, query = _parse_url(url)
        parsed.append(
            EntryRequest(
                index=i,
                method=method,
                url=url,
                res_type=res_type,
                res_id=res_id,
                query=query,
                resource=resource,
                full_url=entry.get("fullUrl"),
                if_match=request.get("ifMatch"),
                if_none_exist=request.get("ifNoneExist"),
                if_none_match=request.get("ifNoneMatch"),
            )
        )
    return parsed


class BundleProcessor:
    """Runs the entries of a batch or transaction through the interaction table, each with the same
    access, compartment, validation and audit rules as on its own (the repository applies them)."""

    def __init__(self, service: FhirService) -> None:
        self.service = service

    def process(self, ctx: RequestContext, bundle: Any) -> Result:
        check_depth(bundle)
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise BadRequest("POST to the base URL takes a Bundle of type batch or transaction")
        kind = bundle.get("type")
        if kind == "transaction":
            return self.transaction(ctx, bundle)
        if kind == "batch":
            return self.batch(ctx, bundle)
        raise BadRequest(
            f"Bundle.type must be 'batch' or 'transaction', not '{kind}'", expression="Bundle.type"
        )

    # ------------------------------------------------------------------ transaction
    def transaction(self, ctx: RequestContext, bundle: JsonDict) -> Result:
        entries = parse_entries(bundle, "transaction")
        responses: dict[int, JsonDict] = {}
        try:
            with self.service.audited_session(ctx, "transaction", None) as repo:
                ids = self._assign_ids(repo, entries)
                for entry in entries:
                    if entry.resource is not None:
                        entry.resource = self._rewrite_references(repo, entry.resource, ids, entry.index)
                # Plain creates of types no hook or canonical rule watches are checked one by one and
                # stored together, before any other entry runs (:meth:`Repository.store_creates`).
                pending: list[tuple[EntryRequest, PendingCreate]] = []
                for entry in sorted(entries, key=lambda e: _ORDER[e.method]):
                    if self._batchable(repo, entry):
                        pending.append((entry, self._check_create(repo, entry)))
                        continue
                    self._store_pending(repo, ctx, pending, responses)
                    responses[entry.index] = self._run(repo, ctx, entry)
                self._store_pending(repo, ctx, pending, responses)
        except FhirError as error:
            raise _at_entry(error, getattr(error, "entry_index", None)) from error
        ordered = [responses[e.index] for e in entries]
        return Result(200, raw=_response_bundle("transaction-response", ordered))

    def _assign_ids(self, repo: Repository, entries: list[EntryRequest]) -> dict[str, str]:
        """Map each entry's fullUrl to the ``Type/id`` it will have once stored. The criteria of the
        conditional creates and updates are locked first, all at once (:meth:`Repository.lock_criteria`),
        so that concurrent transactions with equal criteria match what the first one stored."""
        criteria = _conditional_criteria(repo, entries)
        repo.lock_criteria(*criteria.values())
        ids: dict[str, str] = {}
        for entry in entries:
            try:
                check_type(entry.res_type)
                target: str | None = None
                request = criteria.get(entry.index)
                if entry.method == "POST":
                    if request is not None:
                        found = repo.single_match(request, f"ifNoneExist '{entry.if_none_exist}'", "create")
                        if found is not None:
                            entry.res_id = found.res_id
                            target = f"{entry.res_type}/{found.res_id}"
                    if target is None:
                        entry.res_id = new_id()
                        target = f"{entry.res_type}/{entry.res_id}"
                elif entry.method == "PUT" and request is not None:
                    found = repo.single_match(request, f"Conditional update '{entry.query}'", "update")
                    body_id = (entry.resource or {}).get("id")
                    entry.res_id = found.res_id if found else (str(body_id) if body_id else new_id())
                    entry.query = None
                    if entry.resource is not None:
                        entry.resource = {**entry.resource, "id": entry.res_id}
                    target = f"{entry.res_type}/{entry.res_id}"
                elif entry.method == "PUT" and entry.res_id is not None:
                    target = f"{entry.res_type}/{entry.res_id}"
                if target and entry.full_url:
                    if entry.full_url in ids:
                        raise BadRequest(f"fullUrl '{entry.full_url}' appears twice in the transaction")
                    ids[entry.full_url] = target
            except FhirError as error:
                error.entry_index = entry.index  # type: ignore[attr-defined]
                raise
        return ids

    def _rewrite_references(self, repo: Repository, value: Any, ids: dict[str, str], index: int) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if key == "reference" and isinstance(item, str):
                    out[key] = self._resolve_reference(repo, item, ids, index)
                else:
                    out[key] = self._rewrite_references(repo, item, ids, index)
            return out
        if isinstance(value, list):
            return [self._rewrite_references(repo, item, ids, index) for item in value]
        return value

    def _resolve_reference(self, repo: Repository, reference: str, ids: dict[str, str], index: int) -> str:
        if reference in ids:
            return ids[reference]
        if reference.startswith(("urn:uuid:", "urn:oid:")):
            raise _entry_error(NotFound(f"Reference '{reference}' names no entry of this transaction"), index)
        if "?" in reference and not reference.startswith(("http://", "https://", "#")):
            res_type, _, query = reference.partition("?")
            try:
                what = f"Conditional reference '{reference}'"
                found = repo.single_match(repo.conditional(res_type, query), what, "read")
                if found is None:
                    raise PreconditionFailed(f"{what} matches no resource; it must match exactly one")
            except FhirError as error:
                raise _entry_error(error, index) from error
            return f"{res_type}/{found.res_id}"
        return reference

    @staticmethod
    def _batchable(repo: Repository, entry: EntryRequest) -> bool:
        return (
            entry.method == "POST"
            and not entry.if_none_exist
            and entry.res_id is not None
            and entry.resource is not None
            and entry.res_type in SUPPORTED_TYPE_SET
            and repo.batchable_create(entry.res_type)
        )

    @staticmethod
    def _check_create(repo: Repository, entry: EntryRequest) -> PendingCreate:
        assert entry.resource is not None and entry.res_id is not None
        try:
            return repo.check_create(entry.res_type, entry.resource, entry.res_id)
        except FhirError as error:
            error.entry_index = entry.index  # type: ignore[attr-defined]
            raise

    @staticmethod
    def _store_pending(
        repo: Repository,
        ctx: RequestContext,
        pending: list[tuple[EntryRequest, PendingCreate]],
        responses: dict[int, JsonDict],
    ) -> None:
        """Store the creates checked so far in one batch and answer their entries."""
        if not pending:
            return
        outcomes = repo.store_creates([checked for _, checked in pending])
        for (entry, _), outcome in zip(pending, outcomes, strict=True):
            responses[entry.index] = write_entry(ctx, outcome)
        pending.clear()

    def _run(self, repo: Repository, ctx: RequestContext, entry: EntryRequest) -> JsonDict:
        """One entry, dispatched through the interaction table."""
        try:
            check_type(entry.res_type)
            if entry.method == "POST" and entry.if_none_exist and entry.res_id is not None:
                existing = repo.get(entry.res_type, entry.res_id)
                if existing is not None:
                    outcome = WriteOutcome(200, existing, loads(existing.body_text), noop=True)
                    return write_entry(ctx, outcome)
            method = "GET" if entry.method == "HEAD" else entry.method
            path = entry.res_type if entry.method == "POST" else entry.path
            found = match(method, path)
            if found is None or found[0].entry is None:
                raise BadRequest(f"Entry request '{entry.method} {entry.url}' is not supported in a Bundle")
            interaction, parts = found
            assert interaction.entry is not None
            body: Any = entry.resource
            if entry.method == "PATCH":
                body = _patch_document(entry.resource)
            request = InteractionRequest(
                res_type=entry.res_type,
                res_id=parts.get("res_id") or (entry.res_id if entry.method == "POST" else None),
                version=parts.get("version"),
                params=parse_qsl(entry.query or "", keep_blank_values=True),
                body=body,
                if_match=entry.if_match,
                if_none_match=entry.if_none_match,
            )
            if interaction.needs_query and not request.params:
                raise BadRequest(f"A {entry.method} entry on a type needs search parameters")
            return interaction.entry(ctx, request, interaction.execute(repo, request))
        except FhirError as error:
            error.entry_index = entry.index  # type: ignore[attr-defined]
            raise

    # ------------------------------------------------------------------ batch
    def batch(self, ctx: RequestContext, bundle: JsonDict) -> Result:
        entries = parse_entries(bundle, "batch")
        responses: dict[int, JsonDict] = {}
        for entry in sorted(entries, key=lambda e: _ORDER[e.method]):
            try:
                with self.service.session(ctx, read_only=entry.method in ("GET", "HEAD")) as repo:
                    single = [entry]
                    ids = self._assign_ids(repo, single)
                    if entry.resource is not None:
                        entry.resource = self._rewrite_references(repo, entry.resource, ids, entry.index)
                    responses[entry.index] = self._run(repo, ctx, entry)
            except FhirError as error:
                record_refusal(
                    self.service.kernel,
                    ctx,
                    _ENTRY_INTERACTION[entry.method],
                    "failed" if error.status >= 500 else "refused",
                    entry.res_type if entry.res_type in SUPPORTED_TYPE_SET else None,
                    entry.res_id,
                    None,
                    f"{error.status}: {error.message}",
                )
                responses[entry.index] = {
                    "response": {
                        "status": f"{error.status} {_reason(error.status)}",
                        "outcome": error.outcome(),
                    }
                }
        ordered = [responses[e.index] for e in entries]
        return Result(200, raw=_response_bundle("batch-response", ordered))


def _patch_document(resource: JsonDict | None) -> Any:
    if resource is None or resource.get("resourceType") != "Binary" or "data" not in resource:
        raise BadRequest("A PATCH entry carries its JSON Patch as a Binary resource with base64 data")
    try:
        document = orjson.loads(base64.b64decode(resource["data"]))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise BadRequest(f"The PATCH entry's Binary does not hold a JSON Patch: {exc}") from exc
    # A body of its own inside the Bundle's, so its depth was not checked with it.
    check_depth(document, "The PATCH entry's JSON Patch")
    return document


def _conditional_criteria(repo: Repository, entries: list[EntryRequest]) -> dict[int, SearchRequest]:
    """The parsed criteria of the conditional creates (``ifNoneExist``) and conditional updates
    (``PUT Type?query``) of a transaction, by entry index."""
    out: dict[int, SearchRequest] = {}
    for entry in entries:
        if entry.method == "POST":
            query = entry.if_none_exist
        elif entry.method == "PUT" and entry.res_id is None:
            query = entry.query
        else:
            query = None
        if not query:
            continue
        try:
            out[entry.index] = repo.conditional(entry.res_type, query)
        except FhirError as error:
            raise _entry_error(error, entry.index) from error
    return out


def _response_bundle(kind: str, entries: list[JsonDict]) -> str:
    return dumps({"resourceType": "Bundle", "type": kind, "entry": entries})


def _entry_error(error: FhirError, index: int) -> FhirError:
    error.entry_index = index  # type: ignore[attr-defined]
    return error


def _at_entry(error: FhirError, index: int | None) -> FhirError:
    """The same error, its issues located at the failing entry; nothing of the transaction was stored."""
    if index is None:
        return error
    located = []
    for issue in error.issues:
        expression = tuple(
            f"Bundle.entry[{index}].resource.{e.split('.', 1)[1]}" if "." in e else f"Bundle.entry[{index}]"
            for e in issue.expression
        ) or (f"Bundle.entry[{index}]",)
        located.append(
            Issue(
                f"Transaction failed at entry {index}; nothing was stored: {issue.diagnostics}",
                code=issue.code,
                severity=issue.severity,
                expression=expression,
            )
        )
    clone = type(error)(error.message, issues=located, headers=error.headers)
    return clone


_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
}


def _reason(status: int) -> str:
    return _REASONS.get(status, "")
