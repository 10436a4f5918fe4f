"""A parsed FHIR search as typed values: what the store's search SQL takes.

Built by the server's parser (:mod:`fhir_norse.server.search.parse`) from the request's
parameters, or by domain code directly; run by :mod:`fhir_norse.store.search.engine`.
See https://hl7.org/fhir/R4/search.html.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

from fhir_norse.store.search.cursor import Cursor
from fhir_norse.store.search.params import SearchParamDef
from fhir_norse.store.search.values import utc_now

Prefix = Literal["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"]
DEFAULT_COUNT = 50


# --- values -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenValue:
    """``code``, ``system|code``, ``|code`` (``no_system``) or ``system|`` (``code`` None)."""

    system: str | None
    code: str | None
    no_system: bool = False


@dataclass(frozen=True, slots=True)
class StringValue:
    """A string value (also the ``:text`` of a token): as given and folded for comparison."""

    raw: str
    folded: str


@dataclass(frozen=True, slots=True)
class DateValue:
    """A date with its prefix and implicit range (naive UTC, inclusive bounds)."""

    prefix: Prefix
    raw: str
    low: datetime
    high: datetime


@dataclass(frozen=True, slots=True)
class NumberValue:
    """A number with its prefix and implicit range ``[low, high)`` from its significant figures."""

    prefix: Prefix
    raw: str
    value: Decimal
    low: Decimal
    high: Decimal


@dataclass(frozen=True, slots=True)
class QuantityValue:
    """``[prefix]number[|system|code]``; with an empty system the code also matches the unit."""

    number: NumberValue
    system: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    """A local reference (type and/or id) or an absolute URL / canonical (with ``|version``)."""

    target_type: str | None = None
    target_id: str | None = None
    url: str | None = None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class UriValue:
    value: str


@dataclass(frozen=True, slots=True)
class MissingValue:
    """The value of ``:missing``: true selects resources without the element."""

    missing: bool


@dataclass(frozen=True, slots=True)
class CompositeValue:
    """``first$second``: the first component is a token, the second has ``second_type``."""

    first: TokenValue
    second_type: str
    second: TokenValue | StringValue | DateValue | QuantityValue | NumberValue | UriValue


SearchValue = (
    TokenValue
    | StringValue
    | DateValue
    | NumberValue
    | QuantityValue
    | ReferenceValue
    | UriValue
    | MissingValue
    | CompositeValue
)


# --- criteria -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Criterion:
    """One parameter of the search: its values are OR-ed; separate criteria are AND-ed.

    ``modifier`` is the modifier without its colon; a reference ``:Type`` modifier is kept as
    ``target_type`` instead.
    """

    name: str
    param: SearchParamDef
    values: tuple[SearchValue, ...]
    modifier: str | None = None
    target_type: str | None = None

    @property
    def resource_type(self) -> str:
        return self.param.resource_type


@dataclass(frozen=True, slots=True)
class ChainCriterion:
    """``reference.param=value``: one hop per target type that defines the chained parameter.

    See https://hl7.org/fhir/R4/search.html#chaining.
    """

    name: str
    reference: SearchParamDef
    hops: tuple[Criterion, ...]
    # Added by the server for ``patient/`` and ``user/`` access: the compartment a hop's target must be
    # in (one per restricted target type), so a chain sees only what the caller may search.
    restrictions: tuple[CompartmentCriterion, ...] = ()


@dataclass(frozen=True, slots=True)
class HasCriterion:
    """``_has:Source:reference:param=value``: resources referenced by matching sources.

    See https://hl7.org/fhir/R4/search.html#has.
    """

    name: str
    reference: SearchParamDef
    inner: Criterion
    # The type searched for, which the source's reference must point at.
    target_type: str
    # Added by the server for ``patient/`` and ``user/`` access: the compartment the sources must be in,
    # so ``_has`` sees only what the caller may search.
    restriction: CompartmentCriterion | None = None

    @property
    def source_type(self) -> str:
        return self.reference.resource_type


@dataclass(frozen=True, slots=True)
class CompartmentCriterion:
    """Only resources in the Patient compartment of one of ``patients``, through ``params``.

    Added by the server for ``patient/`` and ``user/`` access, never parsed from a query.
    See https://hl7.org/fhir/R4/compartmentdefinition-patient.html.
    """

    resource_type: str
    params: tuple[str, ...]
    patients: frozenset[str]


AnyCriterion = Criterion | ChainCriterion | HasCriterion | CompartmentCriterion


# --- result parameters --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SortKey:
    """One ``_sort`` key. See https://hl7.org/fhir/R4/search.html#sort."""

    param: SearchParamDef
    descending: bool = False

    @property
    def text(self) -> str:
        return ("-" if self.descending else "") + self.param.code


@dataclass(frozen=True, slots=True)
class IncludeSpec:
    """One ``_include`` or ``_revinclude``: ``Source:param[:Target]`` (``params`` resolved).

    ``params`` holds the reference parameters of ``source_type`` to follow (all of them for
    ``*``). See https://hl7.org/fhir/R4/search.html#include.
    """

    source_type: str
    params: tuple[SearchParamDef, ...]
    target_type: str | None = None
    iterate: bool = False
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """A parsed search: what to match, how to order and page it, and what to add."""

    resource_type: str
    criteria: tuple[AnyCriterion, ...] = ()
    sort: tuple[SortKey, ...] = ()
    count: int = DEFAULT_COUNT
    summary: str | None = None
    elements: tuple[str, ...] = ()
    includes: tuple[IncludeSpec, ...] = ()
    revincludes: tuple[IncludeSpec, ...] = ()
    total: str = "none"
    cursor: Cursor | None = None
    # The raw ``_cursor`` token, for the self link of a page.
    cursor_token: str | None = None
    # Parameters that were not understood (lenient mode), as given: a self link omits them.
    ignored: tuple[tuple[str, str], ...] = ()
    # The parameters that were understood, as given and in order, without ``_cursor``.
    params: tuple[tuple[str, str], ...] = ()
    # The instant ``ap`` tolerances are measured from.
    now: datetime = field(default_factory=utc_now)

    @property
    def wants_total(self) -> bool:
        return self.total == "accurate" or self.summary == "count" or self.count == 0

    @property
    def wants_matches(self) -> bool:
        return self.summary != "count" and self.count > 0

    @property
    def sort_signature(self) -> str:
        """Identifies the order a cursor was made for, so a cursor of another search is refused."""
        return self.resource_type + "?" + ",".join(k.text for k in self.sort)

    @property
    def criteria_key(self) -> str:
        """What the request matches, in a normal form: equal for every way of writing the same
        criteria (percent-encoding, parameter order, order of OR values, spelling of a value that
        parses to the same range), so writers that must not race on equal criteria (conditional
        create, update and delete) can lock on it. Parameter names and raw values are left out;
        parsed values, modifiers and the parameters' definitions stay in."""
        text = repr((self.resource_type, _normal(self.criteria)))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SearchLimits:
    """Bounds on one search (README, "Limits"): past a count the search is refused before it runs
    (400 ``too-costly``), and the database stops it after ``timeout_seconds``."""

    # name=value pairs in the query (criteria and result parameters alike).
    max_parameters: int = 50
    # Values of all criteria together (each comma-separated alternative counts).
    max_values: int = 200
    timeout_seconds: float = 10.0


# Fields that only say how a criterion was written, not what it matches.
_UNKEYED_FIELDS = frozenset({"name", "raw"})


def _normal(value: object) -> object:
    """A value of a parsed request as plain nested tuples, collections in sorted order (criteria
    are AND-ed and values OR-ed: their order means nothing)."""
    if isinstance(value, SearchParamDef):
        return (value.resource_type, value.code)
    if is_dataclass(value) and not isinstance(value, type):
        kept = (f.name for f in fields(value) if f.name not in _UNKEYED_FIELDS)
        return (type(value).__name__, *(_normal(getattr(value, name)) for name in kept))
    if isinstance(value, (tuple, list, set, frozenset)):
        return tuple(sorted((_normal(item) for item in value), key=repr))
    return value
