"""``Patient/[id]/$everything``: a patient's whole record on this server, as the caller may read it.

https://hl7.org/fhir/R4/patient-operation-everything.html. The answer is a ``searchset`` Bundle of:

* **match**: the Patient itself and every resource in its Patient compartment
  (https://hl7.org/fhir/R4/compartmentdefinition-patient.html), with this server's extension of it
  (:mod:`fhir_norse.auth.compartment`: Task through ``for``/``owner``, and the Binaries whose
  ``securityContext`` names the patient or a resource of its compartment, one step deep, as the access
  policy decides a Binary's patients);
* **include**: the directory resources the record references (Practitioner, PractitionerRole,
  Organization), which the operation allows "at the server's discretion". Only references the search
  index holds count (``Observation.performer``, ``QuestionnaireResponse.author``,
  ``Patient.generalPractitioner``...), and only from the record resources of the types returned. The
  Questionnaires that responses answer are left out: they are definitional, shared by every patient,
  and a client resolves the response's ``questionnaire`` canonical when it needs one.

The AuditEvents of the record are not part of it: they are the server's trail, not the patient's
chart, and are searched as ``AuditEvent?patient=``. The operation's ``start`` and ``end`` (care dates)
are refused with 400 ``not-supported`` rather than ignored, since ignoring them would return more than
was asked.

**Access.** The same rules as a read: the caller needs ``read`` on Patient and reaches the patient
(404 otherwise, as for a read of it); each other type is returned only where the caller's scopes allow
reading it for this patient (a ``patient/`` token its own record, a ``user/`` token its care teams'
patients), and a type they do not allow is left out rather than refused, as ``_include`` does. The
operation is recorded as one AuditEvent (``operation:everything``, entity the patient).

**Paging.** Keyset on the resource row key: ``Bundle.link`` ``next`` carries ``_cursor=<key>`` and the
next page resumes after it. A resource keeps its row key when it is updated, so paging through a
record that changes meanwhile returns each resource at most once (ordering on ``lastUpdated`` would
move an updated resource past the cursor and return it twice). Each page reads at most ``_count`` + 1
rows: the record is never loaded whole. ``total`` is computed on the first page only (one count of the
same query); later pages leave it out, as R4 allows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa

from fhir_norse.auth.compartment import SHARED_TYPES, Reach, membership_params, reach_of, searchable
from fhir_norse.outcomes import BadRequest, Forbidden, Issue, operation_outcome
from fhir_norse.server.context import Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.operations.registry import PASSED_OVER, Operation, OperationCall, non_negative
from fhir_norse.server.repository import Repository
from fhir_norse.server.resources import check_id, dumps
from fhir_norse.store.resource_types import SUPPORTED_TYPE_SET, SUPPORTED_TYPES
from fhir_norse.store.search.values import date_range
from fhir_norse.store.tables import ReferenceIndex, ResourceRow

INTERACTION = "operation:everything"
DEFINITION = "http://hl7.org/fhir/OperationDefinition/Patient-everything"

RES: sa.Table = ResourceRow.__table__  # type: ignore[attr-defined]
REF: sa.Table = ReferenceIndex.__table__  # type: ignore[attr-defined]

# The directory resources the record's references bring in (search.mode ``include``).
INCLUDE_TYPES: tuple[str, ...] = ("Organization", "Practitioner", "PractitionerRole")
# Parameters that shape the answer but are not the operation's (the API renders them).
_NOT_SUPPORTED = frozenset({"start", "end"})
# The parameters a next link carries, in this order.
_LINK_PARAMS = ("_type", "_since", "_count")


@cache
def record_types() -> tuple[str, ...]:
    """The stored types that are part of a patient's record: those with a Patient compartment on this
    server, less AuditEvent (kept in the audit log, not the resource table: module doc)."""
    return tuple(t for t in SUPPORTED_TYPES if t != "AuditEvent" and reach_of(t) is Reach.PATIENTS)


@cache
def _types_by_param() -> dict[str, tuple[str, ...]]:
    """Compartment parameter -> the types whose references through it put a resource in a patient's
    compartment (Binary's securityContext is no index parameter: handled apart)."""
    out: dict[str, list[str]] = {}
    for res_type in record_types():
        if searchable(res_type):
            for param in membership_params(res_type):
                out.setdefault(param, []).append(res_type)
    return {param: tuple(types) for param, types in sorted(out.items())}


@dataclass(frozen=True, slots=True)
class EverythingRequest:
    """The parsed parameters of one invocation."""

    patient_id: str
    types: frozenset[str] | None  # None: every type
    since: datetime | None
    count: int
    after: int | None  # the row key the page resumes after
    # The operation's own parameters as given, for the links (without the cursor).
    echo: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()


def _pairs(call: OperationCall) -> list[tuple[str, str]]:
    """The query parameters and, for a POST, the primitive parameters of its Parameters body
    (``valueCode``/``valueString`` for ``_type``, ``valueInstant`` for ``_since``, ``valueInteger`` for
    ``_count``)."""
    pairs = list(call.params)
    if call.body is None:
        return pairs
    if not isinstance(call.body, dict) or call.body.get("resourceType") != "Parameters":
        raise BadRequest("The body of $everything is a Parameters resource", code="structure")
    for param in call.body.get("parameter") or []:
        name = param.get("name") if isinstance(param, dict) else None
        values = [v for k, v in param.items() if k.startswith("value")] if isinstance(name, str) else []
        if len(values) != 1 or isinstance(values[0], bool) or not isinstance(values[0], str | int):
            raise BadRequest(
                f"$everything parameter {name!r} needs one primitive value (valueCode, valueString, "
                "valueInstant or valueInteger)",
                code="structure",
            )
        pairs.append((str(name), str(values[0])))
    return pairs


def parse_request(
    patient_id: str, pairs: Iterable[tuple[str, str]], *, default_count: int, max_count: int, strict: bool
) -> EverythingRequest:
    """The invocation's parameters, checked: 400 for an unknown ``_type``, a malformed ``_since``,
    ``_count`` or ``_cursor``, a parameter given twice (but ``_type``), ``start``/``end``, and (with
    ``Prefer: handling=strict``) any parameter the operation does not define."""
    types: set[str] | None = None
    since: datetime | None = None
    count: int | None = None
    after: int | None = None
    echo: list[tuple[str, str]] = []
    ignored: list[str] = []
    seen: set[str] = set()
    for name, value in pairs:
        if name in seen and name != "_type":
            raise BadRequest(f"$everything parameter '{name}' is given more than once")
        seen.add(name)
        if name == "_type":
            types = (types or set()) | _parse_types(value)
            echo.append((name, value))
        elif name == "_since":
            since = date_range(value)[0]
            echo.append((name, value))
        elif name == "_count":
            count = min(non_negative(name, value), max_count)
            echo.append((name, str(count)))
        elif name == "_cursor":
            after = non_negative(name, value)
        elif name in _NOT_SUPPORTED:
            raise BadRequest(
                f"$everything parameter '{name}' (care dates) is not supported by this server; use _since "
                "for what changed since a moment",
                code="not-supported",
            )
        elif name in PASSED_OVER:
            continue
        elif strict:
            raise BadRequest(f"Unknown parameter '{name}' for $everything", code="not-supported")
        else:
            ignored.append(name)
    return EverythingRequest(
        patient_id=patient_id,
        types=None if types is None else frozenset(types),
        since=since,
        count=default_count if count is None else count,
        after=after,
        echo=tuple(echo),
        ignored=tuple(sorted(set(ignored))),
    )


def _parse_types(value: str) -> set[str]:
    out: set[str] = set()
    for part in value.split(","):
        name = part.strip()
        if name not in SUPPORTED_TYPE_SET:
            raise BadRequest(
                f"_type: '{name}' is not a resource type this server supports", code="not-supported"
            )
        out.add(name)
    return out


# ---------------------------------------------------------------------- the handler


def everything_operation(service: FhirService, call: OperationCall) -> Result:
    """The handler of ``GET|POST Patient/[id]/$everything``."""
    assert call.res_id is not None
    patient_id = call.res_id
    kernel = service.kernel
    query = f"Patient/{patient_id}/$everything" + (f"?{urlencode(call.params)}" if call.params else "")
    # Every refusal (a malformed id or parameter too) is recorded by the audited session.
    with service.audited_session(call.ctx, INTERACTION, "Patient", patient_id, query, read_only=True) as repo:
        check_id(patient_id)
        pairs = _pairs(call)
        request = parse_request(
            patient_id,
            pairs,
            default_count=kernel.default_count,
            max_count=kernel.max_count,
            strict=call.ctx.prefer.handling == "strict",
        )
        page = _page(repo, request)
        repo.audit(INTERACTION, "Patient", patient_id, query=query, patients=[patient_id])
    return Result(200, raw=_bundle(call.ctx.base_url, request, page))


@dataclass(frozen=True, slots=True)
class _Row:
    pk: int
    res_type: str
    res_id: str
    body_text: str


@dataclass(frozen=True, slots=True)
class _Page:
    rows: list[_Row]
    next_after: int | None
    total: int | None


def _page(repo: Repository, request: EverythingRequest) -> _Page:
    """One page of the record within the caller's reach (module doc)."""
    patient_id = request.patient_id
    # 404 for an unknown patient or one out of reach (the answer of a read), 403 without Patient read.
    repo.require_patient(
        f"Patient/{patient_id}", interaction="read", res_type="Patient", expression="Patient.id"
    )
    readable = _readable_types(repo, patient_id)
    wanted = readable if request.types is None else readable & request.types
    record = sorted(wanted & set(record_types()))
    includes = sorted(wanted & set(INCLUDE_TYPES))
    if not record and not includes:
        return _Page([], None, 0 if request.after is None else None)
    candidates = _candidates(patient_id, record, includes)
    conditions: list[sa.ColumnElement[bool]] = [
        RES.c.pk.in_(sa.select(candidates.c.pk)),
        RES.c.deleted.is_(False),
    ]
    if request.since is not None:
        conditions.append(RES.c.last_updated >= request.since)
    conn = repo.uow.conn
    with repo.uow.time_limit(repo.kernel.search_limits.timeout_seconds):
        total = None
        if request.after is None:
            total = int(
                conn.execute(sa.select(sa.func.count()).select_from(RES).where(*conditions)).scalar_one()
            )
        if request.count == 0:
            return _Page([], None, total)
        if request.after is not None:
            conditions.append(RES.c.pk > request.after)
        statement = (
            sa.select(RES.c.pk, RES.c.res_type, RES.c.res_id, sa.cast(RES.c.body, sa.Text))
            .where(*conditions)
            .order_by(RES.c.pk)
            .limit(request.count + 1)
        )
        rows = [_Row(int(pk), t, i, str(body)) for pk, t, i, body in conn.execute(statement)]
    more = len(rows) > request.count
    rows = rows[: request.count]
    return _Page(rows, rows[-1].pk if more else None, total)


def _readable_types(repo: Repository, patient_id: str) -> set[str]:
    """The types whose resources of this patient the caller may read: its scopes allow reading the type
    and, for a restricted caller, the access they give reaches this patient (a directory type is read as
    the scopes allow)."""
    out: set[str] = set()
    for res_type in (*record_types(), *INCLUDE_TYPES):
        try:
            access = repo.grant("read", res_type)
        except Forbidden:
            continue
        patients = repo.reach(access)
        if res_type in SHARED_TYPES or patients is None or patient_id in patients:
            out.add(res_type)
    return out


def _candidates(patient_id: str, record: Sequence[str], includes: Sequence[str]) -> sa.CTE:
    """The row keys of the patient's record and of the directory resources it references, as one
    query the page selects from (every part is driven by an index: the resource's type and id, or the
    reference index's target)."""
    members = _members(patient_id).cte("everything_members")
    parts: list[sa.Select[Any]] = [sa.select(members.c.pk).where(members.c.res_type.in_(record))]
    if "Binary" in record:
        parts.append(_binaries(patient_id, members))
    if includes:
        parts.append(_included(members, record, includes))
    return sa.union(*parts).cte("everything_candidates")


def _members(patient_id: str) -> sa.CompoundSelect[Any]:
    """(pk, type, id) of the live resources in the patient's compartment: the Patient itself and those
    whose compartment references (local ones: as the access policy counts them) name it."""
    own = RES.alias("own")
    referring = RES.alias("referring")
    by_param = [
        sa.and_(REF.c.param == param, REF.c.res_type.in_(types)) for param, types in _types_by_param().items()
    ]
    itself = sa.select(own.c.pk, own.c.res_type, own.c.res_id).where(
        own.c.res_type == "Patient", own.c.res_id == patient_id, own.c.deleted.is_(False)
    )
    through_references = (
        sa.select(referring.c.pk, referring.c.res_type, referring.c.res_id)
        .join(REF, REF.c.resource_pk == referring.c.pk)
        .where(
            REF.c.target_type == "Patient",
            REF.c.target_id == patient_id,
            REF.c.url.is_(None),
            sa.or_(*by_param),
            referring.c.deleted.is_(False),
        )
    )
    return sa.union(itself, through_references)


def _binaries(patient_id: str, members: sa.CTE) -> sa.Select[Any]:
    """The live Binaries whose securityContext names the patient or another resource of its compartment
    (a local reference, versioned or not), as :meth:`AccessPolicy.context_rows` places a Binary.

    The securityContext is no search parameter, so it is read from the stored JSON: a scan of the
    Binary rows, in the database."""
    binary = RES.alias("binary")
    context = binary.c.body[("securityContext", "reference")].as_string()
    named = sa.select(members.c.res_type + "/" + members.c.res_id).where(
        members.c.res_type != "Patient", members.c.res_type != "Binary"
    )
    own = sa.literal(f"Patient/{patient_id}")
    versioned = sa.and_(
        context.like("%/\\_history/%", escape="\\"),
        sa.or_(
            context.like(f"Patient/{patient_id}/\\_history/%", escape="\\"),
            sa.exists().where(
                members.c.res_type != "Patient",
                context.like(members.c.res_type + "/" + members.c.res_id + "/\\_history/%", escape="\\"),
            ),
        ),
    )
    return sa.select(binary.c.pk).where(
        binary.c.res_type == "Binary",
        binary.c.deleted.is_(False),
        sa.or_(context == own, context.in_(named), versioned),
    )


def _included(members: sa.CTE, record: Sequence[str], includes: Sequence[str]) -> sa.Select[Any]:
    """The live directory resources (``includes`` types) that record resources of the ``record`` types
    reference locally: from the record's own reference rows (not from every reference to a directory
    resource on the server)."""
    target = RES.alias("target")
    source = REF.alias("source")
    return (
        sa.select(target.c.pk)
        .select_from(members)
        .join(source, source.c.resource_pk == members.c.pk)
        .join(
            target,
            # ``|| ''``: no index on the target type may drive this join (the planner would otherwise
            # read every reference to a directory resource on the server, and then keep the record's).
            sa.and_(target.c.res_type == source.c.target_type + "", target.c.res_id == source.c.target_id),
        )
        .where(
            members.c.res_type.in_(record),
            target.c.res_type.in_(includes),
            source.c.url.is_(None),
            target.c.deleted.is_(False),
        )
    )


# ---------------------------------------------------------------------- the Bundle


def _bundle(base: str, request: EverythingRequest, page: _Page) -> str:
    """The ``searchset`` Bundle of a page: ``self`` and ``next`` links, each entry with its ``fullUrl``
    and ``search.mode``, and an outcome entry naming the parameters ignored."""
    path = f"{base}/Patient/{request.patient_id}/$everything"
    echo = [(k, v) for name in _LINK_PARAMS for k, v in request.echo if k == name]
    here = [*echo, ("_cursor", str(request.after))] if request.after is not None else echo
    links = [{"relation": "self", "url": _url(path, here)}]
    if page.next_after is not None:
        links.append({"relation": "next", "url": _url(path, [*echo, ("_cursor", str(page.next_after))])})
    head: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if page.total is not None:
        head["total"] = page.total
    head["link"] = links
    entries = [_entry(base, row) for row in page.rows]
    if request.ignored:
        warning = Issue(
            f"Unknown parameters ignored: {', '.join(request.ignored)}",
            code="not-supported",
            severity="warning",
        )
        entries.append('{"resource":' + dumps(operation_outcome([warning])) + ',"search":{"mode":"outcome"}}')
    text = dumps(head)[:-1]
    if entries:
        text += ',"entry":[' + ",".join(entries) + "]"
    return text + "}"


def _entry(base: str, row: _Row) -> str:
    mode = "include" if row.res_type in INCLUDE_TYPES else "match"
    full_url = dumps(f"{base}/{row.res_type}/{row.res_id}")
    return f'{{"fullUrl":{full_url},"resource":{row.body_text},"search":{{"mode":"{mode}"}}}}'


def _url(path: str, params: Sequence[tuple[str, str]]) -> str:
    return f"{path}?{urlencode(params)}" if params else path


EVERYTHING = Operation(
    name="everything",
    definition=DEFINITION,
    types=("Patient",),
    handler=everything_operation,
    type_level=False,
    instance_level=True,
    idempotent=True,
    documentation=(
        "The patient's record on this server as the caller may read it: the Patient, its compartment "
        "(with Task, and Binary by securityContext) and, as include, the Practitioners, PractitionerRoles "
        "and Organizations it references. _since, _type and _count with keyset paging (next links); "
        "start and end are not supported."
    ),
)
