"""Compile parsed search criteria and sort keys into SQLAlchemy Core expressions.

Every criterion becomes a condition on one alias of the ``resource`` table: ``pk IN
(SELECT resource_pk FROM idx_x WHERE res_type = :t AND param = :p AND <value match>)``, or
``NOT EXISTS`` for negations, so criteria compose by AND and chains reuse the same
compiler on the target's alias. Only portable Core constructs are used: the same
expressions run on SQLite and PostgreSQL. Semantics follow
https://hl7.org/fhir/R4/search.html (per parameter type) and the column meanings of
:mod:`fhir_norse.store.rows`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from fhir_norse.outcomes import BadRequest
from fhir_norse.store.rows import (
    IDENTIFIER_SUFFIX,
    identity_hash,
    reference_target_hash,
    token_code_hash,
    token_system_code_hash,
)
from fhir_norse.store.search.request import (
    AnyCriterion,
    ChainCriterion,
    CompartmentCriterion,
    CompositeValue,
    Criterion,
    DateValue,
    HasCriterion,
    MissingValue,
    NumberValue,
    QuantityValue,
    ReferenceValue,
    SearchValue,
    SortKey,
    StringValue,
    TokenValue,
    UriValue,
)
from fhir_norse.store.tables import (
    DATE_MAX,
    DATE_MIN,
    CompositeIndex,
    DateIndex,
    NumberIndex,
    ReferenceIndex,
    ResourceRow,
    StringIndex,
    TokenIndex,
    UriIndex,
)

Condition = ColumnElement[bool]

RESOURCE: sa.Table = ResourceRow.__table__  # type: ignore[attr-defined]
TOKEN: sa.Table = TokenIndex.__table__  # type: ignore[attr-defined]
STRING: sa.Table = StringIndex.__table__  # type: ignore[attr-defined]
DATE: sa.Table = DateIndex.__table__  # type: ignore[attr-defined]
NUMBER: sa.Table = NumberIndex.__table__  # type: ignore[attr-defined]
REFERENCE: sa.Table = ReferenceIndex.__table__  # type: ignore[attr-defined]
URI: sa.Table = UriIndex.__table__  # type: ignore[attr-defined]
COMPOSITE: sa.Table = CompositeIndex.__table__  # type: ignore[attr-defined]

INDEX_TABLE_BY_TYPE: dict[str, sa.Table] = {
    "token": TOKEN,
    "string": STRING,
    "date": DATE,
    "number": NUMBER,
    "quantity": NUMBER,
    "reference": REFERENCE,
    "uri": URI,
    "composite": COMPOSITE,
}

# ``ap`` on dates: the search range is widened by this share of the distance between the value
# and now, as https://hl7.org/fhir/R4/search.html#prefix recommends (10%).
DATE_AP_SHARE = 0.1
# ``ap`` on numbers: +/- 10% of the value (never narrower than the value's implicit range).
NUMBER_AP_SHARE = 0.1


def not_deleted(r: sa.FromClause) -> Condition:
    return r.c.deleted == sa.false()


def like_prefix(text: str) -> str:
    """A LIKE pattern matching strings that start with ``text`` (wildcards escaped with ``\\``)."""
    return escape_like(text) + "%"


def escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# Most hashes one IN list may carry before a compartment filter falls back to ``hash_identity``.
_MAX_HASHES = 500

# --- value matches on one index row -------------------------------------------------------------


def token_match(system: ColumnElement[Any], code: ColumnElement[Any], v: TokenValue) -> Condition:
    conds: list[Condition] = []
    if v.code is not None:
        conds.append(code == v.code)
    if v.no_system:
        conds.append(system.is_(None))
    elif v.system is not None:
        conds.append(system == v.system)
    return sa.and_(*conds)


def date_match(low: ColumnElement[Any], high: ColumnElement[Any], v: DateValue, now: datetime) -> Condition:
    """Compare an indexed range ``[low, high]`` with the search range by prefix.

    See https://hl7.org/fhir/R4/search.html#date: eq means the indexed range lies within the
    search range, ge/le are gt/lt or eq, sa/eb are strictly after/before, ap overlaps the
    search range widened by 10% of its distance from now.
    """
    slo, shi = v.low, v.high
    # ``low <= high`` always holds, so bounds on ``low`` implied by a condition are added
    # explicitly: they give the (res_type, param, low, high) index a bounded range to scan.
    within = sa.and_(low >= slo, low <= shi, high <= shi)
    match v.prefix:
        case "eq":
            return within
        case "ne":
            return sa.or_(low < slo, high > shi)
        case "gt":
            return high > shi
        case "lt":
            return low < slo
        case "ge":
            return sa.or_(high > shi, within)
        case "le":
            return sa.and_(low <= shi, sa.or_(low < slo, high <= shi))
        case "sa":
            return low > shi
        case "eb":
            return sa.and_(low < slo, high < slo)
        case "ap":
            gap = max(abs(now - slo), abs(now - shi))
            tolerance = gap * DATE_AP_SHARE
            return sa.and_(low <= _shift(shi, tolerance), high >= _shift(slo, -tolerance))
    raise AssertionError(v.prefix)


def _shift(moment: datetime, delta: timedelta) -> datetime:
    try:
        return moment + delta
    except OverflowError:
        return DATE_MAX if delta > timedelta(0) else DATE_MIN


def number_match(
    value: ColumnElement[Any], low: ColumnElement[Any], high: ColumnElement[Any], v: NumberValue
) -> Condition:
    """Compare an indexed number (with its implicit range ``[low, high]``) with the search value.

    See https://hl7.org/fhir/R4/search.html#number: eq means the indexed value lies within the
    implicit range of the search value (``100`` is [99.5, 100.5)); gt/lt/ge/le compare with the
    value as given; sa/eb compare the indexed range with the search range.
    """
    x, slo, shi = float(v.value), float(v.low), float(v.high)
    match v.prefix:
        case "eq":
            return sa.and_(value >= slo, value < shi)
        case "ne":
            return sa.or_(value < slo, value >= shi)
        case "gt":
            return value > x
        case "lt":
            return value < x
        case "ge":
            return value >= x
        case "le":
            return value <= x
        case "sa":
            return low >= shi
        case "eb":
            return high <= slo
        case "ap":
            spread = abs(x) * NUMBER_AP_SHARE
            return sa.and_(value >= min(slo, x - spread), value <= max(shi, x + spread))
    raise AssertionError(v.prefix)


def quantity_units(
    system: ColumnElement[Any], code: ColumnElement[Any], unit: ColumnElement[Any] | None, v: QuantityValue
) -> list[Condition]:
    """``|system|code`` must match both; ``||code`` matches the code or the human unit."""
    conds: list[Condition] = []
    if v.system is not None:
        conds.append(system == v.system)
        if v.code is not None:
            conds.append(code == v.code)
    elif v.code is not None:
        conds.append(sa.or_(code == v.code, unit == v.code) if unit is not None else code == v.code)
    return conds


def uri_above_candidates(value: str) -> list[str]:
    """Every ``/``-bounded prefix of ``value`` (and itself): the URIs ``:above`` matches."""
    start = value.find("://")
    start = start + 3 if start >= 0 else 0
    out = {value}
    for i in range(start, len(value)):
        if value[i] == "/":
            out.add(value[:i])
            out.add(value[: i + 1])
    return sorted(out)


def rechecked(param: str) -> bool:
    """Whether equality on ``param`` re-checks the text behind its hash: business identifiers, which
    conditional operations and de-duplication act on. Other equality searches trust the 64-bit hash (as
    HAPI does: a collision between two values of one parameter is about 1 in 10^8 among a million
    distinct values), so the narrow (hash, resource_pk) index answers them without reading the row.
    Access-control filters (the Patient compartment) always re-check."""
    return param == "identifier" or param.endswith(IDENTIFIER_SUFFIX)


def token_hash_match(
    table: sa.FromClause, res_type: str, param: str, v: TokenValue, recheck: bool = True
) -> Condition:
    """``v`` on a token table: the narrow hash index finds the rows; with ``recheck`` the text columns
    confirm them (a collision never matches). See "hash columns" in fhir_norse/store/rows.py."""
    c = table.c
    text = token_match(c.system, c.code, v)
    if v.code is None:  # ``system|``: every code of a system
        return sa.and_(c.hash_identity == identity_hash(res_type, param), text)
    if v.no_system or v.system is not None:
        hashed = c.hash_sys_code == token_system_code_hash(res_type, param, v.system, v.code)
    else:
        hashed = c.hash_code == token_code_hash(res_type, param, v.code)
    return sa.and_(hashed, text, c.res_type == res_type, c.param == param) if recheck else hashed


def _row_match(
    table: sa.FromClause, crit: Criterion, v: SearchValue, now: datetime, param: str | None = None
) -> Condition:
    """The condition one index row must meet to match value ``v`` (``param``: the indexed code, for the
    hash columns of token and reference rows)."""
    c = table.c
    code = param or crit.param.code
    if isinstance(v, TokenValue):
        return token_hash_match(table, crit.resource_type, code, v, rechecked(code))
    if isinstance(v, StringValue):
        if crit.param.type == "token":  # ``:text``
            return c.text.like(like_prefix(v.folded), escape="\\")
        if crit.modifier == "exact":
            return c.exact == v.raw
        if crit.modifier == "contains":
            return c.value.like("%" + escape_like(v.folded) + "%", escape="\\")
        return c.value.like(like_prefix(v.folded), escape="\\")
    if isinstance(v, DateValue):
        return date_match(c.low, c.high, v, now)
    if isinstance(v, QuantityValue):
        return sa.and_(
            number_match(c.value, c.low, c.high, v.number), *quantity_units(c.system, c.code, c.unit, v)
        )
    if isinstance(v, NumberValue):
        return number_match(c.value, c.low, c.high, v)
    if isinstance(v, ReferenceValue):
        return reference_match(table, v, crit.resource_type, code, rechecked(code))
    if isinstance(v, UriValue):
        if crit.modifier == "below":
            return c.value.like(like_prefix(v.value), escape="\\")
        if crit.modifier == "above":
            return c.value.in_(uri_above_candidates(v.value))
        return c.value == v.value
    if isinstance(v, CompositeValue):
        return composite_match(table, v, now)
    raise AssertionError(f"unexpected value {v!r}")


def reference_match(
    table: sa.FromClause, v: ReferenceValue, res_type: str, param: str, recheck: bool = True
) -> Condition:
    """``v`` on a reference table: local references through ``hash_target`` (of the target id; a typed
    value checks ``target_type`` on the row, ``recheck`` the id too); URLs and canonicals through the
    (``hash_identity``, ``url``) index."""
    c = table.c
    if v.url is not None:
        cond: Condition = sa.and_(c.hash_identity == identity_hash(res_type, param), c.url == v.url)
        if v.version is not None:
            cond = sa.and_(cond, c.canonical_version == v.version)
        if v.target_id is not None:
            # An absolute URL ending in Type/id may have been stored as a local reference.
            cond = sa.or_(
                cond,
                sa.and_(
                    c.hash_target == reference_target_hash(res_type, param, v.target_id),
                    c.target_id == v.target_id,
                    c.target_type == v.target_type,
                ),
            )
        return cond
    conds: list[Condition] = [c.hash_target == reference_target_hash(res_type, param, v.target_id)]
    if recheck:
        conds += [c.target_id == v.target_id, c.res_type == res_type, c.param == param]
    if v.target_type is not None:
        conds.append(c.target_type == v.target_type)
    return sa.and_(*conds)


def composite_match(table: sa.FromClause, v: CompositeValue, now: datetime) -> Condition:
    c = table.c
    first = token_match(c.c1_system, c.c1_code, v.first)
    second: Condition
    s = v.second
    if isinstance(s, TokenValue):
        second = token_match(c.c2_system, c.c2_code, s)
    elif isinstance(s, QuantityValue):
        middle = (c.c2_low + c.c2_high) / 2
        second = sa.and_(
            number_match(middle, c.c2_low, c.c2_high, s.number),
            *quantity_units(c.c2_system, c.c2_code, None, s),
        )
    elif isinstance(s, NumberValue):
        second = number_match((c.c2_low + c.c2_high) / 2, c.c2_low, c.c2_high, s)
    elif isinstance(s, DateValue):
        second = date_match(c.c2_date_low, c.c2_date_high, s, now)
    elif isinstance(s, StringValue):
        second = c.c2_string.like(like_prefix(s.folded), escape="\\")
    else:
        raise AssertionError(f"unexpected composite component {s!r}")
    return sa.and_(first, second)


# --- criteria ----------------------------------------------------------------------------------
#
# A criterion answered by index rows is a RowFilter: "some row of ``table`` for this resource
# meets ``where``". All RowFilters of one search are combined around one driving table:
#
#   r.pk IN (SELECT d.resource_pk FROM idx_a d WHERE <a> AND EXISTS (SELECT 1 FROM idx_b
#            WHERE idx_b.resource_pk = d.resource_pk AND <b>) AND ...)
#
# so both databases intersect the index rows before touching a resource row. PostgreSQL
# reorders these semi-joins by cost anyway; SQLite follows the nesting, which is why the most
# selective-looking criterion drives (see ``_rank``). Negations and ``:missing=true`` are
# anti-joins on the resource row; ``_id``/``_lastUpdated`` are resource columns.


@dataclass(frozen=True, slots=True)
class RowFilter:
    """Resources having at least one row in ``table`` that meets ``where(table or an alias)``."""

    table: sa.Table
    where: Callable[[sa.FromClause], list[Condition]]
    rank: int


# One alias per index table for the driving side, and fixed aliases for chains and _has.
# Reusing alias objects saves building their column collections on every search; nested
# scopes may repeat a name safely because driving selects never correlate (``correlate(None)``).
_DRIVER: dict[str, sa.FromClause] = {t.name: t.alias(f"d_{t.name}") for t in INDEX_TABLE_BY_TYPE.values()}
_CHAIN_REF = REFERENCE.alias("chain_ref")
_CHAIN_TARGET = RESOURCE.alias("chain_target")
_HAS_REF = REFERENCE.alias("has_ref")
_HAS_SOURCE = RESOURCE.alias("has_source")


def _compartment_filter(crit: CompartmentCriterion, r: sa.FromClause) -> RowFilter | Condition:
    """Resources whose compartment references name one of the patients (local references only)."""
    patients = sorted(crit.patients)
    if crit.resource_type == "Patient":
        return r.c.res_id.in_(patients)
    if not patients or not crit.params:
        return sa.false()

    hashes = [reference_target_hash(crit.resource_type, p, pid) for p in crit.params for pid in patients]

    def where(t: sa.FromClause) -> list[Condition]:
        return [
            t.c.hash_target.in_(hashes)
            if len(hashes) <= _MAX_HASHES
            else t.c.hash_identity.in_([identity_hash(crit.resource_type, p) for p in crit.params]),
            t.c.res_type == crit.resource_type,
            t.c.param.in_(crit.params),
            t.c.target_type == "Patient",
            t.c.target_id.in_(patients),
            t.c.url.is_(None),
        ]

    return RowFilter(REFERENCE, where, 0)


def _rank(crit: AnyCriterion) -> int:
    """How selective a criterion usually is (lower drives): only SQLite needs the hint."""
    if isinstance(crit, ChainCriterion):
        return 2
    if not isinstance(crit, Criterion):
        return 5
    kind, modifier = crit.param.type, crit.modifier
    if modifier == "missing":
        return 9
    if kind == "reference":
        return 0
    if kind == "token" and modifier is None:
        if any(isinstance(v, TokenValue) and v.code is None for v in crit.values):
            return 6  # ``system|`` matches a whole code system
        return 1 if crit.param.code == "identifier" else 3
    if (kind == "uri" and modifier is None) or (kind == "string" and modifier == "exact"):
        return 1
    if kind == "composite":
        return 3
    return 5


def compile_criterion(crit: AnyCriterion, r: sa.FromClause, now: datetime) -> RowFilter | Condition:
    """``crit`` as a RowFilter, or as a condition on ``r`` (an alias of ``resource``)."""
    if isinstance(crit, ChainCriterion):
        return _chain_filter(crit, now)
    if isinstance(crit, HasCriterion):
        return _has_condition(crit, r, now)
    if isinstance(crit, CompartmentCriterion):
        return _compartment_filter(crit, r)
    code = crit.param.code
    if code in ("_id", "_lastUpdated"):
        return _column_condition(crit, r, now)
    table = INDEX_TABLE_BY_TYPE.get(crit.param.type)
    if table is None:
        raise BadRequest(f"Search parameter '{code}' of type {crit.param.type} is not supported")
    if crit.param.type == "reference" and crit.modifier == "identifier":
        # Reference.identifier values are indexed as tokens under "<param>:identifier".
        table, code = TOKEN, code + IDENTIFIER_SUFFIX
    rtype = crit.resource_type

    hashed = table is TOKEN or table is REFERENCE

    def of_param(t: sa.FromClause, *, by_identity: bool = hashed) -> list[Condition]:
        # On the hashed tables the (type, parameter) rows are found by ``hash_identity`` unless every
        # value is looked up by a hash of its own (naming both would let a planner pick the wider one).
        identity = [t.c.hash_identity == identity_hash(rtype, code)] if by_identity else []
        return [*identity, t.c.res_type == rtype, t.c.param == code]

    # Token and reference values carry their own hash condition (token_hash_match, reference_match).
    values_hashed = hashed and all(isinstance(v, TokenValue | ReferenceValue) for v in crit.values)

    if crit.modifier == "missing":
        wanted = {v.missing for v in crit.values if isinstance(v, MissingValue)}
        if wanted == {True, False}:
            return sa.true()
        if False in wanted:
            return RowFilter(table, of_param, _rank(crit))
        return ~sa.exists().where(
            table.c.resource_pk == r.c.pk, *of_param(table, by_identity=False)
        ).correlate_except(table)

    def matching(t: sa.FromClause) -> list[Condition]:
        match = sa.or_(*(_row_match(t, crit, v, now, code) for v in crit.values))
        if crit.target_type is not None:
            match = sa.and_(t.c.target_type == crit.target_type, match)
        if values_hashed:
            return [match]  # each value's hash names the type and parameter
        return [*of_param(t, by_identity=hashed), match]

    if crit.modifier == "not":
        # Also matches resources without the element: an anti-join (NOT IN could plan as a
        # hashed subplan that degrades badly on large sets).
        return ~sa.exists().where(table.c.resource_pk == r.c.pk, *matching(table)).correlate_except(table)
    return RowFilter(table, matching, _rank(crit))


def _column_condition(crit: Criterion, r: sa.FromClause, now: datetime) -> Condition:
    """``_id`` and ``_lastUpdated`` are answered from the resource row itself."""
    if crit.modifier == "missing":
        # Every resource has an id and a lastUpdated.
        return sa.or_(
            *(sa.false() if isinstance(v, MissingValue) and v.missing else sa.true() for v in crit.values)
        )
    if crit.param.code == "_id":
        return r.c.res_id.in_([v.code for v in crit.values if isinstance(v, TokenValue)])
    return sa.or_(
        *(
            date_match(r.c.last_updated, r.c.last_updated, v, now)
            for v in crit.values
            if isinstance(v, DateValue)
        )
    )


def _chain_filter(crit: ChainCriterion, now: datetime) -> RowFilter:
    """``ref.param=value``: the reference points at a live target that matches the inner criterion.

    See https://hl7.org/fhir/R4/search.html#chaining.
    """
    target = _CHAIN_TARGET
    hops: list[tuple[str, sa.Select[Any]]] = []
    for hop in crit.hops:
        restrictions = tuple(c for c in crit.restrictions if c.resource_type == hop.resource_type)
        matching_ids = (
            sa.select(target.c.res_id)
            .where(*match_conditions(hop.resource_type, (hop, *restrictions), target, now))
            .correlate(None)
        )
        hops.append((hop.resource_type, matching_ids))

    def where(t: sa.FromClause) -> list[Condition]:
        return [
            t.c.res_type == crit.reference.resource_type,
            t.c.param == crit.reference.code,
            sa.or_(*(sa.and_(t.c.target_type == rtype, t.c.target_id.in_(ids)) for rtype, ids in hops)),
        ]

    return RowFilter(REFERENCE, where, _rank(crit))


def _has_condition(crit: HasCriterion, r: sa.FromClause, now: datetime) -> Condition:
    """``_has:Source:ref:param=value``: some live Source matching the inner criterion refers to us.

    See https://hl7.org/fhir/R4/search.html#has.
    """
    ref, source = _HAS_REF, _HAS_SOURCE
    criteria: tuple[AnyCriterion, ...] = (crit.inner,)
    if crit.restriction is not None:
        criteria += (crit.restriction,)
    referenced_ids = (
        sa.select(ref.c.target_id)
        .select_from(ref.join(source, source.c.pk == ref.c.resource_pk))
        .where(
            ref.c.res_type == crit.source_type,
            ref.c.param == crit.reference.code,
            ref.c.target_type == crit.target_type,
            *match_conditions(crit.source_type, criteria, source, now),
        )
        .correlate(None)
    )
    return r.c.res_id.in_(referenced_ids)


def match_conditions(
    resource_type: str, criteria: tuple[AnyCriterion, ...], r: sa.FromClause, now: datetime
) -> list[Condition]:
    """All conditions for live resources of ``resource_type`` (rows of ``r``) matching every criterion."""
    conditions: list[Condition] = [r.c.res_type == resource_type, not_deleted(r)]
    filters: list[RowFilter] = []
    for crit in criteria:
        compiled = compile_criterion(crit, r, now)
        if isinstance(compiled, RowFilter):
            filters.append(compiled)
        else:
            conditions.append(compiled)
    if filters:
        filters.sort(key=lambda f: f.rank)  # stable: ties keep the order of the query
        first, rest = filters[0], filters[1:]
        driver = _DRIVER[first.table.name]
        where = first.where(driver)
        for f in rest:
            t = f.table
            where.append(
                sa.exists().where(t.c.resource_pk == driver.c.resource_pk, *f.where(t)).correlate_except(t)
            )
        conditions.insert(2, r.c.pk.in_(sa.select(driver.c.resource_pk).where(*where).correlate(None)))
    return conditions


# --- sorting -----------------------------------------------------------------------------------


def sort_expression(key: SortKey, r: sa.FromClause) -> tuple[ColumnElement[Any], bool]:
    """The value a resource sorts by for ``key`` and whether it may be missing (NULL).

    Per https://hl7.org/fhir/R4/search.html#sort a resource with several values sorts by its
    lowest value ascending and its highest descending; a date range by its start ascending and
    its end descending.
    """
    code = key.param.code
    if code == "_id":
        return r.c.res_id, False
    if code == "_lastUpdated":
        return r.c.last_updated, False
    kind = key.param.type
    table = INDEX_TABLE_BY_TYPE.get(kind)
    if table is None or kind == "composite":
        raise BadRequest(f"Cannot sort by the {kind} parameter '{code}'", expression="_sort")
    column: ColumnElement[Any]
    if kind == "date":
        column = table.c.high if key.descending else table.c.low
    elif kind in ("number", "quantity", "string", "uri"):
        column = table.c.value
    elif kind == "token":
        column = table.c.code
    else:  # reference
        column = sa.func.coalesce(table.c.target_type + "/" + table.c.target_id, table.c.url)
    aggregate = sa.func.max(column) if key.descending else sa.func.min(column)
    value = sa.select(aggregate).where(table.c.resource_pk == r.c.pk, table.c.param == code).scalar_subquery()
    return value, True
