"""Searches built from typed values, for code that searches on its own behalf (never a query string).

A :class:`Where` names a resource type and, per search parameter, what must match: a local
reference (``Patient/1``), a token (``code`` or ``(system, code)``) or a URI. :func:`to_request` turns
it into the store's :class:`~fhir_norse.store.search.request.SearchRequest` directly, with the same
value objects the parser builds from a URL, so both compare equal to what was indexed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fhir_norse.outcomes import BadRequest
from fhir_norse.store.search.params import SearchParamRegistry
from fhir_norse.store.search.request import (
    Criterion,
    ReferenceValue,
    SearchRequest,
    SearchValue,
    TokenValue,
    UriValue,
)

Token = str | tuple[str | None, str]


@dataclass(frozen=True, slots=True)
class Where:
    """Resources of ``res_type`` matching every parameter given (each value: one alternative)."""

    res_type: str
    references: Mapping[str, str] = field(default_factory=dict)
    tokens: Mapping[str, Token] = field(default_factory=dict)
    uris: Mapping[str, str] = field(default_factory=dict)


def _reference(value: str) -> ReferenceValue:
    res_type, _, res_id = value.partition("/")
    if not res_type or not res_id or "/" in res_id:
        raise BadRequest(f"'{value}' is not a local reference (Type/id)")
    return ReferenceValue(target_type=res_type, target_id=res_id)


def _token(value: Token) -> TokenValue:
    if isinstance(value, tuple):
        system, code = value
        return TokenValue(system=system, code=code)
    return TokenValue(system=None, code=value)


def to_request(where: Where, registry: SearchParamRegistry) -> SearchRequest:
    """The typed request of ``where`` (400 for a parameter the type does not define)."""
    criteria: list[Criterion] = []
    groups: tuple[tuple[Mapping[str, object], str, object], ...] = (
        (where.references, "reference", _reference),
        (where.tokens, "token", _token),
        (where.uris, "uri", UriValue),
    )
    for values, kind, build in groups:
        for name, raw in values.items():
            definition = registry.get(where.res_type, name)
            if definition is None or definition.type != kind:
                raise BadRequest(f"{where.res_type} has no {kind} search parameter '{name}'")
            value: SearchValue = build(raw)  # type: ignore[operator]
            criteria.append(Criterion(name=name, param=definition, values=(value,)))
    return SearchRequest(resource_type=where.res_type, criteria=tuple(criteria))
