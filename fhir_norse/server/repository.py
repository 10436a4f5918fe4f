"""The repository: one transaction bound to one caller, the only way code reads or writes resources.

Every path goes through it: the REST interactions, Bundle entries, operations, and the resources the
domain derives (scores, reports, alerts). In one place it applies, in this order:

1. the access policy (:class:`~fhir_norse.auth.policy.AccessPolicy`): the token's scopes (403 when
   they do not allow the interaction on the type) and the compartments of a restricted caller (an
   existing resource out of reach answers 404, as if absent; new content that would put a resource
   outside them is refused with 403);
2. structural validation against the R4 definitions (and, for what the server derives itself, the
   profiles of the content pack it claims in ``meta.profile``);
3. the named storage hooks of the type (:class:`StorageHook`): *before storage* (check or refuse a
   validated resource) and *before commit* (write what follows from it, in the same transaction);
4. server-owned meta, index extraction and storage (:class:`~fhir_norse.store.storage.UnitOfWork`);
5. one AuditEvent per interaction in the same transaction (IHE BALP), for a caller that is audited;
   on SQLite a read runs in a read-only transaction and its AuditEvent is written right after it, in
   a short transaction of its own, before the answer goes out (:meth:`Repository.open`).

Conditional create, update and delete exist once, over :meth:`Repository.find`. Domain code searches
with typed requests (:class:`~fhir_norse.server.search.typed.Where`), never a query string, and works
as the server itself through :meth:`Repository.as_server` (same transaction, full reach, not audited:
its reads and writes are consequences of the caller's audited interaction).

Models: Medplum's ``Repository`` (packages/fhir-router) and HAPI's DAO tier, which validate and index
at the storage seam so that patches, transactions and derived writes are checked alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from fhir_norse.auth.audit import AuditRecorder
from fhir_norse.auth.caller import UNRESTRICTED, Access, Caller
from fhir_norse.auth.policy import AccessPolicy
from fhir_norse.outcomes import (
    BadRequest,
    Conflict,
    FhirError,
    Forbidden,
    Gone,
    Issue,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
    Unprocessable,
)
from fhir_norse.server import audit_log
from fhir_norse.server.conformance_memo import ConformanceMemo, shape
from fhir_norse.server.context import RequestContext
from fhir_norse.server.patching import apply_patch
from fhir_norse.server.published import canonical_types, check_canonical_write, refuse_change_to_published
from fhir_norse.server.resources import (
    ID_PATTERN,
    check_id,
    check_type,
    etag,
    http_date,
    new_id,
    now_ms,
    parse_etag,
    reference_id,
    stamp_meta,
)
from fhir_norse.server.search.extract import IndexExtractor
from fhir_norse.server.search.parse import parse_search
from fhir_norse.server.search.typed import Where, to_request
from fhir_norse.server.validation import check_depth, validate_resource
from fhir_norse.store.search import engine
from fhir_norse.store.search.params import SearchParamRegistry
from fhir_norse.store.search.request import SearchLimits, SearchRequest
from fhir_norse.store.storage import NewResource, Storage, StoredResource, UnitOfWork

if TYPE_CHECKING:
    from fhir_norse.server.profiles import ProfileValidator

JsonDict = dict[str, Any]
_ONE_MS = timedelta(milliseconds=1)
# Live resources of one canonical type under one url that a write is checked against (versions of it).
_CANONICAL_VERSIONS_LIMIT = 10_000


def loads(text: str | None) -> JsonDict:
    """A stored resource's JSON text as a dict."""
    value = orjson.loads(text or "null")
    if not isinstance(value, dict):
        raise FhirError("Stored resource is not a JSON object")
    return value


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


@dataclass(frozen=True, slots=True)
class Derived:
    """A resource the server writes as a consequence of another write (:meth:`Repository.save_derived`).

    ``previous`` is the stored version the writer read and changed (None: a new resource); if another
    writer got there first, the whole transaction is refused with 409.
    """

    res_type: str
    res_id: str
    body: JsonDict
    previous: StoredResource | None = None


@dataclass(frozen=True, slots=True)
class PendingCreate:
    """A create checked and not yet stored (:meth:`Repository.check_create`)."""

    res_type: str
    res_id: str
    body: JsonDict


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """History entries newest first, with the cursors of the pages around it (``b<pk>``, ``a<pk>``)."""

    entries: list[StoredResource]
    older: str | None = None
    newer: str | None = None


class StorageHook:
    """Domain behaviour attached to the writes of one resource type, on every path (REST, Bundle
    entries, operations, derived writes). All calls run inside the write's transaction: an exception
    from any of them rolls the whole write back. The defaults do nothing."""

    def existing(self, repo: Repository, body: JsonDict) -> StoredResource | None:
        """On create: an already stored resource this body repeats (an idempotent retry), or None."""
        return None

    def before_storage(
        self, repo: Repository, res_id: str, body: JsonDict, previous: StoredResource | None
    ) -> None:
        """Check a structurally valid resource before it is stored (raise a FhirError to refuse it)."""

    def before_commit(
        self, repo: Repository, outcome: WriteOutcome, previous: StoredResource | None
    ) -> list[Issue]:
        """Write what follows from the stored resource (or from a deletion: ``outcome.body`` is None and
        ``previous`` the deleted version) in the same transaction; return warnings for the caller."""
        return []


@dataclass(frozen=True)
class Kernel:
    """What every repository shares: storage, search definitions, index extraction, the access
    policy, the audit event builder, the hooks per type and the profile validator. Built once by the
    composition root; never changed afterwards."""

    storage: Storage
    registry: SearchParamRegistry
    extractor: IndexExtractor
    policy: AccessPolicy
    audit: AuditRecorder
    hooks: Mapping[str, StorageHook] = field(default_factory=dict)
    profiles: ProfileValidator | None = None
    # The largest resource a write may store (the request body limit; bounds what a JSON Patch builds).
    max_resource_bytes: int = 10 * 1024 * 1024
    # Search and history page sizes.
    default_count: int = 50
    max_count: int = 1000
    # Bounds on every search: parameter and value counts, the database's time limit.
    search_limits: SearchLimits = field(default_factory=SearchLimits)
    # Shapes of derived resources already found conformant (:mod:`fhir_norse.server.conformance_memo`).
    conformance: ConformanceMemo = field(default_factory=ConformanceMemo)
    # The AuditEvents of reads (SQLite), written together (:class:`audit_log.EventGroups`).
    audit_groups: audit_log.EventGroups = field(default_factory=audit_log.EventGroups)


class Repository:
    """Reads and writes of one caller in one transaction (module doc)."""

    def __init__(
        self,
        kernel: Kernel,
        uow: UnitOfWork,
        ctx: RequestContext,
        *,
        server: bool = False,
        memo: dict[Any, Any] | None = None,
        deferred_audits: list[JsonDict] | None = None,
        pending_audits: list[JsonDict] | None = None,
    ) -> None:
        self.kernel = kernel
        self.uow = uow
        self.ctx = ctx
        # The server acting on its own behalf: full reach, no audit of its own reads and writes.
        self.server = server
        self._patients: dict[Access, frozenset[str] | None] = {}
        # What the hooks derived once and share within this transaction (such as a patient's record).
        self.memo: dict[Any, Any] = {} if memo is None else memo
        # In a read-only transaction: the AuditEvents to write once it has ended (None: write them in it).
        self.deferred_audits = deferred_audits
        # In a write transaction: its AuditEvents not yet inserted (:meth:`flush_audits`, before commit
        # and before anything reads the audit log). None: insert each at once.
        self.pending_audits = pending_audits

    @classmethod
    @contextmanager
    def open(cls, kernel: Kernel, ctx: RequestContext, *, read_only: bool = False) -> Iterator[Repository]:
        """A repository for ``ctx`` on a new transaction, committed when the block ends without error.

        ``read_only`` (the read interactions) where the database has a single writer (SQLite): a
        read-only transaction, which neither takes nor waits for the write lock, so a slow search holds
        up no write. Its AuditEvents are written when the block has ended without error, with those of
        the reads answered at the same moment (:meth:`Storage.write_together`), committed before this
        returns, so before the answer is sent: a read answered is a read recorded (if recording fails,
        the read fails with it). On PostgreSQL a read blocks no writer whatever its transaction, so it
        runs in one with its AuditEvent, as a write does (measured: a second transaction per read cost
        a third of the read throughput, BENCHMARKS.md "Issue 12").
        """
        if not (read_only and kernel.storage.single_writer):
            with kernel.storage.write() as uow:
                # The transaction's AuditEvents go in together just before it commits (one insert
                # for all the entries of a Bundle instead of two statements per entry).
                pending: list[JsonDict] = []
                repo = cls(kernel, uow, ctx, pending_audits=pending)
                yield repo
                repo.flush_audits()
            return
        audits: list[JsonDict] = []
        with kernel.storage.read_only() as view:
            yield cls(kernel, view, ctx, deferred_audits=audits)
        if audits:
            # Group commit: the events of reads answered at the same moment share one transaction
            # and one insert per table.
            kernel.audit_groups.write(kernel.storage, audits)

    @property
    def caller(self) -> Caller:
        return self.ctx.caller

    def as_server(self) -> Repository:
        """The server's own repository on the same transaction (module doc)."""
        if self.server:
            return self
        return Repository(
            self.kernel, self.uow, self.ctx, server=True, memo=self.memo, pending_audits=self.pending_audits
        )

    # ------------------------------------------------------------------ access
    def grant(self, interaction: str, res_type: str | None) -> Access:
        """The caller's access for ``interaction`` on ``res_type`` (403 when its scopes do not allow it)."""
        if self.server:
            return UNRESTRICTED
        return self.kernel.policy.grant(self.caller, interaction, res_type)

    def reach(self, access: Access) -> frozenset[str] | None:
        """The patient ids ``access`` reaches (None: all), read once per transaction."""
        if not access.restricted:
            return None
        if access not in self._patients:
            self._patients[access] = self.kernel.policy.reachable(self.uow.conn, access)
        return self._patients[access]

    def _stored_rows(self, stored: StoredResource) -> list[Any]:
        """The rows the access policy reads for a stored resource: its reference index rows (and, for a
        Binary, the patients of its securityContext)."""
        if stored.deleted:
            return []
        policy, conn = self.kernel.policy, self.uow.conn
        return [
            *policy.stored_reference_rows(conn, stored.pk),
            *policy.context_rows(conn, stored.res_type, stored.body_text),
        ]

    def _content_rows(self, res_type: str, body: JsonDict) -> list[Any]:
        """The rows the access policy reads for a resource's content (an older version, an included
        resource, new content): its index rows (and, for a Binary, those of its securityContext)."""
        return [
            *self.kernel.extractor.extract(body),
            *self.kernel.policy.context_rows(self.uow.conn, res_type, body),
        ]

    def _require_reach(self, stored: StoredResource, patients: frozenset[str] | None) -> list[Any]:
        """The reference rows of a stored resource, after checking the caller reaches it (404 if not)."""
        if patients is None:
            return []
        rows = self._stored_rows(stored)
        self.kernel.policy.require_visible(stored.res_type, stored.res_id, rows, patients)
        return rows

    def require_patient(self, reference: Any, *, interaction: str, res_type: str, expression: str) -> str:
        """``Patient/<id>`` named by an operation, after checking it exists and that the caller reaches
        it: 422 for a malformed reference, 404 for an unknown patient or one out of reach (the same
        answer, so nothing is revealed)."""
        patient_id = reference_id(reference, "Patient")
        if patient_id is None:
            raise Unprocessable(
                "subject must reference a Patient on this server (Patient/<id>)",
                code="required" if reference is None else "value",
                expression=expression,
            )
        patients = self.reach(self.grant(interaction, res_type))
        stored = self.uow.current("Patient", patient_id)
        if stored is None or stored.deleted or (patients is not None and patient_id not in patients):
            raise NotFound(f"Patient/{patient_id} is not known")
        return f"Patient/{patient_id}"

    # ------------------------------------------------------------------ audit
    def audit(
        self,
        interaction: str,
        res_type: str | None,
        res_id: str | None = None,
        *,
        version: int | None = None,
        query: str | None = None,
        patients: Iterable[str] = (),
    ) -> None:
        """Record the caller's successful interaction in this transaction (nothing for the server)."""
        if self.server:
            return
        event = self.kernel.audit.event(
            interaction=interaction,
            outcome="success",
            caller=self.caller,
            resource_type=res_type,
            resource_id=res_id if res_id is None or ID_PATTERN.match(res_id) else None,
            version=None if version is None else str(version),
            query=query,
            patients=sorted(set(patients)),
            source_address=self.ctx.source_address,
            request_id=self.ctx.request_id,
        )
        self._store_audit(event)

    def _store_audit(self, event: JsonDict) -> None:
        if self.deferred_audits is not None:
            self.deferred_audits.append(event)
        elif self.pending_audits is not None:
            self.pending_audits.append(event)
        else:
            store_audit_event(self.kernel, self.uow, event)

    def flush_audits(self) -> None:
        """Insert the AuditEvents this write transaction has recorded so far (in it, before commit)."""
        if self.pending_audits:
            events = list(self.pending_audits)
            self.pending_audits.clear()
            _store_audit_events(self.kernel, self.uow, events)

    # ------------------------------------------------------------------ reads
    def get(self, res_type: str, res_id: str) -> StoredResource | None:
        """The current version if it exists, is not deleted and is within reach; else None. Not audited:
        for code that looks things up while doing something else."""
        check_type(res_type)
        stored = self.uow.current(res_type, res_id)
        if stored is None or stored.deleted:
            return None
        patients = self.reach(self.grant("read", res_type))
        if patients is not None and not self.kernel.policy.visible(
            res_type, res_id, self._stored_rows(stored), patients
        ):
            return None
        return stored

    def read(self, res_type: str, res_id: str, *, version: str | None = None) -> StoredResource:
        """The read (or, with ``version``, vread) interaction: 404 when unknown or out of reach, 410
        for a deleted resource the caller could reach; audited."""
        interaction = "read" if version is None else "vread"
        check_type(res_type)
        check_id(res_id)
        access = self.grant(interaction, res_type)
        patients = self.reach(access)
        self.flush_audits()  # the trail read below includes this transaction's own
        if res_type == "AuditEvent":  # rendered from the audit log
            event, concerned = audit_log.read(self.uow.conn, res_id, version, patients)
            self.audit(interaction, res_type, res_id, version=1, patients=concerned)
            return event
        label = f"{res_type}/{res_id}" + ("" if version is None else f"/_history/{version}")
        if version is None:
            stored = self.uow.current(res_type, res_id)
        else:
            # A version is a positive 32-bit integer; anything else names no version (not a 500 from
            # the database for a number it cannot hold).
            number = int(version) if version.isdigit() and len(version) <= 10 else 0
            stored = self.uow.version(res_type, res_id, number) if 0 < number < 2**31 else None
        if stored is None:
            raise NotFound(f"{label} is not known")
        if stored.deleted:
            if patients is not None and self.kernel.policy.restricts(res_type):
                raise NotFound(f"{label} is not known")
            headers = {"ETag": etag(stored.version), "Last-Modified": http_date(stored.last_updated)}
            if version is None:
                raise Gone(f"{res_type}/{res_id} was deleted", headers=headers)
            raise Gone(f"Version {version} of {res_type}/{res_id} is a deletion", headers=headers)
        # A current version's reference rows are stored; an older version's are extracted again.
        rows = (
            self._stored_rows(stored)
            if version is None
            else self._content_rows(res_type, loads(stored.body_text))
        )
        self.kernel.policy.require_visible(res_type, res_id, rows, patients)
        self.audit(
            interaction,
            res_type,
            res_id,
            version=stored.version,
            patients=self.kernel.policy.patients_of(res_type, res_id, rows),
        )
        return stored

    def _restricted(self, request: SearchRequest, patients: frozenset[str] | None) -> SearchRequest:
        """``request`` within the caller's reach, ``_has`` sources and chain targets included."""
        return self.kernel.policy.restrict_search(
            request, patients, lambda res_type: self.reach(self.grant("search-type", res_type))
        )

    def search(self, request: SearchRequest, *, query: str | None = None) -> engine.SearchPage:
        """The search interaction: matches within reach, includes each passing the rules of a read;
        audited with the patients concerned."""
        check_type(request.resource_type)
        patients = self.reach(self.grant("search-type", request.resource_type))
        with self.uow.time_limit(self.kernel.search_limits.timeout_seconds):
            self.flush_audits()  # the trail read below includes this transaction's own
            if request.resource_type == "AuditEvent":  # rendered from the audit log
                strict = self.ctx.prefer.handling == "strict"
                restricted = self._restricted(request, patients)
                page = audit_log.search(self.uow.conn, restricted, strict=strict)
            else:
                page = engine.execute_search(self.uow.conn, self._restricted(request, patients))
        if page.includes:
            allowed: dict[str, Access | None] = {}
            page = replace(page, includes=[r for r in page.includes if self._include_visible(r, allowed)])
        concerned = set(patients) if patients is not None else _query_patients(request)
        self.audit("search-type", request.resource_type, query=query, patients=concerned)
        return page

    def _include_visible(self, row: Any, allowed: dict[str, Access | None]) -> bool:
        if row.res_type not in allowed:
            try:
                allowed[row.res_type] = self.grant("read", row.res_type)
            except Forbidden:
                allowed[row.res_type] = None
        access = allowed[row.res_type]
        if access is None:
            return False
        if not access.restricted or not self.kernel.policy.restricts(row.res_type):
            return True
        rows = self._content_rows(row.res_type, loads(row.body_text))
        return self.kernel.policy.visible(row.res_type, row.res_id, rows, self.reach(access))

    def find(
        self, where: Where | SearchRequest, limit: int, *, interaction: str = "search-type"
    ) -> list[StoredResource]:
        """Current resources matching ``where`` within reach, unordered, at most ``limit``: what
        conditional interactions match, and how the domain looks things up. Not audited."""
        request = where if isinstance(where, SearchRequest) else to_request(where, self.kernel.registry)
        check_type(request.resource_type)
        patients = self.reach(self.grant(interaction, request.resource_type))
        rows = engine.find_matching(self.uow.conn, self._restricted(request, patients), limit)
        return [
            StoredResource(r.pk, r.res_type, r.res_id, r.version, r.last_updated, False, r.body_text)
            for r in rows
        ]

    def find_versions(self, where: Where, limit: int) -> list[tuple[int, str, int]]:
        """(pk, id, version) of what :meth:`find` would return, without the bodies (:meth:`bodies`)."""
        request = to_request(where, self.kernel.registry)
        patients = self.reach(self.grant("search-type", request.resource_type))
        return engine.find_versions(self.uow.conn, self._restricted(request, patients), limit)

    def bodies(self, pks: Sequence[int]) -> dict[int, str]:
        """The stored JSON of rows :meth:`find_versions` returned (already checked for reach)."""
        return engine.bodies(self.uow.conn, pks)

    def conditional(self, res_type: str, query: str) -> SearchRequest:
        """The criteria of a conditional interaction (``If-None-Exist``, ``PUT``/``DELETE [type]?...``, a
        conditional reference of a transaction), parsed strictly: an unknown parameter is a 400."""
        check_type(res_type)
        params = parse_qsl(query.lstrip("?"), keep_blank_values=True)
        return parse_search(
            res_type, params, strict=True, registry=self.kernel.registry, limits=self.kernel.search_limits
        )

    def lock_criteria(self, *requests: SearchRequest) -> None:
        """Serialise, until commit, the transactions that match the same criteria to decide a write
        (conditional create, update and delete, a transaction's ``ifNoneExist`` and conditional
        update entries), keyed on the parsed criteria (:attr:`SearchRequest.criteria_key`): equal
        criteria written differently share one lock. Several are taken in one order, so that two
        transactions never wait for each other."""
        for key in sorted({request.criteria_key for request in requests}):
            self.serialize(f"match:{key}")

    def single_match(self, request: SearchRequest, what: str, interaction: str) -> StoredResource | None:
        """The one resource within reach that the criteria of a conditional interaction match (None:
        none; 412 when several), searched within the time limit of a search."""
        with self.uow.time_limit(self.kernel.search_limits.timeout_seconds):
            matches = self.find(request, 2, interaction=interaction)
        if len(matches) > 1:
            raise PreconditionFailed(f"{what} matches {len(matches)} {request.resource_type} resources")
        return matches[0] if matches else None

    def match_conditional(
        self, res_type: str, query: str, what: str, interaction: str
    ) -> StoredResource | None:
        """:meth:`single_match` for the criteria ``query``, after locking them (:meth:`lock_criteria`)."""
        request = self.conditional(res_type, query)
        self.lock_criteria(request)
        return self.single_match(request, what, interaction)

    def serialize(self, key: str) -> None:
        """Serialise the transactions that share ``key`` until commit (conditional writes of the same
        criteria; one scoring run per patient)."""
        self.uow.advisory_lock(key)

    def current_locked(self, res_type: str, res_id: str) -> StoredResource | None:
        """The current row locked against concurrent writers until commit (server use only)."""
        return self.uow.lock(res_type, res_id)

    # ------------------------------------------------------------------ history
    def history(
        self,
        res_type: str | None,
        res_id: str | None,
        *,
        since: datetime | None,
        before: int | None,
        after: int | None,
        count: int,
        query: str,
    ) -> HistoryPage:
        """https://hl7.org/fhir/R4/http.html#history, keyset paged on the history row key; audited.

        A restricted caller sees only entries of resources (currently) in its compartments, and never
        deletions of compartment resources, whose content would tell nothing it may see.
        """
        interaction = "history-instance" if res_id else "history-type" if res_type else "history-system"
        if res_type is not None:
            check_type(res_type)
        if res_id is not None:
            check_id(res_id)
        patients = self.reach(self.grant(interaction, res_type))
        self.flush_audits()  # the trail read below includes this transaction's own
        if res_type == "AuditEvent":  # rendered from the audit log (system history leaves it out)
            if res_id is not None:
                audit_log.read(self.uow.conn, res_id, None, patients)
            entries, has_older, has_newer, concerned = audit_log.history(
                self.uow.conn,
                res_id,
                since=since,
                before=before,
                after=after,
                count=count,
                patients=patients,
            )
            self.audit(interaction, res_type, res_id, query=query, patients=concerned)
            return HistoryPage(
                entries,
                older=f"b{entries[-1].pk}" if entries and has_older else None,
                newer=f"a{entries[0].pk}" if entries and has_newer else None,
            )
        if res_id is not None and res_type is not None:
            current = self.uow.current(res_type, res_id)
            if current is None:
                raise NotFound(f"{res_type}/{res_id} is not known")
            if patients is not None and self.kernel.policy.restricts(res_type):
                self.kernel.policy.require_visible(res_type, res_id, self._stored_rows(current), patients)
        if after is not None:
            page = self.uow.history(
                res_type=res_type, res_id=res_id, since=since, after_pk=after, count=count + 1
            )
            has_newer = len(page) > count
            page = page[:count]
            page.reverse()
            has_older = True
        else:
            page = self.uow.history(
                res_type=res_type, res_id=res_id, since=since, before_pk=before, count=count + 1
            )
            has_older = len(page) > count
            page = page[:count]
            has_newer = before is not None
        seen: set[str] = set()
        shown = []
        policy = self.kernel.policy
        for entry in page:
            rows = self._content_rows(entry.res_type, loads(entry.body_text)) if entry.body_text else []
            if (
                patients is not None
                and policy.restricts(entry.res_type)
                and (
                    entry.body_text is None
                    or not policy.visible(entry.res_type, entry.res_id, rows, patients)
                )
            ):
                continue
            seen |= policy.patients_of(entry.res_type, entry.res_id, rows)
            shown.append(entry)
        self.audit(interaction, res_type, res_id, query=query, patients=seen)
        return HistoryPage(
            shown,
            older=f"b{page[-1].pk}" if page and has_older else None,
            newer=f"a{page[0].pk}" if page and has_newer else None,
        )

    # ------------------------------------------------------------------ writes
    def create(
        self,
        res_type: str,
        body: JsonDict,
        *,
        if_none_exist: str | None = None,
        res_id: str | None = None,
    ) -> WriteOutcome:
        """Create (https://hl7.org/fhir/R4/http.html#create), conditional with ``if_none_exist``."""
        check_type(res_type)
        if res_type == "AuditEvent":
            raise MethodNotAllowed(
                "AuditEvents are written by this server only; they cannot be created over the API"
            )
        access = self.grant("create", res_type)
        if res_type == "Patient" and access.patient is not None:
            raise Forbidden("A patient/ token cannot create Patient resources")
        validate_resource(body, expected_type=res_type)
        if if_none_exist:
            what = f"If-None-Exist '{if_none_exist}'"
            found = self.match_conditional(res_type, if_none_exist, what, "create")
            if found is not None:
                return WriteOutcome(200, found, loads(found.body_text), noop=True)
        hook = self.kernel.hooks.get(res_type)
        if hook is not None and (repeated := hook.existing(self, body)) is not None:
            return WriteOutcome(200, repeated, loads(repeated.body_text), noop=True)
        return self._write("create", res_type, res_id or new_id(), body, None, access)

    def batchable_create(self, res_type: str) -> bool:
        """Whether plain creates of ``res_type`` may be stored together (:meth:`check_create`,
        :meth:`store_creates`): no storage hook and no canonical url rule reads what the others wrote."""
        return res_type not in self.kernel.hooks and res_type not in canonical_types()

    def check_create(self, res_type: str, body: JsonDict, res_id: str) -> PendingCreate:
        """Every check :meth:`create` makes before storing a resource of a :meth:`batchable_create`
        type (type, scopes, structure, the caller's reach), for :meth:`store_creates`."""
        check_type(res_type)
        if res_type == "AuditEvent":
            raise MethodNotAllowed(
                "AuditEvents are written by this server only; they cannot be created over the API"
            )
        if not self.batchable_create(res_type):
            raise FhirError(f"Creates of {res_type} are not stored in a batch")
        access = self.grant("create", res_type)
        if res_type == "Patient" and access.patient is not None:
            raise Forbidden("A patient/ token cannot create Patient resources")
        validate_resource(body, expected_type=res_type)
        patients = self.reach(access)
        if patients is not None:
            rows = self._content_rows(res_type, {**body, "id": res_id})
            self.kernel.policy.require_writable(res_type, res_id, rows, access, patients)
        return PendingCreate(res_type, res_id, body)

    def store_creates(self, pending: Sequence[PendingCreate]) -> list[WriteOutcome]:
        """Store checked creates (:meth:`check_create`) in one batch (one statement per table,
        :meth:`UnitOfWork.save_new`), each audited as its own create: what a transaction's plain
        POST entries do one by one, in a few statements instead of nine per entry."""
        if not pending:
            return []
        last_updated = now_ms()
        new = []
        for item in pending:
            stamped = stamp_meta(item.body, item.res_id, 1, last_updated)
            new.append(
                NewResource(
                    item.res_type, item.res_id, stamped, last_updated, self.kernel.extractor.extract(stamped)
                )
            )
        outcomes = []
        for made, stored in zip(new, self.uow.save_new(new), strict=True):
            rows = tuple(made.index_rows)
            outcomes.append(WriteOutcome(201, stored, made.body, created=True, rows=rows))
            self.audit(
                "create",
                made.res_type,
                made.res_id,
                version=1,
                patients=self.kernel.policy.patients_of(made.res_type, made.res_id, rows),
            )
        return outcomes

    def update(
        self, res_type: str, res_id: str, body: JsonDict, *, if_match: str | None = None
    ) -> WriteOutcome:
        """Update or create with a client id (https://hl7.org/fhir/R4/http.html#update)."""
        access = self._grant_change("update", res_type, res_id)
        if body.get("id") is None:
            raise BadRequest("The resource in an update must carry its id", expression=f"{res_type}.id")
        if body.get("id") != res_id:
            raise BadRequest(
                f"The resource id '{body.get('id')}' does not match the URL id '{res_id}'",
                expression=f"{res_type}.id",
            )
        validate_resource(body, expected_type=res_type)
        previous = self._lock_for_change(access, res_type, res_id, must_exist=False)
        if if_match is not None:
            expected = parse_etag(if_match)
            if previous is None or previous.deleted or str(previous.version) != expected:
                current = "none" if previous is None or previous.deleted else previous.version
                raise PreconditionFailed(
                    f"If-Match {if_match} does not match the current version ({current}) "
                    f"of {res_type}/{res_id}"
                )
        return self._write("update", res_type, res_id, body, previous, access)

    def conditional_update(
        self, res_type: str, query: str, body: JsonDict, *, if_match: str | None = None
    ) -> WriteOutcome:
        """https://hl7.org/fhir/R4/http.html#cond-update"""
        check_type(res_type)
        self.grant("update", res_type)
        target = self.match_conditional(res_type, query, f"Conditional update '{query}'", "update")
        if target is None:
            body_id = body.get("id")
            if body_id is None:
                return self.create(res_type, body)
            return self.update(res_type, str(body_id), body, if_match=if_match)
        if body.get("id") is not None and body["id"] != target.res_id:
            raise BadRequest(
                f"The resource id '{body['id']}' differs from the matched {res_type}/{target.res_id}",
                expression=f"{res_type}.id",
            )
        return self.update(res_type, target.res_id, {**body, "id": target.res_id}, if_match=if_match)

    def patch(
        self, res_type: str, res_id: str, operations: Any, *, if_match: str | None = None
    ) -> WriteOutcome:
        """JSON Patch (RFC 6902): https://hl7.org/fhir/R4/http.html#patch"""
        access = self._grant_change("patch", res_type, res_id)
        previous = self._lock_for_change(access, res_type, res_id, must_exist=True)
        assert previous is not None
        if previous.deleted:
            raise Gone(f"{res_type}/{res_id} was deleted")
        if if_match is not None and str(previous.version) != parse_etag(if_match):
            raise PreconditionFailed(
                f"If-Match {if_match} does not match the current version ({previous.version}) "
                f"of {res_type}/{res_id}"
            )
        if not isinstance(operations, list):
            raise BadRequest("A JSON Patch document is an array of operations")
        try:
            patched = apply_patch(
                loads(previous.body_text), operations, max_bytes=self.kernel.max_resource_bytes
            )
        except RecursionError as exc:  # copies of a subtree into itself, nested past any limit
            raise BadRequest("The JSON Patch nests the resource too deeply", code="too-costly") from exc
        # A patch can nest the resource deeper than its own body (a copy of a subtree into itself).
        check_depth(patched, "The patched resource")
        if (
            not isinstance(patched, dict)
            or patched.get("resourceType") != res_type
            or patched.get("id") != res_id
        ):
            raise Unprocessable("A patch may not change resourceType or id", code="processing")
        validate_resource(patched, expected_type=res_type)
        return self._write("patch", res_type, res_id, patched, previous, access)

    def delete(self, res_type: str, res_id: str) -> WriteOutcome:
        """Soft delete: a new version marks the resource deleted; reads then answer 410."""
        access = self._grant_change("delete", res_type, res_id)
        previous = self._lock_for_change(access, res_type, res_id, must_exist=True)
        assert previous is not None
        if previous.deleted:
            return WriteOutcome(204, previous, None, noop=True)
        rows = self._stored_rows(previous)
        patients = self.reach(access)
        if patients is not None:
            self.kernel.policy.require_writable(res_type, res_id, rows, access, patients)
        stored = self.uow.save(
            res_type=res_type,
            res_id=res_id,
            body=None,
            version=previous.version + 1,
            last_updated=self._next_instant(previous),
            method="delete",
            previous=previous,
        )
        outcome = WriteOutcome(204, stored, None)
        if (hook := self.kernel.hooks.get(res_type)) is not None:
            hook.before_commit(self, outcome, previous)
        self.audit(
            "delete",
            res_type,
            res_id,
            version=stored.version,
            patients=self.kernel.policy.patients_of(res_type, res_id, rows),
        )
        return outcome

    def conditional_delete(self, res_type: str, query: str) -> WriteOutcome | None:
        """https://hl7.org/fhir/R4/http.html#3.1.0.7.1 (single-match mode); None when nothing matched."""
        check_type(res_type)
        self.grant("delete", res_type)
        target = self.match_conditional(res_type, query, f"Conditional delete '{query}'", "delete")
        return None if target is None else self.delete(res_type, target.res_id)

    def _grant_change(self, interaction: str, res_type: str, res_id: str) -> Access:
        """The checks every update, patch and delete starts with (type, AuditEvents are permanent, id,
        scopes)."""
        check_type(res_type)
        _refuse_audit_change(res_type)
        check_id(res_id)
        return self.grant(interaction, res_type)

    def _lock_for_change(
        self, access: Access, res_type: str, res_id: str, *, must_exist: bool
    ) -> StoredResource | None:
        """Lock and check the resource an update, patch or delete changes: within reach, and not a
        published conformance resource; with ``must_exist``, 404 when it never existed."""
        previous = self.uow.lock(res_type, res_id)
        self._existing_within_reach(previous, access)
        if previous is None and must_exist:
            raise NotFound(f"{res_type}/{res_id} is not known")
        if previous is not None:
            refuse_change_to_published(res_type, previous.body_text)
        return previous

    def _existing_within_reach(self, previous: StoredResource | None, access: Access) -> None:
        """A restricted caller may not touch (or learn of) a resource outside its compartments."""
        patients = self.reach(access)
        if patients is None or previous is None or previous.deleted:
            return
        self._require_reach(previous, patients)

    def _write(
        self,
        interaction: str,
        res_type: str,
        res_id: str,
        body: JsonDict,
        previous: StoredResource | None,
        access: Access,
    ) -> WriteOutcome:
        """Store a validated resource: hooks, the compartment of its new content, storage, audit."""
        patients = self.reach(access)
        if patients is not None:
            # Before the hooks look at the content: a write placed outside the caller's reach is 403
            # whether or not what it names exists, so no hook's answer can tell the difference.
            rows = self._content_rows(res_type, {**body, "id": res_id})
            self.kernel.policy.require_writable(res_type, res_id, rows, access, patients)
        if res_type in canonical_types():
            self._check_canonical(res_type, res_id, body)
        hook = self.kernel.hooks.get(res_type)
        if hook is not None:
            hook.before_storage(self, res_id, body, previous)
        outcome = self._store(res_type, res_id, body, previous, interaction)
        self.audit(
            interaction,
            res_type,
            res_id,
            version=outcome.stored.version,
            patients=self.kernel.policy.patients_of(res_type, res_id, outcome.rows),
        )
        if hook is not None and (warnings := hook.before_commit(self, outcome, previous)):
            outcome = replace(outcome, warnings=outcome.warnings + tuple(warnings))
        return outcome

    def _check_canonical(self, res_type: str, res_id: str, body: JsonDict) -> None:
        """The rules of canonical urls and published content (:mod:`fhir_norse.server.published`),
        checked under a lock on the type and url, as conditional create locks its criteria."""
        url = body.get("url")
        same_url: list[JsonDict] = []
        if isinstance(url, str):
            self.serialize(f"canonical:{res_type}|{url}")
            found = self.as_server().find(Where(res_type, uris={"url": url}), _CANONICAL_VERSIONS_LIMIT)
            same_url = [{**loads(f.body_text), "id": f.res_id} for f in found if f.res_id != res_id]
        check_canonical_write(res_type, body, same_url, publisher=self.server)

    def _next_instant(self, previous: StoredResource | None) -> datetime:
        last_updated = now_ms()
        if previous is not None and last_updated <= previous.last_updated:
            # Keep lastUpdated strictly increasing per resource even within one millisecond.
            last_updated = previous.last_updated + _ONE_MS
        return last_updated

    def _store(
        self,
        res_type: str,
        res_id: str,
        body: JsonDict,
        previous: StoredResource | None,
        method: str,
        check: Any = None,
    ) -> WriteOutcome:
        version = 1 if previous is None else previous.version + 1
        last_updated = self._next_instant(previous)
        stamped = stamp_meta(body, res_id, version, last_updated)
        rows = self.kernel.extractor.extract(stamped)
        if check is not None:
            check(rows)
        stored = self.uow.save(
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

    # ------------------------------------------------------------------ derived writes
    def save_derived(self, items: Sequence[Derived]) -> list[StoredResource]:
        """Store what the server derives (scores, reports, alerts, Provenance): each is checked against
        the R4 definitions and against the content pack's profiles it claims (422 names the builder's
        mistake before anything is stored), the hooks of its type run, new resources are written in
        one batch and new versions one by one. Only the server writes these (:meth:`as_server`)."""
        if not self.server:
            raise Forbidden("Only the server itself writes derived resources")
        for item in items:
            check_type(item.res_type)
            self.check_derived(item.res_type, item.body)
            hook = self.kernel.hooks.get(item.res_type)
            if hook is not None:
                hook.before_storage(self, item.res_id, item.body, item.previous)
        out: dict[int, StoredResource] = {}
        creates = [(n, item) for n, item in enumerate(items) if item.previous is None]
        if creates:
            last_updated = now_ms()
            new = []
            for _, item in creates:
                stamped = stamp_meta(item.body, item.res_id, 1, last_updated)
                new.append(
                    NewResource(
                        item.res_type,
                        item.res_id,
                        stamped,
                        last_updated,
                        self.kernel.extractor.extract(stamped),
                    )
                )
            for (n, _), stored in zip(creates, self.uow.save_new(new), strict=True):
                out[n] = stored
        for n, item in enumerate(items):
            if n in out:
                continue
            previous = self.uow.lock(item.res_type, item.res_id)
            if item.previous is not None and (previous is None or previous.version != item.previous.version):
                raise Conflict(f"{item.res_type}/{item.res_id} changed while it was being re-derived; retry")
            out[n] = self._store(
                item.res_type, item.res_id, item.body, previous, "update" if previous else "create"
            ).stored
        stored_in_order = [out[n] for n in range(len(items))]
        for item, stored in zip(items, stored_in_order, strict=True):
            hook = self.kernel.hooks.get(item.res_type)
            if hook is not None:
                outcome = WriteOutcome(201 if item.previous is None else 200, stored, item.body)
                hook.before_commit(self, outcome, item.previous)
        return stored_in_order

    def check_derived(self, res_type: str, body: JsonDict) -> None:
        """The structural (R4 definitions) and profile checks of a derived resource (422 if it fails).
        A resource of a shape already found conformant passes without walking it again: its verdict
        depends only on its shape (:mod:`fhir_norse.server.conformance_memo`)."""
        key = shape(res_type, body)
        if key in self.kernel.conformance:
            return
        self._check_derived(res_type, body)
        self.kernel.conformance.remember(key)

    def _check_derived(self, res_type: str, body: JsonDict) -> None:
        try:
            validate_resource(body, expected_type=res_type, model=False)
        except FhirError as error:
            raise Unprocessable(
                f"The server built a {res_type} that is not valid R4: {error.message}", issues=error.issues
            ) from error
        profiles = self.kernel.profiles
        if profiles is None:
            return
        issues: list[Issue] = []
        for url in (body.get("meta") or {}).get("profile") or []:
            if url in profiles.urls:
                issues += [i for i in profiles.validate(body, url) if i.severity in ("error", "fatal")]
        if issues:
            raise Unprocessable(
                f"The server built a {res_type} that does not conform to its profile: "
                f"{issues[0].diagnostics}",
                issues=issues,
            )


def store_audit_event(kernel: Kernel, uow: UnitOfWork, event: JsonDict) -> None:
    """Append an AuditEvent to the audit log in ``uow``: one narrow row (+ one per patient), the one
    place the trail is written (:mod:`fhir_norse.server.audit_log`)."""
    audit_log.insert_events(uow.conn, [event])


def record_event(kernel: Kernel, event: JsonDict) -> None:
    """Store an AuditEvent in a transaction of its own, committed before this returns."""
    with kernel.storage.write() as uow:
        store_audit_event(kernel, uow, event)


def _store_audit_events(kernel: Kernel, uow: UnitOfWork, events: Sequence[JsonDict]) -> None:
    audit_log.insert_events(uow.conn, events)


def record_refusal(
    kernel: Kernel,
    ctx: RequestContext,
    interaction: str,
    outcome: str,
    res_type: str | None,
    res_id: str | None,
    query: str | None,
    reason: str,
) -> None:
    """Record a refused (4xx) or failed (5xx) interaction in a transaction of its own."""
    event = kernel.audit.event(
        interaction=interaction,
        outcome=outcome,
        caller=ctx.caller,
        resource_type=res_type,
        resource_id=res_id if res_id is not None and ID_PATTERN.match(res_id) else None,
        query=query,
        source_address=ctx.source_address,
        request_id=ctx.request_id,
        failure_reason=reason[:500],
    )
    record_event(kernel, event)


def _refuse_audit_change(res_type: str) -> None:
    if res_type == "AuditEvent":
        raise MethodNotAllowed(
            "AuditEvents are a permanent record: they cannot be updated, patched or deleted"
        )


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
