"""The FHIR RESTful interactions as plain functions over the repository.

https://hl7.org/fhir/R4/http.html. Each method takes a :class:`RequestContext`, passes the
authorization seam, and returns a :class:`Result`; it knows nothing of HTTP frameworks.
Writes validate the resource, stamp the server-owned meta, extract the search-index rows and
save everything in one unit of work, together with the AuditEvent that records them (IHE
BALP). Reads are recorded in their own transaction before the answer leaves; refusals and
failures too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

import jsonpatch
import orjson

from fhir_norse.auth import policy as compartments
from fhir_norse.auth.audit import AuditRecorder
from fhir_norse.auth.caller import Access, Authorizer
from fhir_norse.outcomes import (
    BadRequest,
    FhirError,
    Gone,
    Issue,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
    Unprocessable,
    information,
    operation_outcome,
)
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.published import refuse_change_to_published
from fhir_norse.server.resources import (
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
from fhir_norse.server.search.extract import IndexExtractor
from fhir_norse.server.validation import validate_resource
from fhir_norse.store.rows import IndexRow
from fhir_norse.store.search.params import SearchParamRegistry
from fhir_norse.store.search.values import date_range
from fhir_norse.store.storage import NewResource, ReadView, Repository, StoredResource, UnitOfWork

JsonDict = dict[str, Any]
_T = TypeVar("_T")


class WriteHook(Protocol):
    """Domain behaviour attached to the writes of one resource type (such as scoring a response).

    Both calls run inside the write's unit of work: an exception from either rolls the whole write
    back, so a resource and everything derived from it are stored together or not at all.
    """

    def existing(
        self, service: FhirService, uow: UnitOfWork, body: JsonDict, patients: frozenset[str] | None
    ) -> StoredResource | None:
        """On create: an already stored resource this body repeats (an idempotent retry), or None."""
        ...

    def before_save(
        self,
        service: FhirService,
        uow: UnitOfWork,
        ctx: RequestContext,
        res_id: str,
        body: JsonDict,
        previous: StoredResource | None,
    ) -> None:
        """Check a validated resource before it is stored (raise a FhirError to refuse it)."""
        ...

    def after_save(
        self,
        service: FhirService,
        uow: UnitOfWork,
        ctx: RequestContext,
        outcome: WriteOutcome,
        previous: StoredResource | None,
    ) -> list[Issue]:
        """Write what follows from the stored resource, in the same unit of work; return warnings."""
        ...

    def after_delete(
        self, service: FhirService, uow: UnitOfWork, ctx: RequestContext, deleted: StoredResource
    ) -> None:
        """Withdraw what was derived from a resource that was just deleted."""
        ...


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
    # The search-index rows written (the compartment and the audit trail read them).
    rows: tuple[Any, ...] = ()
    # Problems that did not stop the write (e.g. a submitted total that disagrees with the computed one).
    warnings: tuple[Issue, ...] = ()


class FhirService:
    """Interactions over one repository, one SearchParameter registry and one authorizer."""

    def __init__(
        self,
        repository: Repository,
        registry: SearchParamRegistry,
        extractor: IndexExtractor,
        authorizer: Authorizer,
        *,
        audit: AuditRecorder | None = None,
        default_count: int = 50,
        max_count: int = 1000,
    ) -> None:
        self.repo = repository
        self.registry = registry
        self.extractor = extractor
        self.authorizer = authorizer
        self.audit = audit or AuditRecorder()
        self.default_count = default_count
        self.max_count = max_count
        # Domain behaviour per resource type (QuestionnaireResponse intake and scoring).
        self.hooks: dict[str, WriteHook] = {}
        # Validator of this server's own profiles (``fhir_norse.server.profiles``), when loaded.
        self.profiles: Any = None

    # ------------------------------------------------------------------ audit trail
    def audit_event(
        self,
        ctx: RequestContext,
        interaction: str,
        outcome: str,
        res_type: str | None,
        res_id: str | None = None,
        *,
        version: int | None = None,
        query: str | None = None,
        patients: Iterable[str] = (),
        reason: str | None = None,
    ) -> JsonDict:
        return self.audit.event(
            interaction=interaction,
            outcome=outcome,
            caller=ctx.caller,
            resource_type=res_type,
            resource_id=res_id,
            version=None if version is None else str(version),
            query=query,
            patients=sorted(set(patients)),
            source_address=ctx.source_address,
            request_id=ctx.request_id,
            failure_reason=reason,
        )

    def record(self, uow: UnitOfWork, event: JsonDict) -> None:
        """Store an AuditEvent in the caller's transaction (it commits or rolls back with the write)."""
        self._save(uow, "AuditEvent", new_id(), event, previous=None, method="create")

    def record_now(self, event: JsonDict) -> None:
        """Store an AuditEvent in a transaction of its own, committed before this returns."""
        with self.repo.write() as uow:
            self.record(uow, event)

    @contextmanager
    def refusals_audited(
        self,
        ctx: RequestContext,
        interaction: str,
        res_type: str | None,
        res_id: str | None = None,
        query: str | None = None,
    ) -> Iterator[None]:
        """Record a refused or failed interaction (its own work was rolled back) and re-raise."""
        try:
            yield
        except FhirError as error:
            outcome = "failed" if error.status >= 500 else "refused"
            self.record_now(
                self.audit_event(
                    ctx,
                    interaction,
                    outcome,
                    res_type,
                    _safe_id(res_id),
                    query=query,
                    reason=f"{error.status}: {error.message}"[:500],
                )
            )
            raise
        except Exception:
            self.record_now(
                self.audit_event(
                    ctx,
                    interaction,
                    "failed",
                    res_type,
                    _safe_id(res_id),
                    query=query,
                    reason="500: internal error",
                )
            )
            raise

    def _in_write(
        self,
        ctx: RequestContext,
        interaction: str,
        res_type: str,
        res_id: str | None,
        query: str | None,
        run: Callable[[UnitOfWork, Access], _T],
    ) -> _T:
        """One write interaction: authorized, run in one unit of work, its refusal audited."""
        with self.refusals_audited(ctx, interaction, res_type, res_id, query=query):
            check_type(res_type)
            access = self.access(ctx, interaction, res_type)
            with self.repo.write() as uow:
                return run(uow, access)

    # ------------------------------------------------------------------ access
    def access(self, ctx: RequestContext, interaction: str, res_type: str | None) -> Access:
        return self.authorizer.check(ctx.caller, interaction, res_type)

    def reachable_patients(self, conn: Any, access: Access) -> frozenset[str] | None:
        return compartments.allowed_patients(conn, access)

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
        with self.refusals_audited(ctx, "read", res_type, res_id):
            check_type(res_type)
            access = self.access(ctx, "read", res_type)
            # One transaction reads the resource and records its AuditEvent: one durable commit.
            with self.repo.write() as uow:
                stored = uow.current(res_type, check_id(res_id))
                if stored is None:
                    raise NotFound(f"{res_type}/{res_id} is not known")
                rows = [] if stored.deleted else compartments.stored_reference_rows(uow.conn, stored.pk)
                patients = self.reachable_patients(uow.conn, access)
                if stored.deleted:
                    if patients is not None and compartments.is_compartment_type(res_type):
                        raise NotFound(f"{res_type}/{res_id} is not known")
                    raise Gone(f"{res_type}/{res_id} was deleted", headers=version_headers(stored))
                compartments.require_visible(res_type, res_id, rows, patients)
                self.record(
                    uow,
                    self.audit_event(
                        ctx,
                        "read",
                        "success",
                        res_type,
                        res_id,
                        version=stored.version,
                        patients=compartments.patients_of(res_type, res_id, rows),
                    ),
                )
        headers = version_headers(stored)
        if if_none_match is not None and _etag_matches(if_none_match, stored.version):
            return Result(304, headers=headers)
        if if_modified_since is not None:
            since = parse_http_date(if_modified_since)
            if since is not None and stored.last_updated.replace(microsecond=0) <= since:
                return Result(304, headers=headers)
        return Result(200, raw=stored.body_text, headers=headers)

    def vread(self, ctx: RequestContext, res_type: str, res_id: str, version: str) -> Result:
        with self.refusals_audited(ctx, "vread", res_type, res_id):
            check_type(res_type)
            access = self.access(ctx, "vread", res_type)
            if not version.isdigit():
                raise NotFound(f"{res_type}/{res_id}/_history/{version} is not known")
            with self.repo.read() as view:
                stored = view.version(res_type, check_id(res_id), int(version))
                patients = self.reachable_patients(view.conn, access)
            if stored is None:
                raise NotFound(f"{res_type}/{res_id}/_history/{version} is not known")
            if stored.deleted:
                if patients is not None and compartments.is_compartment_type(res_type):
                    raise NotFound(f"{res_type}/{res_id}/_history/{version} is not known")
                raise Gone(
                    f"Version {version} of {res_type}/{res_id} is a deletion", headers=version_headers(stored)
                )
            rows = self._rows_of_text(stored.body_text)
            compartments.require_visible(res_type, res_id, rows, patients)
            self.record_now(
                self.audit_event(
                    ctx,
                    "vread",
                    "success",
                    res_type,
                    res_id,
                    version=stored.version,
                    patients=compartments.patients_of(res_type, res_id, rows),
                )
            )
        return Result(200, raw=stored.body_text, headers=version_headers(stored))

    def _rows_of_text(self, body_text: str | None) -> list[Any]:
        return self.extractor.extract(loads(body_text)) if body_text else []

    # ------------------------------------------------------------------ writes
    def create(
        self, ctx: RequestContext, res_type: str, body: JsonDict, if_none_exist: str | None = None
    ) -> Result:
        outcome = self._in_write(
            ctx,
            "create",
            res_type,
            None,
            None,
            lambda uow, access: self.create_in(uow, ctx, res_type, body, if_none_exist, access=access),
        )
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
        access: Access,
    ) -> WriteOutcome:
        validate_resource(body, expected_type=res_type)
        patients = self.reachable_patients(uow.conn, access)
        if if_none_exist:
            uow.advisory_lock(f"create:{res_type}?{if_none_exist}")
            matches = self.find_matching(uow, res_type, if_none_exist, limit=2, patients=patients)
            if len(matches) > 1:
                raise PreconditionFailed(
                    f"If-None-Exist '{if_none_exist}' matches {len(matches)} {res_type} resources"
                )
            if matches:
                found = matches[0]
                return WriteOutcome(200, found, loads(found.body_text), noop=True)
        hook = self.hooks.get(res_type)
        if hook is not None and (repeated := hook.existing(self, uow, body, patients)) is not None:
            return WriteOutcome(200, repeated, loads(repeated.body_text), noop=True)
        return self._write(uow, ctx, "create", res_type, res_id or new_id(), body, None, access, patients)

    def update(
        self, ctx: RequestContext, res_type: str, res_id: str, body: JsonDict, if_match: str | None = None
    ) -> Result:
        outcome = self._in_write(
            ctx,
            "update",
            res_type,
            res_id,
            None,
            lambda uow, access: self.update_in(uow, ctx, res_type, res_id, body, if_match, access=access),
        )
        return self.write_result(ctx, outcome)

    def update_in(
        self,
        uow: UnitOfWork,
        ctx: RequestContext,
        res_type: str,
        res_id: str,
        body: JsonDict,
        if_match: str | None = None,
        *,
        access: Access,
    ) -> WriteOutcome:
        _refuse_audit_change(res_type)
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
        patients = self.reachable_patients(uow.conn, access)
        self._require_existing_visible(uow, res_type, res_id, previous, patients)
        if previous is not None:
            refuse_change_to_published(res_type, previous.body_text)
        if if_match is not None:
            expected = parse_etag(if_match)
            if previous is None or previous.deleted or str(previous.version) != expected:
                current = "none" if previous is None or previous.deleted else previous.version
                raise PreconditionFailed(
                    f"If-Match {if_match} does not match the current version ({current}) "
                    f"of {res_type}/{res_id}"
                )
        return self._write(uow, ctx, "update", res_type, res_id, body, previous, access, patients)

    def conditional_update(
        self, ctx: RequestContext, res_type: str, query: str, body: JsonDict, if_match: str | None = None
    ) -> Result:
        outcome = self._in_write(
            ctx,
            "update",
            res_type,
            None,
            f"{res_type}?{query}",
            lambda uow, access: self.conditional_update_in(
                uow, ctx, res_type, query, body, if_match, access=access
            ),
        )
        return self.write_result(ctx, outcome)

    def conditional_update_in(
        self,
        uow: UnitOfWork,
        ctx: RequestContext,
        res_type: str,
        query: str,
        body: JsonDict,
        if_match: str | None = None,
        *,
        access: Access,
    ) -> WriteOutcome:
        """https://hl7.org/fhir/R4/http.html#cond-update"""
        uow.advisory_lock(f"update:{res_type}?{query}")
        patients = self.reachable_patients(uow.conn, access)
        matches = self.find_matching(uow, res_type, query, limit=2, patients=patients)
        if len(matches) > 1:
            raise PreconditionFailed(
                f"Conditional update '{query}' matches {len(matches)} {res_type} resources"
            )
        if not matches:
            body_id = body.get("id")
            if body_id is None:
                return self.create_in(uow, ctx, res_type, body, access=access)
            return self.update_in(uow, ctx, res_type, str(body_id), body, if_match, access=access)
        target = matches[0]
        if body.get("id") is not None and body["id"] != target.res_id:
            raise BadRequest(
                f"The resource id '{body['id']}' differs from the matched {res_type}/{target.res_id}",
                expression=f"{res_type}.id",
            )
        return self.update_in(
            uow, ctx, res_type, target.res_id, {**body, "id": target.res_id}, if_match, access=access
        )

    def patch(
        self, ctx: RequestContext, res_type: str, res_id: str, operations: Any, if_match: str | None = None
    ) -> Result:
        outcome = self._in_write(
            ctx,
            "patch",
            res_type,
            res_id,
            None,
            lambda uow, access: self.patch_in(
                uow, ctx, res_type, res_id, operations, if_match, access=access
            ),
        )
        return self.write_result(ctx, outcome)

    def patch_in(
        self,
        uow: UnitOfWork,
        ctx: RequestContext,
        res_type: str,
        res_id: str,
        operations: Any,
        if_match: str | None = None,
        *,
        access: Access,
    ) -> WriteOutcome:
        """JSON Patch (RFC 6902): https://hl7.org/fhir/R4/http.html#patch"""
        _refuse_audit_change(res_type)
        check_id(res_id)
        previous = uow.lock(res_type, res_id)
        patients = self.reachable_patients(uow.conn, access)
        self._require_existing_visible(uow, res_type, res_id, previous, patients)
        if previous is None:
            raise NotFound(f"{res_type}/{res_id} is not known")
        refuse_change_to_published(res_type, previous.body_text)
        if previous.deleted:
            raise Gone(f"{res_type}/{res_id} was deleted")
        if if_match is not None and str(previous.version) != parse_etag(if_match):
            raise PreconditionFailed(
                f"If-Match {if_match} does not match the current version ({previous.version}) "
                f"of {res_type}/{res_id}"
            )
        if not isinstance(operations, list):
            raise BadRequest("A JSON Patch document is an array of operations")
        current = loads(previous.body_text)
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
        return self._write(uow, ctx, "patch", res_type, res_id, patched, previous, access, patients)

    def delete(self, ctx: RequestContext, res_type: str, res_id: str) -> Result:
        outcome = self._in_write(
            ctx,
            "delete",
            res_type,
            res_id,
            None,
            lambda uow, access: self.delete_in(uow, ctx, res_type, res_id, access=access),
        )
        return self.delete_result(ctx, outcome)

    def delete_in(
        self, uow: UnitOfWork, ctx: RequestContext, res_type: str, res_id: str, *, access: Access
    ) -> WriteOutcome:
        """Soft delete: a new version marks the resource deleted; reads then answer 410."""
        _refuse_audit_change(res_type)
        check_id(res_id)
        previous = uow.lock(res_type, res_id)
        patients = self.reachable_patients(uow.conn, access)
        self._require_existing_visible(uow, res_type, res_id, previous, patients)
        if previous is None:
            raise NotFound(f"{res_type}/{res_id} is not known")
        refuse_change_to_published(res_type, previous.body_text)
        if previous.deleted:
            return WriteOutcome(204, previous, None, noop=True)
        rows = compartments.stored_reference_rows(uow.conn, previous.pk)
        if patients is not None:
            compartments.require_writable(res_type, res_id, rows, access, patients)
        stored = uow.save(
            res_type=res_type,
            res_id=res_id,
            body=None,
            version=previous.version + 1,
            last_updated=now_ms(),
            method="delete",
            previous=previous,
        )
        if (hook := self.hooks.get(res_type)) is not None:
            hook.after_delete(self, uow, ctx, previous)
        self.record(
            uow,
            self.audit_event(
                ctx,
                "delete",
                "success",
                res_type,
                res_id,
                version=stored.version,
                patients=compartments.patients_of(res_type, res_id, rows),
            ),
        )
        return WriteOutcome(204, stored, None)

    def conditional_delete(self, ctx: RequestContext, res_type: str, query: str) -> Result:
        """https://hl7.org/fhir/R4/http.html#3.1.0.7.1 (single-match mode)."""
        outcome = self._in_write(
            ctx,
            "delete",
            res_type,
            None,
            f"{res_type}?{query}",
            lambda uow, access: self.conditional_delete_in(uow, ctx, res_type, query, access=access),
        )
        if outcome is None:
            if ctx.prefer.return_ != "OperationOutcome":
                return Result(204)
            return Result(200, body=information(f"No {res_type} matched '{query}'; nothing deleted"))
        return self.delete_result(ctx, outcome)

    def conditional_delete_in(
        self, uow: UnitOfWork, ctx: RequestContext, res_type: str, query: str, *, access: Access
    ) -> WriteOutcome | None:
        patients = self.reachable_patients(uow.conn, access)
        matches = self.find_matching(uow, res_type, query, limit=2, patients=patients)
        if len(matches) > 1:
            raise PreconditionFailed(
                f"Conditional delete '{query}' matches {len(matches)} {res_type} resources"
            )
        if not matches:
            return None
        return self.delete_in(uow, ctx, res_type, matches[0].res_id, access=access)

    def _require_existing_visible(
        self,
        uow: UnitOfWork,
        res_type: str,
        res_id: str,
        previous: StoredResource | None,
        patients: frozenset[str] | None,
    ) -> None:
        """A restricted caller may not touch (or learn of) a resource outside its compartments."""
        if patients is None or previous is None or previous.deleted:
            return
        compartments.require_visible(
            res_type, res_id, compartments.stored_reference_rows(uow.conn, previous.pk), patients
        )

    def _write(
        self,
        uow: UnitOfWork,
        ctx: RequestContext,
        interaction: str,
        res_type: str,
        res_id: str,
        body: JsonDict,
        previous: StoredResource | None,
        access: Access,
        patients: frozenset[str] | None,
    ) -> WriteOutcome:
        """Save a validated resource, checking the compartment of its new content, and audit it."""
        hook = self.hooks.get(res_type)
        if hook is not None:
            hook.before_save(self, uow, ctx, res_id, body, previous)
        outcome = self._save(
            uow,
            res_type,
            res_id,
            body,
            previous=previous,
            method=interaction,
            check=lambda rows: compartments.require_writable(res_type, res_id, rows, access, patients),
        )
        self.record(
            uow,
            self.audit_event(
                ctx,
                interaction,
                "success",
                res_type,
                res_id,
                version=outcome.stored.version,
                patients=compartments.patients_of(res_type, res_id, outcome.rows),
            ),
        )
        if hook is not None and (warnings := hook.after_save(self, uow, ctx, outcome, previous)):
            outcome = replace(outcome, warnings=outcome.warnings + tuple(warnings))
        return outcome

    def _save(
        self,
        uow: UnitOfWork,
        res_type: str,
        res_id: str,
        body: JsonDict,
        *,
        previous: StoredResource | None,
        method: str,
        check: Callable[[list[IndexRow]], None] | None = None,
    ) -> WriteOutcome:
        version = 1 if previous is None else previous.version + 1
        last_updated = now_ms()
        if previous is not None and last_updated <= previous.last_updated:
            # Keep lastUpdated strictly increasing per resource even within one millisecond.
            last_updated = previous.last_updated + _ONE_MS
        stamped = stamp_meta(body, res_id, version, last_updated)
        rows = self.extractor.extract(stamped)
        if check is not None:
            check(rows)
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
        return WriteOutcome(201 if created else 200, stored, stamped, created=created, rows=tuple(rows))

    def save_new_many(
        self, uow: UnitOfWork, items: Sequence[tuple[str, str, JsonDict]]
    ) -> list[StoredResource]:
        """Create ``(type, id, body)`` resources that do not exist yet, batched (what scoring writes;
        the caller has validated them and answers for authorization and audit)."""
        last_updated = now_ms()
        new: list[NewResource] = []
        for res_type, res_id, body in items:
            stamped = stamp_meta(body, res_id, 1, last_updated)
            new.append(NewResource(res_type, res_id, stamped, last_updated, self.extractor.extract(stamped)))
        return uow.save_new(new)

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
            message = Issue(
                f"{stored.res_type}/{stored.res_id} {verb}", code="informational", severity="information"
            )
            return Result(status, body=operation_outcome([message, *outcome.warnings]), headers=headers)
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
    def find_matching(
        self, uow: ReadView, res_type: str, query: str, limit: int, patients: frozenset[str] | None = None
    ) -> list[StoredResource]:
        from fhir_norse.server.searching import find_matching

        return find_matching(uow.conn, self.registry, res_type, query, limit, patients=patients)

    # ------------------------------------------------------------------ history
    def history(
        self, ctx: RequestContext, res_type: str | None, res_id: str | None, params: list[tuple[str, str]]
    ) -> Result:
        """https://hl7.org/fhir/R4/http.html#history with ``_since``, ``_count`` and keyset paging.

        A restricted caller sees only entries of resources (currently) in its compartments, and
        never deletions of compartment resources, whose content would tell nothing it may see.
        """
        interaction = "history-instance" if res_id else "history-type" if res_type else "history-system"
        path = "/".join(p for p in (res_type, res_id, "_history") if p)
        with self.refusals_audited(ctx, interaction, res_type, res_id, query=_query_text(path, params)):
            if res_type is not None:
                check_type(res_type)
            if res_id is not None:
                check_id(res_id)
            access = self.access(ctx, interaction, res_type)
            result, patients_seen = self._history(ctx, access, res_type, res_id, path, params)
            self.record_now(
                self.audit_event(
                    ctx,
                    interaction,
                    "success",
                    res_type,
                    res_id,
                    query=_query_text(path, params),
                    patients=patients_seen,
                )
            )
            return result

    def _history(
        self,
        ctx: RequestContext,
        access: Access,
        res_type: str | None,
        res_id: str | None,
        path: str,
        params: list[tuple[str, str]],
    ) -> tuple[Result, set[str]]:
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
            patients = self.reachable_patients(view.conn, access)
            if res_id is not None and res_type is not None:
                current = view.current(res_type, res_id)
                if current is None:
                    raise NotFound(f"{res_type}/{res_id} is not known")
                if patients is not None and compartments.is_compartment_type(res_type):
                    rows = (
                        [] if current.deleted else compartments.stored_reference_rows(view.conn, current.pk)
                    )
                    compartments.require_visible(res_type, res_id, rows, patients)
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
        patients_seen: set[str] = set()
        shown = []
        for entry in page:
            rows = self._rows_of_text(entry.body_text) if patients is not None or entry.body_text else []
            if (
                patients is not None
                and compartments.is_compartment_type(entry.res_type)
                and (
                    entry.body_text is None
                    or not compartments.visible(entry.res_type, entry.res_id, rows, patients)
                )
            ):
                continue
            patients_seen |= compartments.patients_of(entry.res_type, entry.res_id, rows)
            shown.append(entry)
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
        entries = [_history_entry(ctx.base_url, h) for h in shown]
        # FHIR forbids empty arrays, so an empty page has no "entry" at all.
        entry_json = ',"entry":[' + ",".join(entries) + "]" if entries else ""
        raw = '{"resourceType":"Bundle","type":"history","link":' + dumps(links) + entry_json + "}"
        return Result(200, raw=raw), patients_seen


def _refuse_audit_change(res_type: str) -> None:
    if res_type == "AuditEvent":
        raise MethodNotAllowed(
            "AuditEvents are a permanent record: they cannot be updated, patched or deleted"
        )


def _safe_id(res_id: str | None) -> str | None:
    from fhir_norse.server.resources import ID_PATTERN

    return res_id if res_id is not None and ID_PATTERN.match(res_id) else None


def _query_text(path: str, params: list[tuple[str, str]]) -> str:
    query = urlencode(params)
    return f"{path}?{query}" if query else path


_ONE_MS = timedelta(milliseconds=1)


def loads(text: str | None) -> JsonDict:
    """A stored resource's JSON text as a dict."""
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
