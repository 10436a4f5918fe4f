"""Parse the parameters of a FHIR search into a typed :class:`SearchRequest`.

Implements the request side of https://hl7.org/fhir/R4/search.html: parameter names with
modifiers and chains, OR lists (commas, with ``\\,`` escapes), AND by repetition, value
prefixes, and the result parameters (``_sort``, ``_count``, ``_include``, ...). The SQL
side lives in :mod:`fhir_norse.store.search.sql`; nothing here touches a database.

Values are normalised with :mod:`fhir_norse.store.search.values`, the same functions the
write side uses, so that what is searched compares equal to what was indexed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from fhir_norse.outcomes import BadRequest
from fhir_norse.store.resource_types import SUPPORTED_TYPE_SET
from fhir_norse.store.search.cursor import decode_cursor
from fhir_norse.store.search.params import (
    RESOURCE_COLUMN_PARAMS,
    UNINDEXED,
    SearchParamDef,
    SearchParamRegistry,
    default_registry,
)
from fhir_norse.store.search.request import (
    DEFAULT_COUNT,
    AnyCriterion,
    ChainCriterion,
    CompositeValue,
    Criterion,
    DateValue,
    HasCriterion,
    IncludeSpec,
    MissingValue,
    NumberValue,
    Prefix,
    QuantityValue,
    ReferenceValue,
    SearchLimits,
    SearchRequest,
    SearchValue,
    SortKey,
    StringValue,
    TokenValue,
    UriValue,
)
from fhir_norse.store.search.values import (
    date_range,
    decimal_range,
    normalize_string,
    parse_decimal,
    utc_now,
)

PREFIXES: frozenset[str] = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"})
SUMMARY_MODES = frozenset({"true", "text", "data", "count", "false"})
TOTAL_MODES = frozenset({"none", "estimate", "accurate"})

MAX_COUNT = 1000
CURSOR_PARAM = "_cursor"

# Result parameters that carry no criterion; ``_format``/``_pretty`` belong to rendering and are
# only kept so that paging links preserve them.
_PASS_THROUGH = frozenset({"_format", "_pretty"})
_SINGLE_RESULT_PARAMS = frozenset({"_sort", "_count", "_summary", "_total", "_elements", CURSOR_PARAM})
_RESULT_PARAMS = _SINGLE_RESULT_PARAMS | _PASS_THROUGH | {"_include", "_revinclude"}

# Modifiers the specification defines but this server does not implement: reported as such
# rather than as unknown.
_UNSUPPORTED_MODIFIERS = frozenset({"in", "not-in", "of-type", "text-advanced", "code-text"})
_MODIFIERS_BY_TYPE: dict[str, frozenset[str]] = {
    "token": frozenset({"missing", "not", "text"}),
    "string": frozenset({"missing", "exact", "contains"}),
    "date": frozenset({"missing"}),
    "number": frozenset({"missing"}),
    "quantity": frozenset({"missing"}),
    "reference": frozenset({"missing", "identifier"}),  # plus ``:Type``, checked separately
    "uri": frozenset({"missing", "below", "above"}),
    "composite": frozenset({"missing"}),
}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_RESOURCE_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
# ``.../Type/id`` or ``.../Type/id/_history/vid`` at the end of an absolute reference.
_URL_TAIL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


# --- escaping -----------------------------------------------------------------------------------


def split_escaped(text: str, separator: str) -> list[str]:
    """Split on ``separator`` where it is not escaped by a backslash; escapes are kept.

    See https://hl7.org/fhir/R4/search.html#escaping.
    """
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def unescape(text: str) -> str:
    """Remove the backslash escapes of ``\\,``, ``\\|``, ``\\$`` and ``\\\\``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in ",|$\\":
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# --- value parsers ------------------------------------------------------------------------------


def _split_prefix(raw: str, name: str) -> tuple[Prefix, str]:
    if len(raw) >= 2 and raw[:2].isalpha():
        prefix = raw[:2]
        if prefix not in PREFIXES:
            raise BadRequest(
                f"Unknown prefix '{prefix}' in value '{raw}' of parameter '{name}' "
                f"(expected one of {', '.join(sorted(PREFIXES))})",
                expression=name,
            )
        return prefix, raw[2:]  # type: ignore[return-value]
    return "eq", raw


def parse_token(raw: str, name: str) -> TokenValue:
    parts = split_escaped(raw, "|")
    if len(parts) == 1:
        return TokenValue(system=None, code=unescape(parts[0]))
    if len(parts) != 2:
        raise BadRequest(f"Token value '{raw}' of parameter '{name}' has more than one '|'", expression=name)
    system, code = unescape(parts[0]), unescape(parts[1])
    if not system and not code:
        raise BadRequest(f"Token value '{raw}' of parameter '{name}' is empty", expression=name)
    if not system:
        return TokenValue(system=None, code=code, no_system=True)
    return TokenValue(system=system, code=code or None)


def parse_date(raw: str, name: str) -> DateValue:
    prefix, text = _split_prefix(raw, name)
    try:
        low, high = date_range(unescape(text))
    except BadRequest as exc:
        raise BadRequest(f"Parameter '{name}': {exc.message}", expression=name) from exc
    return DateValue(prefix=prefix, raw=raw, low=low, high=high)


def parse_number(raw: str, name: str) -> NumberValue:
    prefix, text = _split_prefix(raw, name)
    try:
        number = parse_decimal(unescape(text))
    except BadRequest as exc:
        raise BadRequest(f"Parameter '{name}': {exc.message}", expression=name) from exc
    low, high = decimal_range(number)
    return NumberValue(prefix=prefix, raw=raw, value=number, low=low, high=high)


def parse_quantity(raw: str, name: str) -> QuantityValue:
    parts = split_escaped(raw, "|")
    if len(parts) == 1:
        return QuantityValue(parse_number(parts[0], name))
    if len(parts) != 3:
        raise BadRequest(
            f"Quantity value '{raw}' of parameter '{name}' must be number, number|system|code "
            "or number||code",
            expression=name,
        )
    number = parse_number(parts[0], name)
    system, code = unescape(parts[1]) or None, unescape(parts[2]) or None
    return QuantityValue(number, system=system, code=code)


def parse_string(raw: str, name: str) -> StringValue:
    text = unescape(raw)
    folded = normalize_string(text)
    if not folded:
        raise BadRequest(f"String value of parameter '{name}' is empty", expression=name)
    return StringValue(raw=text, folded=folded)


def parse_uri(raw: str, name: str) -> UriValue:
    return UriValue(unescape(raw))


def parse_reference(raw: str, name: str, param: SearchParamDef, target_type: str | None) -> ReferenceValue:
    text = unescape(raw)
    if target_type is not None:
        # ``subject:Patient=123`` (or the redundant ``subject:Patient=Patient/123``).
        if text.startswith(target_type + "/"):
            text = text[len(target_type) + 1 :]
        if not _RESOURCE_ID.match(text):
            raise BadRequest(f"'{text}' is not a valid id for parameter '{name}'", expression=name)
        return ReferenceValue(target_type=target_type, target_id=text)
    if "://" in text or text.startswith(("urn:", "//")):
        url, _, version = text.partition("|")
        tail = _URL_TAIL.search(url)
        if tail and not version:
            return ReferenceValue(target_type=tail[1], target_id=tail[2], url=url)
        return ReferenceValue(url=url, version=version or None)
    if "/" in text:
        tail = _URL_TAIL.fullmatch(text) or _URL_TAIL.fullmatch("/" + text)
        if not tail:
            raise BadRequest(
                f"'{text}' is not a valid reference for parameter '{name}' (expected id, Type/id or an "
                "absolute URL)",
                expression=name,
            )
        rtype, rid = tail[1], tail[2]
        if param.targets and rtype not in param.targets:
            raise BadRequest(
                f"Parameter '{name}' cannot refer to a {rtype} (allowed: {', '.join(param.targets)})",
                expression=name,
            )
        return ReferenceValue(target_type=rtype, target_id=rid)
    if not _RESOURCE_ID.match(text):
        raise BadRequest(f"'{text}' is not a valid id for parameter '{name}'", expression=name)
    return ReferenceValue(target_id=text)


def parse_missing(raw: str, name: str) -> MissingValue:
    if raw not in ("true", "false"):
        raise BadRequest(
            f"':missing' of parameter '{name}' must be true or false, not '{raw}'", expression=name
        )
    return MissingValue(raw == "true")


# --- the parser ---------------------------------------------------------------------------------


class _Unknown(Exception):
    """A parameter this server does not know or does not support (strict: 400; lenient: ignored)."""


@dataclass
class _Parser:
    resource_type: str
    registry: SearchParamRegistry
    strict: bool

    def param(self, resource_type: str, code: str, name: str) -> SearchParamDef:
        definition = self.registry.get(resource_type, code)
        if definition is None:
            raise _Unknown(f"Unknown search parameter '{code}' for resource type {resource_type}")
        if not self.supported(definition):
            raise _Unknown(f"Search parameter '{code}' of {resource_type} is not supported")
        return definition

    @staticmethod
    def supported(definition: SearchParamDef) -> bool:
        if definition.code in RESOURCE_COLUMN_PARAMS:
            return True
        if definition.code in UNINDEXED or definition.type == "special":
            return False
        return bool(definition.expression) or definition.type == "composite"

    def criterion(
        self, resource_type: str, name: str, raw_value: str, *, allow_chain: bool = True
    ) -> AnyCriterion:
        if name.startswith("_has:"):
            if not allow_chain:
                raise BadRequest(
                    f"'{name}': only one level of chaining or _has is supported", expression=name
                )
            return self.has(resource_type, name, raw_value)
        head, dot, rest = name.partition(".")
        if dot:
            if not allow_chain:
                raise BadRequest(f"'{name}': only one level of chaining is supported", expression=name)
            return self.chain(resource_type, name, head, rest, raw_value)
        code, _, modifier = head.partition(":")
        param = self.param(resource_type, code, name)
        return self.simple(param, name, modifier or None, raw_value)

    def simple(self, param: SearchParamDef, name: str, modifier: str | None, raw_value: str) -> Criterion:
        target_type: str | None = None
        if modifier is not None:
            modifier, target_type = self.check_modifier(param, name, modifier)
        raw_values = split_escaped(raw_value, ",")
        if any(v == "" for v in raw_values):
            raise BadRequest(f"Parameter '{name}' has an empty value in '{raw_value}'", expression=name)
        if modifier == "missing":
            values: tuple[SearchValue, ...] = tuple(parse_missing(v, name) for v in raw_values)
        else:
            values = tuple(self.value(param, name, modifier, target_type, v) for v in raw_values)
        return Criterion(name=name, param=param, values=values, modifier=modifier, target_type=target_type)

    def check_modifier(
        self, param: SearchParamDef, name: str, modifier: str
    ) -> tuple[str | None, str | None]:
        if param.code in RESOURCE_COLUMN_PARAMS:
            if modifier != "missing":
                raise BadRequest(
                    f"Unknown modifier ':{modifier}' for parameter '{param.code}'", expression=name
                )
            return modifier, None
        if param.type == "reference" and _RESOURCE_TYPE_NAME.match(modifier):
            if param.targets and modifier not in param.targets:
                raise BadRequest(
                    f"Parameter '{param.code}' cannot refer to a {modifier} "
                    f"(allowed: {', '.join(param.targets)})",
                    expression=name,
                )
            if not param.targets and modifier not in SUPPORTED_TYPE_SET:
                raise BadRequest(f"Unknown resource type '{modifier}' in '{name}'", expression=name)
            return None, modifier
        if modifier in _MODIFIERS_BY_TYPE.get(param.type, frozenset()):
            return modifier, None
        if modifier in _UNSUPPORTED_MODIFIERS:
            raise BadRequest(
                f"Modifier ':{modifier}' of parameter '{param.code}' is not supported",
                code="not-supported",
                expression=name,
            )
        raise BadRequest(
            f"Unknown modifier ':{modifier}' for {param.type} parameter '{param.code}'", expression=name
        )

    def value(
        self, param: SearchParamDef, name: str, modifier: str | None, target_type: str | None, raw: str
    ) -> SearchValue:
        kind = param.type
        if param.code == "_id":
            text = unescape(raw)
            if not _RESOURCE_ID.match(text):
                raise BadRequest(f"'{text}' is not a valid resource id", expression=name)
            return TokenValue(system=None, code=text)
        if kind == "token":
            return parse_string(raw, name) if modifier == "text" else parse_token(raw, name)
        if kind == "string":
            return parse_string(raw, name)
        if kind == "date":
            return parse_date(raw, name)
        if kind == "number":
            return parse_number(raw, name)
        if kind == "quantity":
            return parse_quantity(raw, name)
        if kind == "reference":
            if modifier == "identifier":
                return parse_token(raw, name)
            return parse_reference(raw, name, param, target_type)
        if kind == "uri":
            return parse_uri(raw, name)
        if kind == "composite":
            return self.composite(param, name, raw)
        raise _Unknown(f"Search parameter '{param.code}' of type {kind} is not supported")

    def composite(self, param: SearchParamDef, name: str, raw: str) -> CompositeValue:
        parts = split_escaped(raw, "$")
        if len(param.components) != 2 or len(parts) != 2:
            raise BadRequest(
                f"Composite parameter '{name}' takes two components separated by '$', got '{raw}'",
                expression=name,
            )
        first_def = self.registry.by_url(param.components[0].definition_url, param.resource_type)
        second_def = self.registry.by_url(param.components[1].definition_url, param.resource_type)
        if first_def is None or second_def is None or first_def.type != "token":
            raise _Unknown(f"Composite parameter '{param.code}' is not supported")
        second_type = second_def.type
        second: TokenValue | StringValue | DateValue | QuantityValue | NumberValue | UriValue
        if second_type == "token":
            second = parse_token(parts[1], name)
        elif second_type == "quantity":
            second = parse_quantity(parts[1], name)
        elif second_type == "number":
            second = parse_number(parts[1], name)
        elif second_type == "date":
            second = parse_date(parts[1], name)
        elif second_type == "string":
            second = parse_string(parts[1], name)
        else:
            raise _Unknown(f"Composite parameter '{param.code}' is not supported")
        return CompositeValue(first=parse_token(parts[0], name), second_type=second_type, second=second)

    def chain(self, resource_type: str, name: str, head: str, rest: str, raw_value: str) -> ChainCriterion:
        code, _, modifier = head.partition(":")
        reference = self.param(resource_type, code, name)
        if reference.type != "reference":
            raise BadRequest(f"'{name}': only reference parameters can be chained", expression=name)
        if "." in rest or rest.startswith("_has:"):
            raise BadRequest(f"'{name}': only one level of chaining is supported", expression=name)
        if modifier:
            _, target_type = self.check_modifier(reference, name, modifier)
            if target_type is None:
                raise BadRequest(f"'{name}': a chain allows only a :Type modifier", expression=name)
            candidates: tuple[str, ...] = (target_type,)
        else:
            candidates = reference.targets or tuple(sorted(SUPPORTED_TYPE_SET))
        inner_code, _, inner_modifier = rest.partition(":")
        hops: list[Criterion] = []
        for target in candidates:
            if target not in SUPPORTED_TYPE_SET:
                continue
            definition = self.registry.get(target, inner_code)
            if definition is None or not self.supported(definition):
                continue
            hops.append(self.simple(definition, name, inner_modifier or None, raw_value))
        if not hops:
            raise _Unknown(
                f"Unknown chained parameter '{name}': no target of '{code}' "
                f"({', '.join(candidates)}) has a search parameter '{inner_code}'"
            )
        return ChainCriterion(name=name, reference=reference, hops=tuple(hops))

    def has(self, resource_type: str, name: str, raw_value: str) -> HasCriterion:
        parts = name.split(":", 3)
        if len(parts) != 4 or not all(parts[1:]):
            raise BadRequest(f"'{name}' must have the form _has:Type:reference:parameter", expression=name)
        _, source_type, ref_code, rest = parts
        if rest.startswith("_has") or "." in rest:
            raise BadRequest(f"'{name}': only one level of _has is supported", expression=name)
        if source_type not in SUPPORTED_TYPE_SET:
            raise _Unknown(f"Unknown resource type '{source_type}' in '{name}'")
        reference = self.param(source_type, ref_code, name)
        if reference.type != "reference":
            raise BadRequest(
                f"'{name}': '{ref_code}' is not a reference parameter of {source_type}", expression=name
            )
        if reference.targets and resource_type not in reference.targets:
            raise BadRequest(
                f"'{name}': {source_type}.{ref_code} cannot refer to a {resource_type}", expression=name
            )
        inner_code, _, inner_modifier = rest.partition(":")
        inner = self.simple(
            self.param(source_type, inner_code, name), name, inner_modifier or None, raw_value
        )
        return HasCriterion(name=name, reference=reference, inner=inner, target_type=resource_type)

    # --- result parameters

    def sort(self, raw: str) -> tuple[SortKey, ...]:
        keys: list[SortKey] = []
        for item in raw.split(","):
            item = item.strip()
            descending = item.startswith("-")
            code = item[1:] if descending else item
            if not code:
                raise BadRequest(f"Empty key in _sort={raw}", expression="_sort")
            definition = self.registry.get(self.resource_type, code)
            if definition is None or not self.supported(definition):
                raise BadRequest(
                    f"Cannot sort by '{code}': not a search parameter of {self.resource_type}",
                    expression="_sort",
                )
            if definition.type in ("composite", "special"):
                raise BadRequest(
                    f"Cannot sort by the {definition.type} parameter '{code}'", expression="_sort"
                )
            if any(k.param.code == code for k in keys):
                raise BadRequest(f"_sort names '{code}' twice", expression="_sort")
            keys.append(SortKey(definition, descending))
        return tuple(keys)

    def include(self, name: str, raw: str) -> IncludeSpec:
        base, _, modifier = name.partition(":")
        reverse = base == "_revinclude"
        if modifier not in ("", "iterate", "recurse"):
            raise BadRequest(f"Unknown modifier ':{modifier}' of {base}", expression=base)
        parts = raw.split(":")
        if raw == "*":
            parts = [self.resource_type, "*"]
        if len(parts) not in (2, 3) or not all(parts):
            raise BadRequest(f"{base}={raw} must have the form Type:parameter[:TargetType]", expression=base)
        source_type, code = parts[0], parts[1]
        target_type = parts[2] if len(parts) == 3 else None
        if source_type not in SUPPORTED_TYPE_SET:
            raise BadRequest(f"{base}={raw}: unknown resource type '{source_type}'", expression=base)
        if target_type is not None and target_type not in SUPPORTED_TYPE_SET:
            raise BadRequest(f"{base}={raw}: unknown resource type '{target_type}'", expression=base)
        if code == "*":
            params = tuple(
                d
                for d in self.registry.for_type(source_type).values()
                if d.type == "reference" and self.supported(d)
            )
        else:
            definition = self.registry.get(source_type, code)
            if definition is None or definition.type != "reference":
                raise BadRequest(
                    f"{base}={raw}: '{code}' is not a reference parameter of {source_type}", expression=base
                )
            if target_type is not None and definition.targets and target_type not in definition.targets:
                raise BadRequest(f"{base}={raw}: '{code}' cannot refer to a {target_type}", expression=base)
            params = (definition,)
        return IncludeSpec(
            source_type=source_type,
            params=params,
            target_type=target_type,
            iterate=bool(modifier),
            reverse=reverse,
        )


def parse_search(
    resource_type: str,
    params: Iterable[tuple[str, str]],
    *,
    strict: bool = False,
    registry: SearchParamRegistry | None = None,
    now: datetime | None = None,
    limits: SearchLimits | None = None,
) -> SearchRequest:
    """Parse search parameters (query string or ``POST _search`` form pairs) into a request.

    ``strict`` follows ``Prefer: handling=strict``: an unknown or unsupported parameter is a
    400; otherwise it is recorded in :attr:`SearchRequest.ignored`. Malformed values, unknown
    modifiers and prefixes are always a 400 (:class:`BadRequest`), and so is a search past
    ``limits`` (``too-costly``, checked before anything is parsed).
    See https://hl7.org/fhir/R4/search.html.
    """
    if resource_type not in SUPPORTED_TYPE_SET:
        raise BadRequest(f"Unknown resource type '{resource_type}'")
    params = list(params)
    check_bounds(params, limits or SearchLimits())
    parser = _Parser(resource_type, registry or default_registry(), strict)
    criteria: list[AnyCriterion] = []
    ignored: list[tuple[str, str]] = []
    kept: list[tuple[str, str]] = []
    seen_single: set[str] = set()
    sort: tuple[SortKey, ...] = ()
    count = DEFAULT_COUNT
    summary: str | None = None
    elements: tuple[str, ...] = ()
    includes: list[IncludeSpec] = []
    revincludes: list[IncludeSpec] = []
    total = "none"
    cursor_token: str | None = None

    for name, value in params:
        if _CONTROL.search(name) or _CONTROL.search(value):
            # No FHIR value holds a control character, and PostgreSQL refuses a NUL in any text.
            raise BadRequest(
                f"Search parameter '{name.encode('unicode_escape').decode()}' holds a control character"
            )
        if value == "":
            continue  # an empty parameter carries no criterion
        base = name.partition(":")[0]
        if base in _SINGLE_RESULT_PARAMS:
            if name != base:
                raise BadRequest(f"Unknown modifier in '{name}'", expression=base)
            if base in seen_single:
                raise BadRequest(f"Parameter '{base}' may be given only once", expression=base)
            seen_single.add(base)
        if base == CURSOR_PARAM:
            cursor_token = value
            continue
        if base == "_sort":
            sort = parser.sort(value)
        elif base == "_count":
            count = _parse_count(value)
        elif base == "_summary":
            if value not in SUMMARY_MODES:
                raise BadRequest(
                    f"_summary must be one of {', '.join(sorted(SUMMARY_MODES))}", expression=base
                )
            summary = value
        elif base == "_total":
            if value not in TOTAL_MODES:
                raise BadRequest(f"_total must be one of {', '.join(sorted(TOTAL_MODES))}", expression=base)
            total = value
        elif base == "_elements":
            elements = tuple(e.strip() for e in value.split(",") if e.strip())
        elif base in ("_include", "_revinclude"):
            spec = parser.include(name, value)
            (revincludes if spec.reverse else includes).append(spec)
        elif base in _PASS_THROUGH:
            pass
        else:
            try:
                criteria.append(parser.criterion(resource_type, name, value))
            except _Unknown as exc:
                if strict:
                    raise BadRequest(str(exc), code="not-supported", expression=name) from exc
                ignored.append((name, value))
                continue
        kept.append((name, value))

    request = SearchRequest(
        resource_type=resource_type,
        criteria=tuple(criteria),
        sort=sort,
        count=count,
        summary=summary,
        elements=elements,
        includes=tuple(includes),
        revincludes=tuple(revincludes),
        total=total,
        ignored=tuple(ignored),
        params=tuple(kept),
        now=now or utc_now(),
    )
    if cursor_token is not None:
        cursor = decode_cursor(cursor_token, request.sort_signature, _cursor_kinds(request.sort))
        request = replace(request, cursor=cursor, cursor_token=cursor_token)
    return request


def check_bounds(params: list[tuple[str, str]], limits: SearchLimits) -> None:
    """Refuse a search with more parameters or values than ``limits`` allow (400 ``too-costly``):
    each criterion is a subquery, and hundreds of them made SQLite refuse the statement and
    PostgreSQL plan it for minutes."""
    if len(params) > limits.max_parameters:
        raise BadRequest(
            f"The search has {len(params)} parameters; this server accepts at most {limits.max_parameters}",
            code="too-costly",
        )
    values = sum(
        value.count(",") - value.count("\\,") + 1
        for name, value in params
        if value and name.partition(":")[0] not in _RESULT_PARAMS
    )
    if values > limits.max_values:
        raise BadRequest(
            f"The search has {values} values in its criteria; this server accepts at most "
            f"{limits.max_values}",
            code="too-costly",
        )


def sort_value_kind(param: SearchParamDef) -> Literal["datetime", "float", "str"]:
    """The Python type of a sort key's value, as stored in a cursor."""
    if param.type == "date":
        return "datetime"
    if param.type in ("number", "quantity"):
        return "float"
    return "str"


def _cursor_kinds(sort: tuple[SortKey, ...]) -> tuple[Literal["datetime", "float", "str"], ...]:
    return tuple(sort_value_kind(k.param) for k in sort)


def _parse_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError as exc:
        raise BadRequest(f"_count must be a whole number, not '{value}'", expression="_count") from exc
    if count < 0:
        raise BadRequest("_count must not be negative", expression="_count")
    # The specification lets a server return fewer than asked; a cap keeps pages bounded.
    return min(count, MAX_COUNT)
