"""The audit trail as narrow append-only rows, and AuditEvents rendered from them (issue 14, lever 1).

Writing: one ``audit_log`` row per event (the :class:`~fhir_norse.auth.audit.AuditInputs` it is
rendered from, no FHIR body, no search-index rows) plus one ``audit_patient`` row per patient
concerned, by plain Core inserts (:func:`insert_events`). Reading: ``AuditEvent/<id>`` (vread of
version 1 only), the AuditEvent search, and ``AuditEvent/_history`` render the events from those rows
in the BALP shape the builders return (:func:`fhir_norse.auth.audit.render_audit_event`), with
``meta.versionId`` 1 and ``meta.lastUpdated`` the time recorded. AuditEvents are never changed, so an
event's history is its one version. System-level ``_history`` does not list them.

The search supports the parameters a privacy officer uses (:data:`SUPPORTED`): ``patient``,
``agent`` (reference, ``:identifier`` for the client, ``:<Type>``), ``date``/``_lastUpdated`` (every
prefix), ``entity``, ``policy`` (the token's jti), ``type``, ``subtype``, ``action``, ``outcome``,
``address``, ``agent-name`` (nothing matches: no event names an agent so) and ``_id``; ``_sort``
by ``date``/``_lastUpdated`` (either direction), ``_count``,
keyset cursors, ``_total`` and ``_summary=count``. Other parameters are refused with 400 under
``Prefer: handling=strict`` and ignored (with a warning entry) otherwise, as the generic search does.
``entity=Patient/x`` matches events whose resource is that patient or that concern it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from fhir_norse.auth.audit import (
    AUTHENTICATION,
    AUTHORIZATION,
    CLIENT_SYSTEM,
    FAILED,
    JTI_PREFIX,
    OPERATION_SYSTEM,
    REFUSED,
    REST,
    STEP_SYSTEM,
    SUCCESS,
    TOKEN_GRANT,
    AuditInputs,
    BuiltEvent,
    render_audit_event,
)
from fhir_norse.outcomes import BadRequest, NotFound
from fhir_norse.server.resources import new_id, now_ms, stamp_meta
from fhir_norse.store.audit_tables import AUDIT_LOG, AUDIT_PATIENT, legacy_columns
from fhir_norse.store.search.cursor import Cursor, CursorValue, encode_cursor
from fhir_norse.store.search.engine import SearchPage, StoredRow
from fhir_norse.store.search.request import (
    CompartmentCriterion,
    Criterion,
    DateValue,
    ReferenceValue,
    SearchRequest,
    StringValue,
    TokenValue,
    UriValue,
)
from fhir_norse.store.search.sql import date_match, escape_like
from fhir_norse.store.storage import Storage, StoredResource

JsonDict = dict[str, Any]
L = AUDIT_LOG
P = AUDIT_PATIENT

_CODES = {SUCCESS: "0", REFUSED: "4", FAILED: "8"}
_NAMES = {code: name for name, code in _CODES.items()}
SUPPORTED = frozenset(
    {
        "_id",
        "_lastUpdated",
        "date",
        "patient",
        "agent",
        "entity",
        "policy",
        "type",
        "subtype",
        "action",
        "outcome",
        "address",
        "agent-name",
    }
)
_SORTS = frozenset({"date", "_lastUpdated"})
_REST_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-type"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_RESTFUL = "http://hl7.org/fhir/restful-interaction"
_USER_TYPES = ("Practitioner", "PractitionerRole", "Patient", "RelatedPerson", "Person")


# ------------------------------------------------------------------ writing
def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def _row(event: JsonDict) -> tuple[JsonDict, list[str]]:
    """The ``audit_log`` values of one built event and the patients it concerns."""
    inputs = event.inputs if isinstance(event, BuiltEvent) else None
    if inputs is None:
        # An event not made by the builders: kept as it is, found by what its body says.
        recorded = now_ms()
        res_id = new_id()
        body = stamp_meta(event, res_id, 1, recorded)
        columns, patients = legacy_columns(body)
        return {"id": res_id, "recorded": recorded, "legacy_body": body, **columns}, patients
    extra: JsonDict = {"srv": [inputs.server_name, inputs.server_address, inputs.site]}
    for key, value in (
        ("ui", inputs.user_identifier),
        ("rid", inputs.request_id),
        ("why", inputs.failure_reason),
        ("sc", inputs.scopes),
    ):
        if value is not None:
            extra[key] = value
    if inputs.repeats is not None:
        count, first, last = inputs.repeats
        extra["rep"] = [count, first.isoformat(), last.isoformat()]
    concerned: dict[str, None] = dict.fromkeys(inputs.patients)
    if inputs.user_reference is not None and inputs.user_reference.startswith("Patient/"):
        concerned[inputs.user_reference.removeprefix("Patient/")] = None
    row = {
        "id": new_id(),
        "recorded": _naive(inputs.recorded),
        "kind": inputs.kind,
        "interaction": inputs.interaction,
        "outcome": _CODES[inputs.outcome],
        "action": event.get("action"),
        "client": inputs.client_id,
        "user_ref": inputs.user_reference,
        "jti": inputs.token_id,
        "address": inputs.source_address,
        "entity_type": inputs.resource_type,
        "entity_id": inputs.resource_id,
        "entity_version": inputs.version,
        "patients": " ".join(inputs.patients) or None,
        "query": inputs.query,
        "extra": extra,
        "legacy_body": None,
    }
    return row, list(concerned)


_COLUMNS = [c.name for c in L.columns if c.name != "pk"]
# Built once (every read and search writes an event): no statement construction or cache key per call.
_INSERT_ONE = sa.insert(L).returning(L.c.pk)
_INSERT_MANY = sa.insert(L)
_PKS_BY_ID = sa.select(L.c.id, L.c.pk).where(L.c.id.in_(sa.bindparam("ids", expanding=True)))
_INSERT_PATIENTS = sa.insert(P)


def insert_events(conn: sa.Connection, events: Sequence[JsonDict]) -> None:
    """Append ``events`` (as the builders return them) to the audit log: one insert of their rows
    (RETURNING the keys) and one of their patients. The one place the trail is written."""
    if not events:
        return
    built = [_row(event) for event in events]
    rows = [{name: row.get(name) for name in _COLUMNS} for row, _ in built]
    if len(rows) == 1:
        pks = [conn.execute(_INSERT_ONE, rows[0]).scalar_one()]
    else:
        # One executemany, then the keys by the unique id: RETURNING in parameter order falls back to
        # an INSERT per row (no sentinel column), a statement per event of a Bundle.
        conn.execute(_INSERT_MANY, rows)
        ids = [row["id"] for row in rows]
        found = {i: pk for i, pk in conn.execute(_PKS_BY_ID, {"ids": ids})}
        pks = [found[i] for i in ids]
    patients = [
        {"patient_id": patient, "audit_pk": pk}
        for pk, (_, concerned) in zip(pks, built, strict=True)
        for patient in concerned
    ]
    if patients:
        conn.execute(_INSERT_PATIENTS, patients)


@dataclass(eq=False)
class _Handed:
    """The events of one answered read, waiting to be written (:class:`EventGroups`)."""

    events: Sequence[JsonDict]
    done: bool = False
    error: BaseException | None = None


@dataclass(eq=False)
class EventGroups:
    """The events of reads answered at the same moment, written together: the first thread to find
    no write of them under way takes everything handed in so far and inserts it with one statement
    per table (:func:`insert_events`) in a shared write transaction
    (:meth:`~fhir_norse.store.storage.Storage.write_together`); those who hand theirs in meanwhile
    wait, and the next one takes them all. :meth:`write` returns once its events are committed (or
    raises the error that stopped them: every read whose events were in the failed write fails)."""

    handed: list[_Handed] = field(default_factory=list)
    writing: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    def write(self, storage: Storage, events: Sequence[JsonDict]) -> None:
        mine = _Handed(events)
        with self.changed:
            self.handed.append(mine)
            while self.writing and not mine.done:
                self.changed.wait()
            group: list[_Handed] = []
            if not mine.done:
                self.writing = True
                group, self.handed = self.handed, []
        if group:
            self._write(storage, group)
        if mine.error is not None:
            raise mine.error

    def _write(self, storage: Storage, group: list[_Handed]) -> None:
        error: BaseException | None = RuntimeError("the audit events were not committed")
        try:
            every = [event for handed in group for event in handed.events]
            storage.write_together(lambda uow: insert_events(uow.conn, every))
            error = None
        except Exception as exc:
            error = exc
        finally:
            with self.changed:
                for handed in group:
                    handed.error, handed.done = error, True
                self.writing = False
                self.changed.notify_all()


# ------------------------------------------------------------------ rendering
def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def render_row(row: Any) -> str:
    """The stored event of one ``audit_log`` row as AuditEvent JSON text (id and meta included)."""
    legacy = _json(row.legacy_body)
    if legacy is not None:
        return orjson.dumps(legacy).decode()
    extra = _json(row.extra) or {}
    server_name, server_address, site = extra.get("srv") or ["fhir-norse", None, None]
    repeats = extra.get("rep")
    inputs = AuditInputs(
        kind=row.kind,
        outcome=_NAMES.get(row.outcome, SUCCESS),
        recorded=_aware(row.recorded),
        interaction=row.interaction,
        client_id=row.client,
        user_reference=row.user_ref,
        user_identifier=extra.get("ui"),
        token_id=row.jti,
        source_address=row.address,
        resource_type=row.entity_type,
        resource_id=row.entity_id,
        version=row.entity_version,
        query=row.query,
        request_id=extra.get("rid"),
        patients=tuple((row.patients or "").split()),
        failure_reason=extra.get("why"),
        scopes=extra.get("sc"),
        server_name=server_name,
        server_address=server_address,
        site=site,
        repeats=None
        if repeats is None
        else (
            int(repeats[0]),
            datetime.fromisoformat(repeats[1]),
            datetime.fromisoformat(repeats[2]),
        ),
    )
    body = stamp_meta(render_audit_event(inputs), row.id, 1, _naive(row.recorded))
    return orjson.dumps(body).decode()


def _stored(row: Any) -> StoredResource:
    return StoredResource(
        row.pk, "AuditEvent", row.id, 1, _naive(row.recorded), False, render_row(row), "create"
    )


def _stored_row(row: Any) -> StoredRow:
    return StoredRow(row.pk, "AuditEvent", row.id, 1, _naive(row.recorded), render_row(row))


def _in_reach(patients: frozenset[str] | None) -> ColumnElement[bool] | None:
    if patients is None:
        return None
    return L.c.pk.in_(sa.select(P.c.audit_pk).where(P.c.patient_id.in_(sorted(patients))))


def patients_of(conn: sa.Connection, pk: int) -> set[str]:
    return set(conn.execute(sa.select(P.c.patient_id).where(P.c.audit_pk == pk)).scalars())


# ------------------------------------------------------------------ read, history
def read(
    conn: sa.Connection, res_id: str, version: str | None, patients: frozenset[str] | None
) -> tuple[StoredResource, set[str]]:
    """``AuditEvent/<id>`` (``version``: ``/_history/1``): 404 when unknown, out of reach or another
    version. Returns the event and the patients it concerns (for the read's own audit)."""
    label = f"AuditEvent/{res_id}" + ("" if version is None else f"/_history/{version}")
    if version is not None and version != "1":
        raise NotFound(f"{label} is not known")
    row = conn.execute(sa.select(L).where(L.c.id == res_id)).one_or_none()
    if row is None:
        raise NotFound(f"{label} is not known")
    concerned = patients_of(conn, row.pk)
    if patients is not None and not concerned & patients:
        raise NotFound(f"{label} is not known")
    return _stored(row), concerned


def history(
    conn: sa.Connection,
    res_id: str | None,
    *,
    since: datetime | None,
    before: int | None,
    after: int | None,
    count: int,
    patients: frozenset[str] | None,
) -> tuple[list[StoredResource], bool, bool, set[str]]:
    """Events newest first (each is one version), keyset paged on the row key: the entries, whether
    older and newer ones exist, and the patients they concern."""
    where: list[ColumnElement[bool]] = []
    if res_id is not None:
        where.append(L.c.id == res_id)
    if since is not None:
        where.append(L.c.recorded >= _naive(since))
    if (reach := _in_reach(patients)) is not None:
        where.append(reach)
    if after is not None:
        rows = list(
            conn.execute(
                sa.select(L).where(*where, L.c.pk > after).order_by(L.c.pk.asc()).limit(count + 1)
            ).all()
        )
        has_newer, has_older = len(rows) > count, True
        rows = rows[:count]
        rows.reverse()
    else:
        statement = sa.select(L).where(*where)
        if before is not None:
            statement = statement.where(L.c.pk < before)
        rows = list(conn.execute(statement.order_by(L.c.pk.desc()).limit(count + 1)).all())
        has_older, has_newer = len(rows) > count, before is not None
        rows = rows[:count]
    concerned: set[str] = set()
    if rows:
        concerned = set(
            conn.execute(
                sa.select(P.c.patient_id).where(P.c.audit_pk.in_([r.pk for r in rows])).distinct()
            ).scalars()
        )
        if patients is not None:
            concerned &= patients
    return [_stored(r) for r in rows], has_older, has_newer, concerned


# ------------------------------------------------------------------ search
def _reference_ids(v: ReferenceValue, *, types: Iterable[str]) -> list[str]:
    """``Type/id`` strings a reference value names (an absolute URL: its last two segments)."""
    if v.url is not None:
        parts = v.url.rstrip("/").split("/")
        if len(parts) >= 2 and "_history" in parts:
            parts = parts[: parts.index("_history")]
        return ["/".join(parts[-2:])] if len(parts) >= 2 else []
    if v.target_id is None:
        return []
    if v.target_type is not None:
        return [f"{v.target_type}/{v.target_id}"]
    return [f"{t}/{v.target_id}" for t in types]


def _patient_ids(v: ReferenceValue) -> list[str]:
    return [
        ref.split("/", 1)[1] for ref in _reference_ids(v, types=("Patient",)) if ref.startswith("Patient/")
    ]


def _has_patient(ids: list[str]) -> ColumnElement[bool]:
    if not ids:
        return sa.false()
    return L.c.pk.in_(sa.select(P.c.audit_pk).where(P.c.patient_id.in_(ids)))


def _token(column: ColumnElement[Any], v: TokenValue, system: str | None) -> ColumnElement[bool]:
    """A token on a column whose codes all have ``system`` (None: any, the value's system ignored)."""
    if system is not None and v.system is not None and v.system != system:
        return sa.false()
    if v.no_system and system is not None:
        return sa.false()
    return column == v.code if v.code is not None else column.is_not(None)


def _type(v: TokenValue) -> ColumnElement[bool]:
    if v.code == "rest" and v.system in (None, _REST_TYPE_SYSTEM) and not v.no_system:
        return L.c.kind == REST
    if v.code == "110114" and v.system in (None, _DCM) and not v.no_system:
        return L.c.kind.in_([TOKEN_GRANT, AUTHENTICATION, AUTHORIZATION])
    return sa.false()


def _subtype(v: TokenValue) -> ColumnElement[bool]:
    code, system = v.code, v.system
    if code is None or v.no_system:
        return sa.false()
    if code == "ITI-71" and system in (None, "urn:ihe:event-type-code"):
        return L.c.kind.in_([TOKEN_GRANT, AUTHORIZATION])
    if system == STEP_SYSTEM:
        return sa.and_(L.c.kind == AUTHORIZATION, L.c.interaction == code)
    if code == "110122" and system in (None, _DCM):
        return L.c.kind == AUTHENTICATION
    alternatives: list[ColumnElement[bool]] = []
    if system in (None, _RESTFUL):
        if code == "operation":
            alternatives.append(L.c.interaction.like("operation:%"))
        else:
            alternatives.append(sa.and_(L.c.kind == REST, L.c.interaction == code))
    if system in (None, OPERATION_SYSTEM):
        alternatives.append(sa.and_(L.c.kind == REST, L.c.interaction == f"operation:{code}"))
    return sa.or_(*alternatives) if alternatives else sa.false()


def _agent(crit: Criterion, v: Any) -> ColumnElement[bool]:
    if crit.modifier == "identifier" and isinstance(v, TokenValue):
        if v.system not in (None, CLIENT_SYSTEM) or v.no_system or v.code is None:
            return sa.false()
        return L.c.client == v.code
    if isinstance(v, ReferenceValue):
        if crit.target_type is not None:
            v = replace(v, target_type=crit.target_type)
        refs = _reference_ids(v, types=_USER_TYPES)
        return L.c.user_ref.in_(refs) if refs else sa.false()
    return sa.false()


def _entity(v: Any) -> ColumnElement[bool]:
    if not isinstance(v, ReferenceValue):
        return sa.false()
    alternatives: list[ColumnElement[bool]] = []
    for ref in _reference_ids(v, types=()):
        res_type, _, res_id = ref.partition("/")
        alternatives.append(sa.and_(L.c.entity_type == res_type, L.c.entity_id == res_id))
        if res_type == "Patient":
            alternatives.append(_has_patient([res_id]))
    if v.target_type is None and v.target_id is not None and v.url is None:
        alternatives.append(L.c.entity_id == v.target_id)
    return sa.or_(*alternatives) if alternatives else sa.false()


def _value(crit: Criterion, v: Any, now: datetime) -> ColumnElement[bool] | None:
    """One value of a supported parameter as a condition (None: this form is not supported)."""
    code = crit.param.code
    if code in ("date", "_lastUpdated") and isinstance(v, DateValue) and crit.modifier is None:
        return date_match(L.c.recorded, L.c.recorded, v, now)
    if code == "_id" and isinstance(v, TokenValue | StringValue):
        text = v.code if isinstance(v, TokenValue) else v.raw
        return L.c.id == text
    if code == "patient" and isinstance(v, ReferenceValue) and crit.modifier is None:
        if crit.target_type not in (None, "Patient"):
            return sa.false()
        return _has_patient(_patient_ids(v))
    if code == "agent" and crit.modifier in (None, "identifier"):
        return _agent(crit, v)
    if code == "entity" and crit.modifier is None:
        if crit.target_type is not None and isinstance(v, ReferenceValue):
            v = replace(v, target_type=crit.target_type)
        return _entity(v)
    if code == "policy" and isinstance(v, UriValue) and crit.modifier is None:
        return L.c.jti == v.value.removeprefix(JTI_PREFIX) if v.value.startswith(JTI_PREFIX) else sa.false()
    if isinstance(v, TokenValue) and crit.modifier is None:
        if code == "type":
            return _type(v)
        if code == "subtype":
            return _subtype(v)
        if code == "action":
            return _token(L.c.action, v, "http://hl7.org/fhir/audit-event-action")
        if code == "outcome":
            return _token(L.c.outcome, v, "http://hl7.org/fhir/audit-event-outcome")
    if code == "agent-name" and isinstance(v, StringValue):
        # This server's events name no agent by ``agent.name`` (a client by identifier, a user by
        # reference, the server by ``who.display``), so nothing matches.
        return sa.false()
    if code == "address" and isinstance(v, StringValue) and crit.modifier in (None, "exact"):
        if crit.modifier == "exact":
            return L.c.address == v.raw
        return sa.func.lower(L.c.address).like(escape_like(v.raw.lower()) + "%", escape="\\")
    return None


def _conditions(request: SearchRequest, strict: bool) -> tuple[list[ColumnElement[bool]], SearchRequest]:
    """The WHERE conditions of ``request``, and the request with what it ignored (lenient mode)."""
    where: list[ColumnElement[bool]] = []
    ignored: list[str] = []
    for crit in request.criteria:
        if isinstance(crit, CompartmentCriterion):
            where.append(_has_patient(sorted(crit.patients)))
            continue
        conditions = (
            [_value(crit, v, request.now) for v in crit.values]
            if isinstance(crit, Criterion) and crit.param.code in SUPPORTED
            else [None]
        )
        if any(c is None for c in conditions):
            ignored.append(crit.name)
            continue
        where.append(sa.or_(*(c for c in conditions if c is not None)))
    if request.includes or request.revincludes:
        ignored.append("_include" if request.includes else "_revinclude")
    if len(request.sort) > 1 or any(key.param.code not in _SORTS for key in request.sort):
        ignored.append("_sort")
    if ignored and strict:
        names = ", ".join(sorted(set(ignored)))
        raise BadRequest(f"AuditEvent search does not support: {names}", code="not-supported")
    if ignored:
        bases = {name.split(":", 1)[0] for name in ignored}
        kept = tuple(p for p in request.params if p[0].split(":", 1)[0] not in bases)
        dropped = tuple(p for p in request.params if p[0].split(":", 1)[0] in bases)
        sort = request.sort if "_sort" not in bases else ()
        request = replace(
            request,
            params=kept,
            ignored=request.ignored + dropped,
            includes=(),
            revincludes=(),
            sort=sort,
        )
    return where, request


def search(conn: sa.Connection, request: SearchRequest, *, strict: bool) -> SearchPage:
    """One page of the AuditEvent search (module doc), ``request`` already restricted to the
    caller's reach (its :class:`CompartmentCriterion`)."""
    where, request = _conditions(request, strict)
    total = None
    if request.wants_total:
        total = int(conn.execute(sa.select(sa.func.count()).select_from(L).where(*where)).scalar_one())
    if not request.wants_matches:
        return SearchPage(request=request, matches=[], includes=[], total=total)
    descending = bool(request.sort) and request.sort[0].descending
    by_date = bool(request.sort)
    cursor = request.cursor
    rows, more = _fetch(conn, request, where, cursor, by_date, descending)
    next_cursor = prev_cursor = None
    if cursor is not None and cursor.direction == "prev":
        if not more:
            rows, more = _fetch(conn, request, where, None, by_date, descending)
            next_cursor = _token_of(request, rows[-1], by_date, "next") if more and rows else None
        elif rows:
            next_cursor = _token_of(request, rows[-1], by_date, "next")
            prev_cursor = _token_of(request, rows[0], by_date, "prev")
    else:
        next_cursor = _token_of(request, rows[-1], by_date, "next") if more and rows else None
        prev_cursor = _token_of(request, rows[0], by_date, "prev") if cursor is not None and rows else None
    return SearchPage(
        request=request,
        matches=[_stored_row(r) for r in rows],
        includes=[],
        next_cursor=next_cursor,
        prev_cursor=prev_cursor,
        total=total,
    )


def _fetch(
    conn: sa.Connection,
    request: SearchRequest,
    where: list[ColumnElement[bool]],
    cursor: Cursor | None,
    by_date: bool,
    descending: bool,
) -> tuple[list[Any], bool]:
    reverse = cursor is not None and cursor.direction == "prev"
    down = descending != reverse
    keys: list[ColumnElement[Any]] = [L.c.recorded, L.c.pk] if by_date else [L.c.pk]
    statement = sa.select(L).where(*where)
    if cursor is not None:
        values: list[CursorValue] = [*cursor.values, cursor.pk] if by_date else [cursor.pk]
        if by_date and not isinstance(values[0], datetime):
            raise BadRequest("Invalid paging cursor; start the search again", expression="_cursor")
        left = sa.tuple_(*keys)
        right = sa.tuple_(*(sa.literal(v, type_=k.type) for v, k in zip(values, keys, strict=True)))
        statement = statement.where(left < right if down else left > right)
    statement = statement.order_by(*(k.desc() if down else k.asc() for k in keys)).limit(request.count + 1)
    rows = list(conn.execute(statement).all())
    more = len(rows) > request.count
    rows = rows[: request.count]
    if reverse:
        rows.reverse()
    return rows, more


def _token_of(request: SearchRequest, row: Any, by_date: bool, direction: str) -> str:
    values: tuple[CursorValue, ...] = (_naive(row.recorded),) if by_date else ()
    cursor = Cursor(direction="next" if direction == "next" else "prev", values=values, pk=int(row.pk))
    return encode_cursor(cursor, request.sort_signature)
