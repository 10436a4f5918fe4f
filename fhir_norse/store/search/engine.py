"""Run a parsed search against the resource and index tables: matches, paging, includes, totals.

Implements the result side of https://hl7.org/fhir/R4/search.html: sorting (``_sort``),
keyset paging (opaque ``_cursor`` links, https://hl7.org/fhir/R4/http.html#paging),
``_include``/``_revinclude`` (one ``:iterate`` level) and ``_total``. Bodies are returned as
the stored JSON text so the caller can splice them into a Bundle without re-parsing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from fhir_norse.store.resource_types import SUPPORTED_TYPE_SET
from fhir_norse.store.search.cursor import Cursor, CursorValue, encode_cursor
from fhir_norse.store.search.params import default_registry
from fhir_norse.store.search.request import AnyCriterion, IncludeSpec, SearchRequest
from fhir_norse.store.search.sql import (
    REFERENCE,
    RESOURCE,
    TOKEN,
    URI,
    Condition,
    match_conditions,
    not_deleted,
    sort_expression,
)

# Rows added by _include/_revinclude per search; beyond it the page says it was truncated.
INCLUDE_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A current resource version as stored: ``body_text`` is the stored JSON, not re-serialised."""

    pk: int
    res_type: str
    res_id: str
    version: int
    last_updated: datetime
    body_text: str


@dataclass(frozen=True, slots=True)
class SearchPage:
    """One page of search results plus what ``_include``/``_revinclude`` added."""

    request: SearchRequest
    matches: list[StoredRow]
    includes: list[StoredRow]
    next_cursor: str | None = None
    prev_cursor: str | None = None
    total: int | None = None
    includes_truncated: bool = False


@dataclass(frozen=True, slots=True)
class _Term:
    """One ORDER BY term: a column of the ranked subquery, its direction and whether it can be NULL."""

    name: str
    descending: bool
    nullable: bool

    def order(self, column: ColumnElement[Any], reverse: bool) -> ColumnElement[Any]:
        descending = self.descending != reverse
        clause = column.desc() if descending else column.asc()
        if not self.nullable:
            return clause
        # Missing values sort last in both directions (first when walking backwards).
        return clause.nulls_first() if reverse else clause.nulls_last()

    def after(self, column: ColumnElement[Any], value: CursorValue, reverse: bool) -> Condition:
        """Rows strictly after ``value`` in this term's order (reversed: strictly before)."""
        descending = self.descending != reverse
        nulls_last = not reverse
        if value is None:
            return sa.false() if nulls_last else column.is_not(None)
        beyond = column < value if descending else column > value
        if self.nullable and nulls_last:
            return sa.or_(beyond, column.is_(None))
        return beyond

    def equal(self, column: ColumnElement[Any], value: CursorValue) -> Condition:
        return column.is_(None) if value is None else column == value


def _row(mapping: sa.RowMapping) -> StoredRow:
    return StoredRow(
        pk=mapping["pk"],
        res_type=mapping["res_type"],
        res_id=mapping["res_id"],
        version=mapping["version"],
        last_updated=mapping["last_updated"],
        body_text=mapping["body_text"],
    )


def _stored_columns(res: sa.FromClause) -> list[ColumnElement[Any]]:
    return [
        res.c.pk,
        res.c.res_type,
        res.c.res_id,
        res.c.version,
        res.c.last_updated,
        sa.cast(res.c.body, sa.Text).label("body_text"),
    ]


def _keyset(
    terms: Sequence[_Term],
    columns: Sequence[ColumnElement[Any]],
    values: Sequence[CursorValue],
    reverse: bool,
) -> Condition:
    """Rows strictly after the cursor position in the (possibly reversed) order."""
    if all(not t.nullable for t in terms) and len({t.descending for t in terms}) == 1:
        # One direction and no NULLs: a row-value comparison, which both databases can turn
        # into an index range instead of scanning from the start.
        left = sa.tuple_(*columns)
        right = sa.tuple_(*(sa.literal(v, type_=c.type) for v, c in zip(values, columns, strict=True)))
        return left < right if terms[0].descending != reverse else left > right
    alternatives: list[Condition] = []
    for i, term in enumerate(terms):
        prefix = [terms[j].equal(columns[j], values[j]) for j in range(i)]
        alternatives.append(sa.and_(*prefix, term.after(columns[i], values[i], reverse)))
    return sa.or_(*alternatives)


# Fixed aliases: building an alias's column collection on every search costs more than the SQL.
_R = RESOURCE.alias("r")
_RES = RESOURCE.alias("res")


def _page_select(req: SearchRequest, cursor: Cursor | None) -> tuple[sa.Select[Any], list[_Term]]:
    """pks and sort-key values (``k0``, ``k1``, ..., ``pk``) of one page plus one row, in walking order."""
    r = _R
    columns: list[ColumnElement[Any]] = []
    expressions: list[ColumnElement[Any]] = []
    terms: list[_Term] = []
    computed = False
    for i, key in enumerate(req.sort):
        expression, nullable = sort_expression(key, r)
        computed = computed or nullable
        expressions.append(expression)
        columns.append(expression.label(f"k{i}"))
        terms.append(_Term(f"k{i}", key.descending, nullable))
    # pk breaks ties; it follows the last key's direction so an index on (..., key, pk) serves both.
    terms.append(_Term("pk", terms[-1].descending if terms else False, False))
    expressions.append(r.c.pk)
    columns.append(r.c.pk.label("pk"))
    where = match_conditions(req.resource_type, req.criteria, r, req.now)
    reverse = cursor is not None and cursor.direction == "prev"
    page: sa.Select[Any]
    order_columns: Sequence[ColumnElement[Any]]
    if cursor is not None and computed:
        # A fence (OFFSET 0), so that each correlated sort-key subquery is evaluated once per
        # row rather than again in the keyset filter.
        ranked = sa.select(*columns).where(*where).offset(0).subquery("m")
        order_columns = [ranked.c[t.name] for t in terms]
        page = sa.select(*order_columns).where(
            _keyset(terms, order_columns, (*cursor.values, cursor.pk), reverse)
        )
    else:
        page = sa.select(*columns).where(*where)
        if cursor is not None:
            page = page.where(_keyset(terms, expressions, (*cursor.values, cursor.pk), reverse))
        # Order by the select-list labels, so each key is computed once per row.
        order_columns = columns
    page = page.order_by(*(t.order(c, reverse) for t, c in zip(terms, order_columns, strict=True)))
    return page.limit(req.count + 1), terms


def _fetch_page(
    conn: sa.Connection, req: SearchRequest, cursor: Cursor | None
) -> tuple[list[StoredRow], list[tuple[CursorValue, ...]], bool]:
    """Rows of one page in display order, their sort-key values (pk last), and whether more exist
    beyond the page in the direction walked."""
    page, terms = _page_select(req, cursor)
    reverse = cursor is not None and cursor.direction == "prev"
    page_sq = page.subquery("page")
    res = _RES
    # The bodies are read only for the rows of the page, after sorting and limiting.
    statement = (
        sa.select(*_stored_columns(res), *(page_sq.c[t.name].label(f"sort_{t.name}") for t in terms))
        .select_from(page_sq.join(res, res.c.pk == page_sq.c.pk))
        .order_by(*(t.order(page_sq.c[t.name], reverse) for t in terms))
    )
    result = conn.execute(statement).mappings().all()
    more = len(result) > req.count
    result = result[: req.count]
    if reverse:
        result = list(reversed(result))
    rows = [_row(m) for m in result]
    keys = [tuple(m[f"sort_{t.name}"] for t in terms) for m in result]
    return rows, keys, more


def find_versions(conn: sa.Connection, request: SearchRequest, limit: int) -> list[tuple[int, str, int]]:
    """(pk, id, version) of the current resources matching a query, without their bodies: for a
    caller that keeps what it derived from each stored version and reads only the bodies it lacks
    (:func:`bodies`)."""
    req = replace(request, sort=(), cursor=None, count=max(0, limit))
    if limit <= 0:
        return []
    page, _ = _page_select(req, None)
    page_sq = page.subquery("page")
    res = _RES
    statement = sa.select(res.c.pk, res.c.res_id, res.c.version).select_from(
        page_sq.join(res, res.c.pk == page_sq.c.pk)
    )
    return [(int(pk), str(rid), int(version)) for pk, rid, version in conn.execute(statement).all()][:limit]


def bodies(conn: sa.Connection, pks: Sequence[int]) -> dict[int, str]:
    """The stored JSON text of the given resource rows (see :func:`find_versions`)."""
    res = _RES
    out: dict[int, str] = {}
    for start in range(0, len(pks), 500):
        chunk = list(pks[start : start + 500])
        statement = sa.select(res.c.pk, sa.cast(res.c.body, sa.Text)).where(res.c.pk.in_(chunk))
        out.update({int(pk): str(text) for pk, text in conn.execute(statement).all()})
    return out


def count_matches(conn: sa.Connection, req: SearchRequest) -> int:
    """The number of resources matching the criteria (``_total=accurate``)."""
    r = _R
    statement = (
        sa.select(sa.func.count())
        .select_from(r)
        .where(*match_conditions(req.resource_type, req.criteria, r, req.now))
    )
    return int(conn.execute(statement).scalar_one())


def _cursor_token(req: SearchRequest, key: tuple[CursorValue, ...], direction: str) -> str:
    pk = key[-1]
    assert isinstance(pk, int)
    cursor = Cursor(direction="next" if direction == "next" else "prev", values=key[:-1], pk=pk)
    return encode_cursor(cursor, req.sort_signature)


def execute_search(conn: sa.Connection, req: SearchRequest) -> SearchPage:
    """Run ``req``: one page of matches in sort order, cursors for the neighbouring pages,
    the included resources, and the total when asked for.

    Paging is by keyset: the next page holds the rows strictly after the last row of this one
    in the sort order, so rows that exist throughout are neither skipped nor repeated while
    others are created or deleted between requests.
    """
    total = count_matches(conn, req) if req.wants_total else None
    if not req.wants_matches:
        return SearchPage(request=req, matches=[], includes=[], total=total)
    cursor = req.cursor
    rows, keys, more = _fetch_page(conn, req, cursor)
    next_cursor: str | None = None
    prev_cursor: str | None = None
    if cursor is not None and cursor.direction == "prev":
        if not more:
            # Walked back to the start: serve a full first page rather than a short one.
            rows, keys, more = _fetch_page(conn, req, None)
            next_cursor = _cursor_token(req, keys[-1], "next") if more else None
        else:
            next_cursor = _cursor_token(req, keys[-1], "next") if keys else None
            prev_cursor = _cursor_token(req, keys[0], "prev") if keys else None
    else:
        next_cursor = _cursor_token(req, keys[-1], "next") if more and keys else None
        prev_cursor = _cursor_token(req, keys[0], "prev") if cursor is not None and keys else None
    includes, truncated = _includes(conn, req, rows)
    return SearchPage(
        request=req,
        matches=rows,
        includes=includes,
        next_cursor=next_cursor,
        prev_cursor=prev_cursor,
        total=total,
        includes_truncated=truncated,
    )


def find_matching(
    conn: sa.Connection, request: SearchRequest, limit: int, *, extra: tuple[AnyCriterion, ...] = ()
) -> list[StoredRow]:
    """Resources matching a conditional create/update/delete query (strict parsing, no paging).

    See https://hl7.org/fhir/R4/http.html#ccreate. Callers usually pass ``limit=2`` to tell
    "none", "one" and "several" apart. ``extra`` criteria (a compartment) are added by the server.
    """
    req = replace(request, criteria=request.criteria + extra, sort=(), cursor=None, count=max(0, limit))
    if limit <= 0:
        return []
    rows, _, _ = _fetch_page(conn, req, None)
    return rows[:limit]


# --- _include / _revinclude ----------------------------------------------------------------------
#
# Each specification is one query returning the stored rows it adds (deduplicated by pk in
# Python). Canonical references (``QuestionnaireResponse.questionnaire``) name their target by
# its ``url`` search parameter instead of type and id; that branch is only added for target
# types that have a ``url`` parameter, so ordinary references cost no extra scan.

_INC_REF = REFERENCE.alias("inc_ref")
_INC_URI = URI.alias("inc_uri")
_INC_VERSION = TOKEN.alias("inc_version")
_INC_RES = RESOURCE.alias("inc")


def _has_url_param(resource_type: str) -> bool:
    definition = default_registry().get(resource_type, "url")
    return definition is not None and definition.type == "uri"


def _target_types(spec: IncludeSpec) -> list[str]:
    if spec.target_type is not None:
        return [spec.target_type]
    types: set[str] = set()
    for param in spec.params:
        types.update(param.targets)
    return sorted(types & SUPPORTED_TYPE_SET)


def _stored_select(res: sa.FromClause, *where: Condition) -> sa.Select[Any]:
    return sa.select(*_stored_columns(res)).where(not_deleted(res), *where)


def _forward(conn: sa.Connection, spec: IncludeSpec, sources: list[StoredRow], limit: int) -> list[StoredRow]:
    """The live resources the sources' references (``spec.params``) point at."""
    source_pks = [s.pk for s in sources if s.res_type == spec.source_type]
    if not source_pks or not spec.params:
        return []
    codes = [p.code for p in spec.params]
    ref, res = _INC_REF, _INC_RES
    from_sources: list[Condition] = [ref.c.resource_pk.in_(source_pks), ref.c.param.in_(codes)]
    if spec.target_type is not None:
        from_sources.append(ref.c.target_type == spec.target_type)
    local_targets = sa.select(ref.c.target_type, ref.c.target_id).where(*from_sources).correlate(None)
    statement: sa.Select[Any] | sa.CompoundSelect[Any] = _stored_select(
        res, sa.tuple_(res.c.res_type, res.c.res_id).in_(local_targets)
    )
    canonical_types = [t for t in _target_types(spec) if _has_url_param(t)]
    if canonical_types:
        uri, version = _INC_URI, _INC_VERSION
        version_matches = sa.or_(
            ref.c.canonical_version.is_(None),
            sa.exists()
            .where(
                version.c.resource_pk == uri.c.resource_pk,
                version.c.param == "version",
                version.c.code == ref.c.canonical_version,
            )
            .correlate_except(version),
        )
        by_url = (
            sa.select(uri.c.resource_pk)
            .select_from(uri.join(ref, ref.c.url == uri.c.value))
            .where(
                *from_sources,
                ref.c.target_id.is_(None),
                uri.c.param == "url",
                uri.c.res_type.in_(canonical_types),
                version_matches,
            )
            .correlate(None)
        )
        statement = sa.union_all(statement, _stored_select(res, res.c.pk.in_(by_url)))
    return [_row(m) for m in conn.execute(statement.limit(limit)).mappings()]


def _reverse(conn: sa.Connection, spec: IncludeSpec, targets: list[StoredRow], limit: int) -> list[StoredRow]:
    """The live ``spec.source_type`` resources whose references (``spec.params``) point at ``targets``."""
    if not spec.params:
        return []
    by_type: dict[str, list[StoredRow]] = {}
    for t in targets:
        if spec.target_type is None or spec.target_type == t.res_type:
            by_type.setdefault(t.res_type, []).append(t)
    if not by_type:
        return []
    codes = [p.code for p in spec.params]
    ref, res = _INC_REF, _INC_RES
    of_source = [ref.c.res_type == spec.source_type, ref.c.param.in_(codes)]
    pointing = sa.or_(
        *(
            sa.and_(ref.c.target_type == rtype, ref.c.target_id.in_([t.res_id for t in rows]))
            for rtype, rows in by_type.items()
        )
    )
    sources = sa.select(ref.c.resource_pk).where(*of_source, pointing).correlate(None)
    statement: sa.Select[Any] | sa.CompoundSelect[Any] = _stored_select(
        res, res.c.res_type == spec.source_type, res.c.pk.in_(sources)
    )
    canonical_pks = [t.pk for rtype, rows in by_type.items() if _has_url_param(rtype) for t in rows]
    if canonical_pks:
        uri = _INC_URI
        target_urls = sa.select(uri.c.value).where(uri.c.resource_pk.in_(canonical_pks), uri.c.param == "url")
        by_url = sa.select(ref.c.resource_pk).where(*of_source, ref.c.url.in_(target_urls)).correlate(None)
        statement = sa.union_all(
            statement, _stored_select(res, res.c.res_type == spec.source_type, res.c.pk.in_(by_url))
        )
    return [_row(m) for m in conn.execute(statement.limit(limit)).mappings()]


def _includes(
    conn: sa.Connection, req: SearchRequest, matches: list[StoredRow]
) -> tuple[list[StoredRow], bool]:
    """Resources added by ``_include``/``_revinclude``: one pass over the matches, then one more
    over what that pass added for the ``:iterate`` specifications."""
    specs = [*req.includes, *req.revincludes]
    if not specs or not matches:
        return [], False
    seen: set[int] = {m.pk for m in matches}
    added: list[StoredRow] = []
    truncated = False

    def run(spec: IncludeSpec, sources: list[StoredRow]) -> None:
        nonlocal truncated
        room = INCLUDE_LIMIT - len(added)
        if room <= 0:
            truncated = True
            return
        # One extra row over the room left tells a cut-off from an exact fit.
        find = _reverse if spec.reverse else _forward
        for row in find(conn, spec, sources, room + 1 + len(seen)):
            if row.pk in seen:
                continue
            if len(added) >= INCLUDE_LIMIT:
                truncated = True
                break
            seen.add(row.pk)
            added.append(row)

    for spec in specs:
        run(spec, matches)
    first_level = list(added)
    iterating = [s for s in specs if s.iterate]
    if iterating and first_level:
        for spec in iterating:
            run(spec, first_level)
    return added, truncated
