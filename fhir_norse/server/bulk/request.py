"""The kick-off request of ``$export``, checked: https://hl7.org/fhir/uv/bulkdata/STU2/export.html#bulk-data-kick-off-request.

Headers: ``Prefer: respond-async`` is required (400 without it) and ``Accept`` must allow
``application/fhir+json`` (400 when absent, 406 when it names only other formats), as the IG lets a server
answer both with an error.

Parameters (query string, or a ``Parameters`` body for POST):

* ``_outputFormat``: ``application/fhir+ndjson`` (the default), ``application/ndjson`` or ``ndjson``;
  anything else is 400;
* ``_type``: comma-separated and/or repeated resource types;
* ``_since``: an instant; a resource is exported exactly when ``_lastUpdated=gt<_since>`` would find it;
* ``_typeFilter``: comma-separated and/or repeated ``Type?query`` searches (a comma inside a query is
  an OR of values, as in search: a new filter starts only where ``Type?`` follows the comma); several
  filters of one type are alternatives (a resource matching any is exported), a type without one is not
  filtered. Result parameters (``_sort``, ``_count``, ``_include``...) are refused;
* ``patient``, ``includeAssociatedData`` and ``_elements`` are not supported, nor is any other
  parameter: 400 ``not-supported``, unless ``Prefer: handling=lenient``, which ignores them and says so
  in the job's error file (the IG's rule for unsupported parameters).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson

from fhir_norse.outcomes import BadRequest, FhirError, Forbidden, NotAcceptable
from fhir_norse.server.operations.registry import PASSED_OVER
from fhir_norse.server.search.parse import parse_search
from fhir_norse.store.resource_types import SUPPORTED_TYPE_SET
from fhir_norse.store.search.params import SearchParamRegistry
from fhir_norse.store.search.request import SearchLimits, SearchRequest

OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
NDJSON = "application/fhir+ndjson"
_ACCEPTED = frozenset({"application/fhir+json", "application/json", "application/*", "*/*"})
_UNSUPPORTED = ("patient", "includeAssociatedData", "_elements")
_SINGLE = ("_outputFormat", "_since")
# Search result parameters a _typeFilter may not carry (the IG: "SHALL NOT be used").
_RESULT_PARAMETERS = frozenset(
    {"_sort", "_count", "_include", "_revinclude", "_summary", "_elements", "_total", "_contained",
     "_containedType", "_cursor", "_format", "_pretty"}
)  # fmt: skip
# Where one _typeFilter ends and the next begins: a comma followed by ``Type?``.
_FILTER_SPLIT = re.compile(r",(?=[A-Z][A-Za-z]*\?)")


@dataclass(frozen=True, slots=True)
class Preferences:
    """What the kick-off's ``Prefer`` header asks for."""

    respond_async: bool = False
    lenient: bool = False

    @classmethod
    def parse(cls, header: str | None) -> Preferences:
        tokens = {
            t.strip().replace(" ", "").lower() for part in (header or "").split(",") for t in part.split(";")
        }
        return cls("respond-async" in tokens, "handling=lenient" in tokens)


def check_headers(headers: Mapping[str, str]) -> Preferences:
    """The kick-off's headers (module doc): 400 without ``Prefer: respond-async`` or ``Accept``, 406 for
    an ``Accept`` that does not allow ``application/fhir+json``."""
    prefer = Preferences.parse(headers.get("prefer"))
    if not prefer.respond_async:
        raise BadRequest("$export runs asynchronously: send 'Prefer: respond-async'", code="required")
    accept = headers.get("accept")
    if not accept:
        raise BadRequest("$export needs 'Accept: application/fhir+json'", code="required")
    media = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    if not media & _ACCEPTED:
        raise NotAcceptable(f"$export answers application/fhir+json, not '{accept[:100]}'")
    return prefer


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """A checked kick-off: what the job exports. Stored with the job as JSON (:meth:`to_json`)."""

    level: str  # system | patient | group
    types: tuple[str, ...]
    group_id: str | None = None
    since: str | None = None
    # Type -> the queries (after ``Type?``) of its filters; a resource matching any of them is exported.
    type_filters: dict[str, list[str]] = field(default_factory=dict)
    # Parse filters strictly (unknown search parameters are 400), as search does without handling=lenient.
    strict: bool = True
    # Why parts of the request were ignored (handling=lenient): written to the job's error file.
    warnings: tuple[str, ...] = ()

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_json(cls, text: str) -> ExportRequest:
        data: dict[str, Any] = orjson.loads(text)
        return cls(
            level=data["level"],
            types=tuple(data["types"]),
            group_id=data.get("group_id"),
            since=data.get("since"),
            type_filters={k: list(v) for k, v in (data.get("type_filters") or {}).items()},
            strict=bool(data.get("strict", True)),
            warnings=tuple(data.get("warnings") or ()),
        )


@dataclass(slots=True)
class KickOffParameters:
    """The parameters as given, before the caller's scopes decide the types (:func:`parse_parameters`)."""

    types: list[str] | None = None
    since: str | None = None
    filters: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parse_parameters(pairs: Iterable[tuple[str, str]], *, lenient: bool) -> KickOffParameters:
    """The kick-off's parameters (module doc); unsupported ones are 400 unless ``lenient``."""
    out = KickOffParameters()
    seen: set[str] = set()
    for name, value in pairs:
        if name in _SINGLE and name in seen:
            raise BadRequest(f"$export parameter '{name}' is given more than once")
        seen.add(name)
        if name == "_outputFormat":
            if value.strip() not in OUTPUT_FORMATS:
                raise BadRequest(
                    f"_outputFormat '{value}' is not supported; use {NDJSON} (or application/ndjson, ndjson)",
                    code="not-supported",
                )
        elif name == "_type":
            out.types = (out.types or []) + [t.strip() for t in value.split(",") if t.strip()]
            if not out.types:
                raise BadRequest("_type names no resource type")
        elif name == "_since":
            out.since = value.strip()
        elif name == "_typeFilter":
            out.filters += [f.strip() for f in _FILTER_SPLIT.split(value) if f.strip()]
        elif name in PASSED_OVER:
            continue
        else:
            known = name in _UNSUPPORTED
            message = (
                f"$export parameter '{name}' is not supported by this server"
                if known
                else f"Unknown $export parameter '{name}'"
            )
            if not lenient:
                raise BadRequest(message, code="not-supported")
            out.warnings.append(f"{message}: ignored (Prefer: handling=lenient)")
    return out


def check_since(since: str, registry: SearchParamRegistry) -> None:
    """400 unless ``_since`` is a value ``_lastUpdated=gt`` accepts."""
    try:
        parse_search("Patient", [("_lastUpdated", f"gt{since}")], strict=True, registry=registry)
    except BadRequest as error:
        raise BadRequest(f"_since '{since}' is not a FHIR instant ({error.message})") from None


def split_filter(text: str) -> tuple[str, str]:
    """``Type?query`` as (type, query); 400 when it is not one."""
    res_type, mark, query = text.partition("?")
    if not mark or res_type not in SUPPORTED_TYPE_SET or not query:
        raise BadRequest(f"_typeFilter '{text[:200]}' is not 'Type?search-parameters' of a supported type")
    return res_type, query


def filter_request(
    res_type: str, query: str, *, strict: bool, registry: SearchParamRegistry, limits: SearchLimits
) -> SearchRequest:
    """The search a ``_typeFilter`` stands for, parsed as ``GET [type]?query`` would be (400 for a result
    parameter, or for what that search refuses)."""
    params = parse_qsl(query, keep_blank_values=True)
    for name, _value in params:
        if name.split(":", 1)[0] in _RESULT_PARAMETERS:
            raise BadRequest(f"_typeFilter '{res_type}?{query[:200]}': '{name}' is not allowed in a filter")
    return parse_search(res_type, params, strict=strict, registry=registry, limits=limits)


def choose_types(
    requested: Sequence[str] | None,
    candidates: Sequence[str],
    allowed: frozenset[str],
    *,
    lenient: bool,
    warnings: list[str],
) -> tuple[str, ...]:
    """The types exported: those ``requested`` (else every candidate the caller may read), each one a
    candidate of the level (400 otherwise) that the caller's scopes allow reading (403 otherwise); with
    ``lenient`` those refused are left out with a warning instead."""
    if requested is None:
        return tuple(t for t in candidates if t in allowed)
    chosen: list[str] = []
    for res_type in dict.fromkeys(requested):
        error: FhirError | None = None
        if res_type not in candidates:
            error = BadRequest(
                f"_type '{res_type}' is not exported at this level by this server", code="not-supported"
            )
        elif res_type not in allowed:
            error = Forbidden(f"The access token's scopes do not allow reading {res_type}")
        if error is None:
            chosen.append(res_type)
        elif lenient:
            warnings.append(f"{error.message}: left out (Prefer: handling=lenient)")
        else:
            raise error
    return tuple(chosen)
