"""The FHIR RESTful interactions as plain functions over the repository.

https://hl7.org/fhir/R4/http.html. Each method takes a :class:`RequestContext`, passes the
authorization seam, and returns a :class:`Result`; it knows nothing of HTTP frameworks.
Writes validate the resource, stamp the server-owned meta, extract the search-index rows and
save everything in one unit of work.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jsonpatch
import orjson

from fhir_norse.auth.caller import Authorizer
from fhir_norse.fhir.context import RequestContext, Result
from fhir_norse.fhir.errors import (
    BadRequest,
    FhirError,
    Gone,
    NotFound,
    PreconditionFailed,
    Unprocessable,
    information,
)
from fhir_norse.fhir.resources import (
    check_id,
    check_type,
    etag,
    http_date,
    instant,
    new_id,
    now_ms,
    parse_etag,
    parse_http_date,
    stamp_meta,
)
from fhir_norse.fhir.search.extract import IndexExtractor
from fhir_norse.fhir.search.registry import SearchParamRegistry
from fhir_norse.fhir.search.values import date_range
from fhir_norse.fhir.validation import validate_resource
from fhir_norse.store.repository import Repository, StoredResource, UnitOfWork

JsonDict = dict[str, Any]


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What a write did, for the HTTP answer and for transaction entries."""

    status: int  # 200 updated, 201 created, 204 deleted
    stored: StoredResource
    body: JsonDict | None
    created: bool = False
    # A conditional create that matched an existing resource, or a no-op delete.
    noop: bool = False


class FhirService:
    """Interactions over one repository, one SearchParameter registry and one authorizer."""

    def __init__(
        self,
        repository: Repository,
        registry: SearchParamRegistry,
        extractor: IndexExtractor,
        authorizer: Authorizer,
        *,
        default_count: int = 50,
        max_count: int = 1000,
    ) -> None:
        self.repo = repository
        self.registry = registry
        self.extractor = extractor
        self.authorizer = authorizer
        self.default_count = default_count
        self.max_count = max_count

    # ------------------------------------------------------------------ reads
    def read(
        self,
        ctx: RequestContext,
        res_type: str,
        res_id: str,
        *,
        if_none_match: str | None = None,
        if_modified_since: str | None = None,
    ) -> Result:
        check_type(res_type)
        self.authorizer.check(ctx.caller, "read", res_type)
        with self.repo.read() as view:
            stored = view.current(res_type, check_id(res_id))
        if stored is None:
            raise NotFound(f"{res_type}/{res_id} is not known")
        if stored.deleted:
            raise Gone(f"{res_type}/{res_id} was deleted", headers=version_headers(stored))
        headers = version_headers(stored)
        if if_none_match is not None and _etag_matches(if_none_match, stored.version):
            return Result(304, headers=headers)
        if if_modified_since is not None:
            since = parse_http_date(if_modified_since)
            if since is not None and stored.last_updated.replace(microsecond=0) <= since:
                return Result(304, headers=headers)
        return Result(200, raw=stored.body_text, headers=headers)

    def vread(self, ctx: RequestContext, res_type: str, res_id: str, version: str) -> Result:
        check_type(res_type)
        self.authorizer.check(ctx.caller, "vread", res_type)
        if not version.isdigit():
            raise NotFound(f"{res_type}/{res_id}/_history/{version} is not known")
        with self.repo.read() as view:
            stored = view.version(res_type, check_id(res_id), int(version))
        if stored is None:
            raise NotFound(f"{res_type}/{res_id}/_history/{version} is not known")
        if stored.deleted:
            raise Gone(
                f"Version {version} of {res_type}/{res_id} is a deletion", headers=version_headers(stored)
            )
        return Result(200, raw=stored.body_text, headers=version_headers(stored))

    # ------------------------------------------------------------------ writes
    def create(
        self, ctx: RequestContext, res_type: str, body: JsonDict, if_none_exist: str | None = None
    ) -> Result:
        check_type(res_type)
        self.authorizer.check(ctx.caller, "create", res_type)
        with self.repo.write() as uow:
            outcome = self.create_in(uow, ctx, res_type, body, if_none_exist)
        return self.write_result(ctx, outcome)

    def create_in(
        self,
        uow: UnitOfWork,
        ctx: RequestContext,
        res_type: str,
        body: JsonDict,
        if_none_exist: str | None = None,
        *,
        res_id: str | None = None,
    ) -> WriteOutcome:
        validate_resource(body, expected_type=res_type)
        if if_none_exist:
            uow.advisory_lock(f"create:{res_type}?{if_none_exist}")
            matches = self.find_matching(uow, res_type, if_none_exist, limit=2)
            if len(matches) > 1:
                raise PreconditionFailed(
                    f"If-None-Exist '{if_none_exist}' matches {len(matches)} {res_type} resources"
                )
            if matches:
                found = matches[0]
                return WriteOutcome(200, found, _loads(found.body_text), noop=True)
        return self._save(uow, res_type, res_id or new_id(), body, previous=None, method="create")

    def update(
        self, ctx: RequestContext, res_type: str, res_id: str, body: JsonDict, if_match: str | None = None
    ) -> Result:
        check_type(res_type)
        self.authorizer.check(ctx.caller, "update", res_type)
        with self.repo.write() as uow:
            outcome = self.update_in(uow, ctx, res_type, res_id, body, if_match)
        return self.write_result(ctx, outcome)

    def update_in(
        self,
        uow: UnitOfWork,
        ctx: RequestContext,
        res_type: str,
        res_id: str,
        body: JsonDict,
        if_match: str | None = None,
    ) -> WriteOutcome:
        check_id(res_id)
        if body.get("id") is None:
            raise BadRequest("The resource in an update must carry its id", expression=f"{res_type}.id")
        if body.get("id") != res_id:
            raise BadRequest(
                f"The resource id '{body.get('id')}' does not match the URL id '{res_id}'",
                expression=f"{res_type}.id",
            )
        validate_resource(body, expected_type=res_type)
        previous = uow.lock(res_type, res_id)
        if if_match is not None:
            expected = parse_etag(if_match)
            if previous is None or previous.deleted or str(previous.version) != expected:
                current = "none" if previous is None or previous.deleted else previous.version
                raise PreconditionFailed(
                    f"If-Match {if_match} does not match the current version ({current}) "
                    f"of {res_type}/{res_id}"
                )
        return self._save(uow, res_type, res_id, body, previous=previous, method="update")

    def conditional_update(
        self, ctx: RequestContext, res_type: str, query: str, body: JsonDict, if_match: str | None = None
    ) -> Result:
        check_type(res_type)
        self.authorizer.check(ctx.caller, "update", res_type)
        with self.repo.write() as uow:
            outcome = self.conditional_update_in(uow, ctx, res_type, query, body, if_match)
        return self.write_result(ctx, outcome)

    def conditional_update_in(
        self,
        uow: UnitOfWork,
        ctx: RequestContext,
        res_type: str,
        query: str,
        body: JsonDict,
        if_match: str | None = None,
    ) -> WriteOutcome:
        """https://hl7.org/fhir/R4/http.html#cond-update"""
        uow.advisory_lock(f"update:{res_type}?{query}")
        matches = self.find_matching(uow, res_type, query, limit=2)
        if len(matches) > 1:
            raise PreconditionFailed(
                f"Conditional update '{query}' matches {len(matches)} {res_type} resources"
            )
        if not matches:
            body_id = body.get("id")
            if body_id is None:
                return self.create_in(uow, ctx, res_type, body)
            return self.update_in(uow, ctx, res_type, str(body_id), body, if_match)
        target = matches[0]
        if body.get("id") is not None and body["id"] != target.res_id:
            raise BadRequest(
                f"The resource id '{body['id']}' differs from the matched {res_type}/{target.res_id}",
                expression=f"{res_type}.id",
            )
        return self.update_in(uow, ctx, res_type, target.res_id, {**body, "id": target.res_id}, if_match)

    def patch(
        self, ctx: RequestContext, res_type: str, res_id: str, operations: Any, if_match: str | None = None
    ) -> Result:
        check_type(res_type)
        self.authorizer.check(ctx.caller, "patch", res_type)
        with self.repo.write() as uow:
            outcome = self.patch_in(uow, ctx, res_type, res_id, operations, if_match)
        return self.write_result(ctx, outcome)

    def patch_in(
        self,
        uow: UnitOfWork,
        ctx: RequestContext,
        res_type: str,
        res_id: str,
        operations: Any,
        if_match: str | None = None,
    ) -> WriteOutcome:
        """JSON Patch (RFC 6902): https://hl7.org/fhir/R4/http.html#patch"""
        check_id(res_id)
        previous = uow.lock(res_type, res_id)
        if previous is None:
            raise NotFound(f"{res_type}/{res_id} is not known")
        if previous.deleted:
            raise Gone(f"{res_type}/{res_id} was deleted")
        if if_match is not None and str(previous.version) != parse_etag(if_match):
            raise PreconditionFailed(
                f"If-Match {if_match} does not match the current version ({previous.version}) "
                f"of {res_type}/{res_id}"
            )
        if not isinstance(operations, list):
            raise BadRequest("A JSON Patch document is an array of operations")
        current = _loads(previous.body_text)
        try:
            patched = jsonpatch.JsonPatch(operations).apply(current)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError) as exc:
            raise Unprocessable(f"The JSON Patch cannot be applied: {exc}", code="processing") from exc
        if (
            not isinstance(patched, dict)
            or patched.get("resourceType") != res_type
            or patched.get("id") != res_id
        ):
            raise Unprocessable("A patch may not change resourceType or id", code="processing")
        validate_resource(patched, expected_type=res_type)
        return self._save(uow, res_type, res_id, patched, previous=previous, method="patch")

    def delete(self, ctx: RequestContext, res_type: str, res_id: str) -> Result:
        check_type(res_type)
        self.authorizer.check(ctx.caller, "delete", res_type)
        with self.repo.write() as uow:
            outcome = self.delete_in(uow, res_type, res_id)
        return self.delete_result(ctx, outcome)

    def delete_in(self, uow: UnitOfWork, res_type: str, res_id: str) -> WriteOutcome:
        """Soft delete: a new version marks the resource deleted; reads then answer 410."""
        check_id(res_id)
        previous = uow.lock(res_type, res_id)
        if previous is None:
            raise NotFound(f"{res_type}/{res_id} is not known")
        if previous.deleted:
            return WriteOutcome(204, previous, None, noop=True)
        stored = uow.save(
            res_type=res_type,
            res_id=res_id,
            body=None,
            version=previous.version + 1,
            last_updated=now_ms(),
            method="delete",
            previous=previous,
        )
        return WriteOutcome(204, stored, None)

    def conditional_delete(self, ctx: RequestContext, res_type: str, query: str) -> Result:
        """https://hl7.org/fhir/R4/http.html#3.1.0.7.1 (single-match mode)."""
        check_type(res_type)
        self.authorizer.check(ctx.caller, "delete", res_type)
        with self.repo.write() as uow:
            outcome = self.conditional_delete_in(uow, res_type, query)
        if outcome is None:
            return (
                Result(204)
                if ctx.prefer.return_ != "OperationOutcome"
                else Result(200, body=information(f"No {res_type} matched '{query}'; nothing deleted"))
            )
        return self.delete_result(ctx, outcome)

    def conditional_delete_in(self, uow: UnitOfWork, res_type: str, query: str) -> WriteOutcome | None:
        matches = self.find_matching(uow, res_type, query, limit=2)
        if len(matches) > 1:
            raise PreconditionFailed(
                f"Conditional delete '{query}' matches {len(matches)} {res_type} resources"
            )
        if not matches:
            return None
        return self.delete_in(uow, res_type, matches[0].res_id)

    def _save(
        self,
        uow: UnitOfWork,
        res_type: str,
        res_id: str,
        body: JsonDict,
        *,
        previous: StoredResource | None,
        method: str,
    ) -> WriteOutcome:
        version = 1 if previous is None else previous.version + 1
        last_updated = now_ms()
        if previous is not None and last_updated <= previous.last_updated:
            # Keep lastUpdated strictly increasing per resource even within one millisecond.
            last_updated = previous.last_updated + _ONE_MS
        stamped = stamp_meta(body, res_id, version, last_updated)
        rows = self.extractor.extract(stamped)
        stored = uow.save(
            res_type=res_type,
            res_id=res_id,
            body=stamped,
            version=version,
            last_updated=last_updated,
            method=method,
            previous=previous,
            index_rows=rows,
        )
        created = previous is None or previous.deleted
        return WriteOutcome(201 if created else 200, stored, stamped, created=created)

    # ------------------------------------------------------------------ results
    def write_result(self, ctx: RequestContext, outcome: WriteOutcome) -> Result:
        """Render a create/update/patch answer, honouring ``Prefer: return``."""
        stored = outcome.stored
        headers = version_headers(stored)
        headers["Location"] = f"{ctx.base_url}/{stored.res_type}/{stored.res_id}/_history/{stored.version}"
        status = outcome.status
        if ctx.prefer.return_ == "minimal":
            return Result(status, headers=headers)
        if ctx.prefer.return_ == "OperationOutcome":
            verb = "found (no change)" if outcome.noop else "created" if outcome.created else "updated"
            return Result(
                status, body=information(f"{stored.res_type}/{stored.res_id} {verb}"), headers=headers
            )
        return Result(status, body=outcome.body, headers=headers)

    def delete_result(self, ctx: RequestContext, outcome: WriteOutcome) -> Result:
        headers = {"ETag": etag(outcome.stored.version)}
        if ctx.prefer.return_ == "OperationOutcome":
            text = "was already deleted" if outcome.noop else "deleted"
            return Result(
                200,
                body=information(f"{outcome.stored.res_type}/{outcome.stored.res_id} {text}"),
                headers=headers,
            )
        return Result(204, headers=headers)

    # ------------------------------------------------------------------ conditional matching
    def find_matching(self, uow: UnitOfWork, res_type: str, query: str, limit: int) -> list[StoredResource]:
        from fhir_norse.fhir.searching import find_matching

        return find_matching(uow.conn, self.registry, res_type, query, limit)

    # ------------------------------------------------------------------ history
    def history(
        self, ctx: RequestContext, res_type: str | None, res_id: str | None, params: list[tuple[str, str]]
    ) -> Result:
        """https://hl7.org/fhir/R4/http.html#history with ``_since``, ``_count`` and keyset paging."""
        if res_type is not None:
            check_type(res_type)
        if res_id is not None:
            check_id(res_id)
        self.authorizer.check(ctx.caller, "history", res_type)
        since: datetime | None = None
        count = self.default_count
        before: int | None = None
        after: int | None = None
        for name, value in params:
            if name == "_since":
                since = date_range(value)[0]
            elif name == "_count":
                count = _parse_count(value, self.max_count)
            elif name == "_cursor":
                before, after = _parse_history_cursor(value)
            elif name in ("_format", "_pretty"):
                continue
            elif ctx.prefer.handling == "strict":
                raise BadRequest(f"Unknown parameter '{name}' for history")
        with self.repo.read() as view:
            if res_id is not None and res_type is not None and view.current(res_type, res_id) is None:
                raise NotFound(f"{res_type}/{res_id} is not known")
            if after is not None:
                page = view.history(
                    res_type=res_type, res_id=res_id, since=since, after_pk=after, count=count + 1
                )
                has_more_newer = len(page) > count
                page = page[:count]
                page.reverse()
                has_next = True
            else:
                page = view.history(
                    res_type=res_type, res_id=res_id, since=since, before_pk=before, count=count + 1
                )
                has_next = len(page) > count
                page = page[:count]
                has_more_newer = before is not None
        path = "/".join(p for p in (res_type, res_id, "_history") if p)
        base_query = [(k, v) for k, v in params if k in ("_since", "_count")]
        links = [{"relation": "self", "url": _link(ctx.base_url, path, params)}]
        if page and has_next:
            links.append(
                {
                    "relation": "next",
                    "url": _link(ctx.base_url, path, [*base_query, ("_cursor", f"b{page[-1].pk}")]),
                }
            )
        if page and has_more_newer:
            links.append(
                {
                    "relation": "previous",
                    "url": _link(ctx.base_url, path, [*base_query, ("_cursor", f"a{page[0].pk}")]),
                }
            )
        entries = [_history_entry(ctx.base_url, h) for h in page]
        # FHIR forbids empty arrays, so an empty page has no "entry" at all.
        entry_json = ',"entry":[' + ",".join(entries) + "]" if entries else ""
        raw = '{"resourceType":"Bundle","type":"history","link":' + dumps(links) + entry_json + "}"
        return Result(200, raw=raw)


_ONE_MS = timedelta(milliseconds=1)


def _loads(text: str | None) -> JsonDict:
    value = orjson.loads(text or "null")
    if not isinstance(value, dict):
        raise FhirError("Stored resource is not a JSON object")
    return value


def version_headers(stored: StoredResource) -> dict[str, str]:
    return {"ETag": etag(stored.version), "Last-Modified": http_date(stored.last_updated)}


def _etag_matches(header: str, version: int) -> bool:
    if header.strip() == "*":
        return True
    return any(parse_etag(part) == str(version) for part in header.split(",") if part.strip())


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
    from urllib.parse import urlencode

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
