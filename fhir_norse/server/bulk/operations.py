"""The ``$export`` kick-off operations of Bulk Data Access 2.0:
https://hl7.org/fhir/uv/bulkdata/STU2/export.html.

* ``GET|POST [base]/$export`` (OperationDefinition ``export``): every resource of the types;
* ``GET|POST [base]/Patient/$export`` (``patient-export``): the Patient compartments of all patients;
* ``GET|POST [base]/Group/[id]/$export`` (``group-export``): the Patient compartments of the Group's
  members (:mod:`.exporter` says exactly what each exports).

**Access.** Bulk export is for backend services (SMART ``system/`` scopes): a type is exported only where
the token's scopes allow reading and searching it with system access; a ``patient/`` or ``user/`` token
gets 403, and so does a ``_type`` the scopes do not allow (left out with a warning under
``Prefer: handling=lenient``). AuditEvent is not exported (the audit trail is searched, not exported), nor,
at the patient and group levels, Binary (its patient is named by ``securityContext``, which no search
index holds).

**Answer.** 202 with ``Content-Location``: the status URL (:mod:`fhir_norse.api.bulk_routes`), where the
client that started the job (the token's ``client_id``) polls, then downloads. The job row is written in
the kick-off's transaction with its AuditEvent (``operation:export``; a refused kick-off is recorded as
refused).
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from urllib.parse import urlencode

from fhir_norse.auth.compartment import membership_params, searchable
from fhir_norse.outcomes import BadRequest, Forbidden, NotFound, information
from fhir_norse.server.bulk.jobs import JobStore, new_job_id, utc_now
from fhir_norse.server.bulk.request import (
    ExportRequest,
    check_headers,
    check_since,
    choose_types,
    filter_request,
    parse_parameters,
    split_filter,
)
from fhir_norse.server.context import Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.operations.registry import Operation, OperationCall
from fhir_norse.server.repository import Repository
from fhir_norse.server.resources import check_id
from fhir_norse.store.resource_types import SUPPORTED_TYPES

INTERACTION = "operation:export"
_IG = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/"
EXPORT_DEFINITION = _IG + "export"
PATIENT_EXPORT_DEFINITION = _IG + "patient-export"
GROUP_EXPORT_DEFINITION = _IG + "group-export"
STATUS_PATH = "$export-status"
FILE_PATH = "$export-file"


@cache
def candidate_types(level: str) -> tuple[str, ...]:
    """The types an export of ``level`` may hold (module doc)."""
    stored = [t for t in SUPPORTED_TYPES if t != "AuditEvent"]
    if level == "system":
        return tuple(stored)
    return tuple(t for t in stored if membership_params(t) and searchable(t))


def _readable(repo: Repository, types: tuple[str, ...]) -> frozenset[str]:
    """The types the caller may read and search with system access (not through a compartment)."""
    out: set[str] = set()
    for res_type in types:
        try:
            if not any(repo.grant(i, res_type).restricted for i in ("read", "search-type")):
                out.add(res_type)
        except Forbidden:
            continue
    return frozenset(out)


def kick_off(service: FhirService, call: OperationCall, level: str) -> Result:
    """The kick-off request of ``level`` (module doc)."""
    ctx = call.ctx
    res_type = call.res_type or None
    path = "/".join(p for p in (call.res_type, call.res_id) if p) + ("/" if call.res_type else "") + "$export"
    query = path + (f"?{urlencode(call.params)}" if call.params else "")
    # The manifest's ``request``: the kick-off URL, with the parameters of a GET (a POST's are in its body).
    request_url = f"{ctx.base_url}/{query if call.body is None else path}"
    job_id = new_job_id()
    with service.audited_session(ctx, INTERACTION, res_type, call.res_id, query) as repo:
        prefer = check_headers(call.headers)
        raw = parse_parameters(call.all_params(), lenient=prefer.lenient)
        candidates = candidate_types(level)
        allowed = _readable(repo, candidates)
        if level == "group":
            assert call.res_id is not None
            check_id(call.res_id)
            if "Group" not in _readable(repo, ("Group",)):
                raise Forbidden("Group-level $export needs system scopes that allow reading Group")
            stored = repo.uow.current("Group", call.res_id)
            if stored is None or stored.deleted:
                raise NotFound(f"Group/{call.res_id} is not known")
        if not allowed:
            raise Forbidden(
                "$export needs SMART backend-services (system/) scopes allowing to read at least one "
                "resource type exported at this level"
            )
        warnings = list(raw.warnings)
        types = choose_types(raw.types, candidates, allowed, lenient=prefer.lenient, warnings=warnings)
        registry, limits = service.kernel.registry, service.kernel.search_limits
        if raw.since is not None:
            check_since(raw.since, registry)
        filters: dict[str, list[str]] = {}
        for text in raw.filters:
            filter_type, filter_query = split_filter(text)
            if filter_type not in types:
                message = f"_typeFilter '{text[:200]}' names a type this export does not hold"
                if not prefer.lenient:
                    raise BadRequest(message)
                warnings.append(f"{message}: ignored (Prefer: handling=lenient)")
                continue
            search = filter_request(
                filter_type, filter_query, strict=not prefer.lenient, registry=registry, limits=limits
            )
            for name, _value in search.ignored:
                warnings.append(f"_typeFilter '{text[:200]}': unknown parameter '{name}' ignored")
            filters.setdefault(filter_type, []).append(filter_query)
        request = ExportRequest(
            level=level,
            types=types,
            group_id=call.res_id if level == "group" else None,
            since=raw.since,
            type_filters=filters,
            strict=not prefer.lenient,
            warnings=tuple(warnings),
        )
        now: datetime = utc_now()
        JobStore.insert(
            repo.uow.conn,
            job_id=job_id,
            client_id=ctx.caller.client_id,
            request=request,
            request_url=request_url,
            base_url=ctx.base_url,
            now=now,
        )
        repo.audit(INTERACTION, res_type, call.res_id, query=query)
    status_url = f"{ctx.base_url}/{STATUS_PATH}/{job_id}"
    return Result(
        202,
        body=information(f"Export queued: poll {status_url} for its status"),
        headers={"Content-Location": status_url},
    )


def operations() -> list[Operation]:
    """The three kick-off operations, for the server's operation registry."""
    documentation = (
        "Bulk Data Access 2.0 kick-off (Prefer: respond-async): _outputFormat (ndjson), _type, _since, "
        "_typeFilter; system scopes only. 202 with Content-Location: the status URL."
    )
    return [
        Operation(
            name="export",
            definition=EXPORT_DEFINITION,
            types=(),
            handler=lambda service, call: kick_off(service, call, "system"),
            type_level=False,
            idempotent=True,
            documentation=documentation,
            system_level=True,
        ),
        Operation(
            name="export",
            definition=PATIENT_EXPORT_DEFINITION,
            types=("Patient",),
            handler=lambda service, call: kick_off(service, call, "patient"),
            idempotent=True,
            documentation=documentation,
        ),
        Operation(
            name="export",
            definition=GROUP_EXPORT_DEFINITION,
            types=("Group",),
            handler=lambda service, call: kick_off(service, call, "group"),
            type_level=False,
            instance_level=True,
            idempotent=True,
            documentation=documentation,
        ),
    ]
