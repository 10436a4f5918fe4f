"""The SearchParameter definitions that drive indexing and search.

Loaded from the official R4 4.0.1 SearchParameter resources shipped in
``fhir_norse/definitions/search-parameters.json`` (CC0, from ``hl7.fhir.r4.core``), plus the custom
SearchParameters a content pack publishes (:func:`registry_with`: what integrators need that R4 does not
define, such as ``Flag?status=``). A definition whose ``base`` lists several types carries one FHIRPath
union over all of them; it is split per type here so that each type evaluates only its own branches.
See https://hl7.org/fhir/R4/searchparameter.html.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from fhir_norse import definitions
from fhir_norse.store.resource_types import SUPPORTED_TYPES
from fhir_norse.store.search.advertised import ExtraParameterError, advertised

DEFINITIONS = definitions.DIR / "search-parameters.json"

# Parameters that apply to every resource type and are answered from the resource table or
# by the search engine itself, not from index rows.
RESOURCE_COLUMN_PARAMS = frozenset({"_id", "_lastUpdated"})
# Defined by the specification but not backed by an expression we can index.
UNINDEXED = frozenset({"_content", "_text", "_query", "_filter", "_list", "_has", "_type"})


@dataclass(frozen=True, slots=True)
class Component:
    """One component of a composite parameter: the definition it uses and its relative expression."""

    definition_url: str
    expression: str


@dataclass(frozen=True, slots=True)
class SearchParamDef:
    code: str
    type: str  # number | date | string | token | reference | composite | quantity | uri | special
    url: str
    resource_type: str
    # The FHIRPath expression restricted to ``resource_type``'s branches (``Resource.`` rewritten to it).
    expression: str | None
    targets: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()
    modifiers: tuple[str, ...] = ()
    comparators: tuple[str, ...] = ()
    description: str = ""
    documentation: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def split_union(expression: str) -> list[str]:
    """Split a FHIRPath expression on its top-level ``|`` operators."""
    parts: list[str] = []
    depth = 0
    quote = False
    start = 0
    for i, ch in enumerate(expression):
        if ch == "'" and (i == 0 or expression[i - 1] != "\\"):
            quote = not quote
        elif quote:
            continue
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def _root(branch: str) -> str:
    return branch.lstrip("(").split(".", 1)[0].split(" ", 1)[0].strip()


def restrict_expression(expression: str, resource_type: str) -> str | None:
    """Keep the union branches that start at ``resource_type`` (or at ``Resource``/``DomainResource``)."""
    kept = []
    for branch in split_union(expression):
        root = _root(branch)
        if root == resource_type:
            kept.append(branch)
        elif root in ("Resource", "DomainResource"):
            kept.append(branch.replace(root + ".", resource_type + ".", 1))
    return " | ".join(kept) if kept else None


class SearchParamRegistry:
    """The SearchParameters by resource type and code, and by canonical URL.

    With ``advertised`` (codes per type, see :mod:`.advertised`), :meth:`get`, :meth:`for_type` and
    :meth:`indexed` know only those: what the server indexes, lists and answers; a type missing from it
    has only the codes starting with ``_``. :meth:`by_url` and :meth:`defined` still know every
    definition (the components of an advertised composite need not be advertised themselves).
    Without ``advertised``: every definition, as the specification lists them.
    """

    def __init__(
        self,
        definitions: Iterable[Mapping[str, Any]],
        resource_types: Iterable[str],
        advertised: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        self._all_by_type: dict[str, dict[str, SearchParamDef]] = {t: {} for t in resource_types}
        self._by_url: dict[str, dict[str, SearchParamDef]] = {}
        for sp in definitions:
            for base in sp.get("base", []):
                targets = list(self._all_by_type) if base in ("Resource", "DomainResource") else [base]
                for rtype in targets:
                    if rtype not in self._all_by_type:
                        continue
                    self._add(sp, rtype)
        if advertised is None:
            self._by_type = self._all_by_type
        else:
            self._by_type = {
                t: {
                    c: d
                    for c, d in defs.items()
                    if c in advertised.get(t, ()) or (t not in advertised and c.startswith("_"))
                }
                for t, defs in self._all_by_type.items()
            }
        self._indexed = {t: self._indexed_of(t) for t in self._by_type}

    def _add(self, sp: Mapping[str, Any], rtype: str) -> None:
        raw = sp.get("expression")
        expression = restrict_expression(raw, rtype) if raw else None
        if sp["code"] == "_id":
            expression = f"{rtype}.id"
        definition = SearchParamDef(
            code=sp["code"],
            type=sp["type"],
            url=sp["url"],
            resource_type=rtype,
            expression=expression,
            targets=tuple(sp.get("target", ())),
            components=tuple(Component(c["definition"], c["expression"]) for c in sp.get("component", ())),
            modifiers=tuple(sp.get("modifier", ())),
            comparators=tuple(sp.get("comparator", ())),
            description=str(sp.get("description", "")),
        )
        if raw and expression is None and sp["type"] != "composite":
            return  # the union names this type in ``base`` but has no branch for it
        self._all_by_type[rtype][sp["code"]] = definition
        self._by_url.setdefault(sp["url"], {})[rtype] = definition

    def for_type(self, resource_type: str) -> Mapping[str, SearchParamDef]:
        return self._by_type.get(resource_type, {})

    def get(self, resource_type: str, code: str) -> SearchParamDef | None:
        return self._by_type.get(resource_type, {}).get(code)

    def by_url(self, url: str, resource_type: str) -> SearchParamDef | None:
        return self._by_url.get(url, {}).get(resource_type)

    def defined(self, resource_type: str, code: str) -> SearchParamDef | None:
        """The definition of ``code`` on ``resource_type``, advertised or not."""
        return self._all_by_type.get(resource_type, {}).get(code)

    def indexed(self, resource_type: str) -> list[SearchParamDef]:
        """The definitions whose values are extracted into index rows on write."""
        return list(self._indexed.get(resource_type, ()))

    def _indexed_of(self, resource_type: str) -> list[SearchParamDef]:
        return [
            d
            for d in self._by_type.get(resource_type, {}).values()
            if d.code not in RESOURCE_COLUMN_PARAMS
            and d.code not in UNINDEXED
            and d.type != "special"
            and (d.expression or d.type == "composite")
        ]


@cache
def _r4_definitions() -> tuple[Mapping[str, Any], ...]:
    bundle = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    # The R4 bundle also holds two examples (``SearchParameter/example`` with code ``_id``, which would
    # otherwise stand in for ``Resource-id`` in the CapabilityStatement, and ``example-extension``).
    return tuple(e["resource"] for e in bundle["entry"] if e["resource"].get("id") not in _EXAMPLES)


_EXAMPLES = frozenset({"example", "example-extension"})


@cache
def full_registry() -> SearchParamRegistry:
    """Every R4 SearchParameter of the stored types (what the specification defines)."""
    return SearchParamRegistry(_r4_definitions(), SUPPORTED_TYPES)


@cache
def default_registry() -> SearchParamRegistry:
    """The R4 SearchParameters this server advertises (:mod:`.advertised`), without a content pack."""
    return SearchParamRegistry(_r4_definitions(), SUPPORTED_TYPES, advertised())


def extra_problems(extra: Iterable[tuple[str, str]], custom: Iterable[Mapping[str, Any]] = ()) -> list[str]:
    """Why site-enabled parameters ``extra`` cannot be enabled (empty when they can)."""
    own = {(str(b), str(sp.get("code"))) for sp in custom for b in sp.get("base") or []}
    full = full_registry()
    return [
        f"search parameter {t}.{c}: not a parameter of a stored resource type"
        for t, c in extra
        if (t, c) not in own and full.get(t, c) is None
    ]


class CustomParameterError(ValueError):
    """A custom SearchParameter that cannot be added to the R4 ones."""


# The types of parameter a custom definition may have: those indexed from a FHIRPath expression.
CUSTOM_TYPES = frozenset({"number", "date", "string", "token", "reference", "quantity", "uri"})


def custom_problems(sp: Mapping[str, Any]) -> list[str]:
    """Why custom SearchParameter ``sp`` cannot be added to the R4 ones (empty when it can): it needs a
    url, a code, an indexed type, an expression and supported base types, and it may not redefine a
    parameter R4 defines on one of them (a client could not tell which one it searches)."""
    label = str(sp.get("url") or sp.get("id") or "a SearchParameter")
    problems = []
    for key in ("url", "code", "expression"):
        if not isinstance(sp.get(key), str) or not sp.get(key):
            problems.append(f"{label}: needs {key}")
    if sp.get("type") not in CUSTOM_TYPES:
        problems.append(f"{label}: type {sp.get('type')!r} is not one of {', '.join(sorted(CUSTOM_TYPES))}")
    bases = sp.get("base")
    if not isinstance(bases, list) or not bases:
        return [*problems, f"{label}: needs base"]
    r4 = full_registry()
    for base in bases:
        if base not in SUPPORTED_TYPES:
            problems.append(f"{label}: base {base!r} is not a resource type this server stores")
        elif (known := r4.get(base, str(sp.get("code")))) is not None:
            problems.append(f"{label}: {base}?{sp.get('code')}= is defined by R4 already ({known.url})")
    return problems


def registry_with(
    custom: Iterable[Mapping[str, Any]], enabled: Iterable[tuple[str, str]] = ()
) -> SearchParamRegistry:
    """The advertised R4 definitions plus the ``custom`` SearchParameters (a content pack's, always
    advertised), each checked by :func:`custom_problems` (:class:`CustomParameterError` names the first
    problem), plus the site-``enabled`` (type, code) pairs of R4 (:class:`ExtraParameterError` for one
    R4 does not define on a stored type)."""
    extra = list(custom)
    enabled = tuple(enabled)
    if problems := extra_problems(enabled, extra):
        raise ExtraParameterError(problems[0])
    if not extra and not enabled:
        return default_registry()
    seen: set[tuple[str, str]] = set()
    for sp in extra:
        problems = custom_problems(sp)
        for base in sp.get("base") or []:
            key = (str(base), str(sp.get("code")))
            if key in seen:
                problems.append(f"{sp.get('url')}: {base}?{sp.get('code')}= is defined twice")
            seen.add(key)
        if problems:
            raise CustomParameterError(problems[0])
    own = [(str(base), str(sp["code"])) for sp in extra for base in sp["base"]]
    return SearchParamRegistry([*_r4_definitions(), *extra], SUPPORTED_TYPES, advertised([*own, *enabled]))
