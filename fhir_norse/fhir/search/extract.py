"""Extract search-index rows from a resource on write.

Every indexed SearchParameter of the resource's type (see :mod:`.registry`) is evaluated
with fhirpathpy and its values are converted into the typed rows of :mod:`.rows`, following
the per-type rules of https://hl7.org/fhir/R4/search.html (token, string, date, number,
quantity, reference, uri and composite). The FHIRPath expressions are the official R4 ones,
rewritten only where fhirpathpy differs from what they assume:

* ``resolve()`` is not implemented by fhirpathpy; it is supplied as a function that turns a
  literal reference into a stand-in resource of the referenced type, so the usual
  ``where(resolve() is Patient)`` keeps exactly the references to ``Patient/...``.
* ``x as T`` and ``x.as(T)`` raise on more than one item in fhirpathpy, while the official
  expressions apply them to repeating elements (``Observation.component.value as Quantity``);
  they become ``x.ofType(T)``, which is the same on one item and what is meant on many.
* System type names (``as(DateTime)``) become the FHIR ones (``dateTime``) because fhirpathpy
  types FHIR elements only in the FHIR namespace.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import cache, lru_cache
from typing import Any, cast

import fhirpathpy
from antlr4 import CommonTokenStream, InputStream
from antlr4.error.ErrorListener import ErrorListener
from fhirpathpy.engine.invocations import invocation_registry
from fhirpathpy.engine.nodes import FP_DateTime, ResourceNode, TypeInfo
from fhirpathpy.models import models
from fhirpathpy.parser import parse as _untyped_parse
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

from fhir_norse.fhir.errors import BadRequest
from fhir_norse.fhir.resource_types import SUPPORTED_TYPES
from fhir_norse.fhir.search.registry import SearchParamDef, SearchParamRegistry, default_registry, split_union
from fhir_norse.fhir.search.rows import (
    IDENTIFIER_SUFFIX,
    CompositeRow,
    DateRow,
    IndexRow,
    NumberRow,
    ReferenceRow,
    StringRow,
    TokenRow,
    UriRow,
)
from fhir_norse.fhir.search.values import date_range, decimal_range, normalize_string

log = logging.getLogger(__name__)

MODEL: dict[str, Any] = models["r4"]
STRING_MAX = 512
ISO_4217 = "urn:iso:std:iso:4217"

_Evaluate = Callable[[Any], list[Any]]
# fhirpathpy's parser and node factory carry no annotations.
_parse: Callable[[str], Any] = _untyped_parse
_node: Callable[[Any, str], Any] = ResourceNode.create_node

# --------------------------------------------------------------------------------------------
# FHIR data types, as fhirpathpy names them on its nodes.

_STRING_TYPES = frozenset(
    {"string", "code", "id", "markdown", "uri", "url", "canonical", "oid", "uuid", "xhtml", "base64Binary"}
)
_DATE_TYPES = frozenset({"date", "dateTime", "instant"})
_NUMBER_TYPES = frozenset({"decimal", "integer", "unsignedInt", "positiveInt", "integer64"})
_QUANTITY_TYPES = frozenset(
    {"Quantity", "Age", "Duration", "Distance", "Count", "SimpleQuantity", "MoneyQuantity"}
)
_PRIMITIVE_TYPES = _STRING_TYPES | _DATE_TYPES | _NUMBER_TYPES | {"boolean", "time"}
# Extension.value[x] suffixes are capitalised; the primitive type names are not.
_PRIMITIVE_BY_SUFFIX = {t[0].upper() + t[1:]: t for t in _PRIMITIVE_TYPES}

# FHIRPath System types written where the FHIR type is meant (``value.as(DateTime)``).
_SYSTEM_TO_FHIR = {
    "DateTime": "dateTime",
    "String": "string",
    "Boolean": "boolean",
    "Integer": "integer",
    "Decimal": "decimal",
    "Date": "date",
    "Time": "time",
}

# Literal references: ``Patient/1``, ``Patient/1/_history/2``, ``http://host/fhir/Patient/1``.
_REFERENCE = re.compile(
    r"^(?:(?P<base>.+)/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/(?P<version>[A-Za-z0-9\-.]{1,64}))?$"
)

# --------------------------------------------------------------------------------------------
# Expression rewriting


def _outside_literals(expression: str, rewrite: Callable[[str], str]) -> str:
    """Apply ``rewrite`` to the parts of ``expression`` that are not quoted string literals."""
    parts = re.split(r"('(?:[^'\\]|\\.)*')", expression)
    return "".join(part if i % 2 else rewrite(part) for i, part in enumerate(parts))


_AS_INFIX = re.compile(r"(?<=[\w)\]`])\s+as\s+([A-Za-z][\w.]*)")
_AS_CALL = re.compile(r"\.as\(\s*([A-Za-z][\w.]*)\s*\)")
_OF_TYPE = re.compile(r"\.ofType\(\s*([A-Za-z][\w.]*)\s*\)")


def _fhir_type(name: str) -> str:
    bare = name.removeprefix("System.")
    return _SYSTEM_TO_FHIR.get(bare, name)


def rewrite_expression(expression: str) -> str:
    """Rewrite an official R4 expression into one fhirpathpy evaluates as intended (see module doc)."""

    def rewrite(text: str) -> str:
        # ``as`` binds tighter than ``|`` and looser than ``.``, and the official expressions
        # parenthesise it, so its left operand is always a whole path ending just before it.
        text = _AS_INFIX.sub(lambda m: f".ofType({m[1]})", text)
        text = _AS_CALL.sub(lambda m: f".ofType({m[1]})", text)
        return _OF_TYPE.sub(lambda m: f".ofType({_fhir_type(m[1])})", text)

    return _outside_literals(expression, rewrite)


# --------------------------------------------------------------------------------------------
# Functions fhirpathpy lacks


def _resolve(inputs: list[Any]) -> list[Any]:
    """``resolve()`` without a store: a stand-in resource of the type a literal reference names.

    Enough for the ``resolve() is T`` tests of the search expressions; contained (``#x``) and
    logical (identifier-only) references resolve to nothing.
    """
    out: list[Any] = []
    for data in inputs:
        reference = data.get("reference") if isinstance(data, Mapping) else data
        if not isinstance(reference, str):
            continue
        match = _REFERENCE.match(reference.split("|", 1)[0])
        if match:
            out.append(_node({"resourceType": match["type"]}, match["type"]))
    return out


def _has_extension(inputs: list[Any], url: str) -> list[bool]:
    return [
        any(isinstance(e, Mapping) and e.get("url") == url for e in d.get("extension", ()))
        for d in inputs
        if isinstance(d, Mapping)
    ]


_USER_FUNCTIONS: dict[str, dict[str, Any]] = {
    "resolve": {"fn": _resolve},
    "hasExtension": {"fn": _has_extension, "arity": {1: ["String"]}},
}
_OPTIONS = {"returnRawData": True, "userInvocationTable": _USER_FUNCTIONS}


def _functions(tree: Any) -> Iterator[tuple[str, int]]:
    """Each function call in a parsed expression with its number of arguments."""
    if isinstance(tree, Mapping):
        if tree.get("type") == "Functn":
            children = tree.get("children", ())
            names = [str(c.get("text", "")) for c in children if c.get("type") == "Identifier"]
            arguments = [c for c in children if c.get("type") == "ParamList"]
            if names:
                yield names[0], len(arguments[0].get("children", ())) if arguments else 0
        for child in tree.get("children", ()):
            yield from _functions(child)


class _SyntaxErrors(ErrorListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def syntaxError(
        self, recognizer: Any, offending: Any, line: int, column: int, message: str, error: Any
    ) -> None:
        self.messages.append(f"column {column}: {message}")


def _syntax_errors(expression: str) -> list[str]:
    """fhirpathpy's own parse recovers from syntax errors silently (``where(`` becomes a call
    without arguments); parse once more with a listener to know."""
    listener = _SyntaxErrors()
    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(listener)
    parser: Any = FHIRPathParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(listener)
    parser.entireExpression()
    return listener.messages


class UnsupportedExpression(ValueError):
    """An expression fhirpathpy cannot parse or would fail to evaluate whatever the data."""


@lru_cache(maxsize=4096)
def compile_expression(expression: str) -> _Evaluate:
    """Compile a rewritten expression once: fhirpathpy's parser takes about a millisecond."""
    errors = _syntax_errors(expression)
    if errors:
        raise UnsupportedExpression(f"cannot parse: {'; '.join(errors)}")
    try:
        tree = _parse(expression)
    except Exception as exc:  # the ANTLR lexer raises plain Exceptions
        raise UnsupportedExpression(f"cannot parse: {exc}") from exc
    for name, count in _functions(tree):
        known = cast("Mapping[str, Any] | None", _USER_FUNCTIONS.get(name) or invocation_registry.get(name))
        if known is None:
            raise UnsupportedExpression(f"function {name}() is not implemented by fhirpathpy")
        if "variadic" not in known and count not in known.get("arity", {0: ()}):
            raise UnsupportedExpression(f"function {name}() does not take {count} argument(s)")
    compiled = fhirpathpy.compile(expression, MODEL, _OPTIONS)
    return lambda resource: compiled(resource, None)


# --------------------------------------------------------------------------------------------
# Cheap pre-checks: which top-level JSON keys a branch needs to yield anything

# Functions that yield nothing from an empty input, so a branch made only of them and member
# steps is empty whenever its first element is absent (``exists()`` or ``not()`` are not).
_EMPTY_PRESERVING = frozenset({"where", "ofType", "extension", "first", "last", "resolve", "select", "as"})
_PATH_SHAPE = re.compile(r"^\(*(\w+)(\(\))?(?:\.\w+(?:\(\))?|\))*$")


def _blank_arguments(text: str) -> str:
    """Drop string literals and the arguments of function calls, keeping grouping parentheses."""
    out: list[str] = []
    depth = 0  # inside a call's argument list
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "'":
            end = i + 1
            while end < len(text) and text[end] != "'":
                end += 2 if text[end] == "\\" else 1
            i = end + 1
            continue
        if depth:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if not depth:
                    out.append(")")
        elif ch == "(" and out and (out[-1].isalnum() or out[-1] == "_"):
            out.append("(")
            depth = 1
        elif not ch.isspace():
            out.append(ch)
        i += 1
    return "".join(out)


_FIRST_OF_TYPE = re.compile(r"^\(*\s*\w+\s*\.\s*ofType\(\s*([\w.]+)\s*\)")


def first_element(branch: str) -> tuple[str, str | None] | None:
    """The first step of a path-shaped relative branch and the type it is narrowed to at once
    (``value.ofType(Quantity).code`` gives ``("value", "Quantity")``), or ``None`` when the
    branch could yield values without that step (``deceased.exists()``)."""
    text = _blank_arguments(branch)
    if any(name not in _EMPTY_PRESERVING for name in re.findall(r"(\w+)\(\)", text)):
        return None
    match = _PATH_SHAPE.match(text)
    if not match:
        return None
    if match[2]:
        return ("extension", None) if match[1] == "extension" else None
    narrowed = _FIRST_OF_TYPE.match(branch)
    return match[1], narrowed[1] if narrowed else None


def _is_type(name: str, base: str) -> bool:
    seen: str | None = name
    while seen:
        if seen == base:
            return True
        seen = MODEL["type2Parent"].get(seen)
    return False


@lru_cache(maxsize=4096)
def element_keys(path: str, element: str, of_type: str | None = None) -> frozenset[str]:
    """The JSON keys under which ``path.element`` may appear (``value`` -> ``valueQuantity``...),
    only those of type ``of_type`` when given."""
    full = f"{path}.{element}"
    full = MODEL["pathsDefinedElsewhere"].get(full, full)
    choices = MODEL["choiceTypePaths"].get(full)
    if choices:
        return frozenset(
            element + t
            for t in choices
            if of_type is None or _is_type(_PRIMITIVE_BY_SUFFIX.get(t, t), of_type)
        )
    # A primitive may be present only through its extensions (``_birthDate``).
    return frozenset({element, "_" + element})


def _branch_requirement(branch: str, resource_type: str) -> frozenset[str] | None:
    text = branch.lstrip("( ")
    if not text.startswith(resource_type + "."):
        return None
    step = first_element(text[len(resource_type) + 1 :])
    return None if step is None else element_keys(resource_type, *step)


def _present(requires: Sequence[frozenset[str]], data: Mapping[str, Any]) -> bool:
    for keys in requires:
        for key in keys:
            if key in data:
                break
        else:
            return False
    return True


# --------------------------------------------------------------------------------------------
# fhirpathpy results -> (FHIR type, JSON value)


def _typed(item: Any) -> tuple[str | None, Any] | None:
    """The FHIR type (``None`` when only the JSON shape tells) and value of one result item."""
    if isinstance(item, ResourceNode):
        data = item.data
        if data is None:
            return None
        path = item.path
        name = path if isinstance(path, str) and "." not in path else None
        if name == "Extension":
            return _extension_value(data)
        return name, data
    if isinstance(item, bool):
        return "boolean", item
    if isinstance(item, int):
        return "integer", item
    if isinstance(item, Decimal | float):
        return "decimal", item
    if isinstance(item, str):
        return "string", item
    if isinstance(item, FP_DateTime):
        return "dateTime", str(item)
    return None


def _extension_value(data: Any) -> tuple[str | None, Any] | None:
    """An extension stands for its ``value[x]`` (search parameters on extensions mean the value)."""
    if not isinstance(data, Mapping):
        return None
    for key, value in data.items():
        if key.startswith("value") and len(key) > 5:
            suffix = key[5:]
            return _PRIMITIVE_BY_SUFFIX.get(suffix, suffix), value
    return None


def _shape(data: Any) -> str | None:
    """Guess the type of an untyped value from its JSON shape (backbone elements, System values)."""
    if isinstance(data, bool):
        return "boolean"
    if isinstance(data, int | float | Decimal):
        return "decimal"
    if isinstance(data, str):
        return "string"
    if not isinstance(data, Mapping):
        return None
    if "coding" in data:
        return "CodeableConcept"
    if "reference" in data:
        return "Reference"
    if "family" in data or "given" in data:
        return "HumanName"
    if "city" in data or "line" in data or "postalCode" in data:
        return "Address"
    if "currency" in data:
        return "Money"
    if "low" in data or "high" in data:
        return "Range"
    if "start" in data or "end" in data:
        return "Period"
    if "value" in data and not isinstance(data["value"], str):
        return "Quantity"
    if "code" in data:
        return "Coding"
    if "value" in data:
        return "Identifier"
    return None


def _values(results: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    for item in results:
        typed = _typed(item)
        if typed is None:
            continue
        name, data = typed
        if data is None:
            continue
        if name is None or name == "BackboneElement":
            name = _shape(data)
            if name is None:
                continue
        yield name, data


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() else None


def _fold(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    folded = normalize_string(text)
    return folded or None


def _range(value: str) -> tuple[datetime, datetime] | None:
    try:
        return date_range(value)
    except BadRequest:
        return None


# --------------------------------------------------------------------------------------------
# Conversions by parameter type (https://hl7.org/fhir/R4/search.html#ptypes)


def token_rows(param: str, type_name: str, data: Any) -> Iterator[TokenRow]:
    """https://hl7.org/fhir/R4/search.html#token: the token forms of each data type."""
    if type_name == "boolean":
        if isinstance(data, bool):
            yield TokenRow(param, None, "true" if data else "false")
        return
    if type_name in _STRING_TYPES:
        if isinstance(data, str) and data:
            yield TokenRow(param, None, data)
        return
    if type_name in _NUMBER_TYPES:
        if not isinstance(data, bool) and isinstance(data, int | float | Decimal):
            yield TokenRow(param, None, str(data))
        return
    if not isinstance(data, Mapping):
        return
    if type_name == "Coding":
        row = _coding_row(param, data, None)
        if row:
            yield row
    elif type_name == "CodeableConcept":
        text = data.get("text")
        emitted = False
        for coding in data.get("coding", ()):
            if isinstance(coding, Mapping):
                row = _coding_row(param, coding, text)
                if row:
                    emitted = True
                    yield row
        folded = _fold(text)
        if not emitted and folded:
            yield TokenRow(param, None, None, folded)
    elif type_name == "Identifier":
        system, value = data.get("system"), data.get("value")
        if system or value:
            type_text = data.get("type", {}).get("text") if isinstance(data.get("type"), Mapping) else None
            yield TokenRow(param, system, value, _fold(type_text))
    elif type_name == "ContactPoint":
        # The token of a ContactPoint is its value; ContactPoint.system (phone, email) is not a
        # code system, and the ``phone``/``email`` parameters already select by it.
        value = data.get("value")
        if isinstance(value, str) and value:
            yield TokenRow(param, None, value)


def _coding_row(param: str, coding: Mapping[str, Any], text: Any) -> TokenRow | None:
    system, code = coding.get("system"), coding.get("code")
    if not system and not code:
        return None
    # One text column per row: the CodeableConcept.text when there is one, else the display.
    return TokenRow(param, system, code, _fold(text) or _fold(coding.get("display")))


def _string_row(param: str, value: Any) -> StringRow | None:
    if not isinstance(value, str):
        return None
    folded = normalize_string(value)[:STRING_MAX]
    return StringRow(param, folded, value) if folded else None


_NAME_PARTS = ("family", "given", "prefix", "suffix", "text")
_ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")


def string_rows(param: str, type_name: str, data: Any) -> Iterator[StringRow]:
    """https://hl7.org/fhir/R4/search.html#string: each part of a name or an address on its own."""
    if type_name in _STRING_TYPES:
        row = _string_row(param, data)
        if row:
            yield row
        return
    if not isinstance(data, Mapping):
        return
    if type_name == "HumanName":
        parts: tuple[str, ...] = _NAME_PARTS
    elif type_name == "Address":
        parts = _ADDRESS_PARTS
    elif type_name == "CodeableConcept":
        parts = ("text",)
    else:
        return
    for part in parts:
        value = data.get(part)
        for item in value if isinstance(value, list) else (value,):
            row = _string_row(param, item)
            if row:
                yield row


def date_rows(param: str, type_name: str, data: Any) -> Iterator[DateRow]:
    """https://hl7.org/fhir/R4/search.html#date: the implicit range of a date, a Period's span,
    a Timing's outer limits."""
    if type_name in _DATE_TYPES or type_name == "string":
        bounds = _range(data) if isinstance(data, str) else None
        if bounds:
            yield DateRow(param, *bounds)
        return
    if not isinstance(data, Mapping):
        return
    if type_name == "Period":
        row = _period_row(param, data)
        if row:
            yield row
    elif type_name == "Timing":
        lows: list[datetime | None] = []
        highs: list[datetime | None] = []
        for event in data.get("event", ()):
            bounds = _range(event) if isinstance(event, str) else None
            if bounds:
                lows.append(bounds[0])
                highs.append(bounds[1])
        repeat = data.get("repeat")
        bounds_period = repeat.get("boundsPeriod") if isinstance(repeat, Mapping) else None
        if isinstance(bounds_period, Mapping):
            period = _period_row(param, bounds_period)
            if period:
                lows.append(period.low)
                highs.append(period.high)
        if lows:
            low = None if None in lows else min(x for x in lows if x is not None)
            high = None if None in highs else max(x for x in highs if x is not None)
            yield DateRow(param, low, high)


def _period_row(param: str, period: Mapping[str, Any]) -> DateRow | None:
    start, end = period.get("start"), period.get("end")
    low_bounds = _range(start) if isinstance(start, str) else None
    high_bounds = _range(end) if isinstance(end, str) else None
    if low_bounds is None and high_bounds is None:
        return None
    return DateRow(param, low_bounds[0] if low_bounds else None, high_bounds[1] if high_bounds else None)


def number_rows(param: str, type_name: str, data: Any) -> Iterator[NumberRow]:
    """https://hl7.org/fhir/R4/search.html#number: a number with its implicit precision range."""
    if type_name not in _NUMBER_TYPES:
        return
    value = _decimal(data)
    if value is not None:
        yield NumberRow(param, value, *decimal_range(value))


def quantity_rows(param: str, type_name: str, data: Any) -> Iterator[NumberRow]:
    """https://hl7.org/fhir/R4/search.html#quantity: Quantity (and its profiles), Money, Range.

    A Quantity's ``comparator`` is not indexed: the row holds the stated value's range.
    """
    if not isinstance(data, Mapping):
        if type_name in _NUMBER_TYPES:
            yield from number_rows(param, type_name, data)
        return
    if type_name in _QUANTITY_TYPES:
        value = _decimal(data.get("value"))
        if value is not None:
            yield NumberRow(
                param, value, *decimal_range(value), data.get("system"), data.get("code"), data.get("unit")
            )
    elif type_name == "Money":
        value = _decimal(data.get("value"))
        if value is not None:
            yield NumberRow(param, value, *decimal_range(value), ISO_4217, data.get("currency"))
    elif type_name == "Range":
        low_q, high_q = data.get("low"), data.get("high")
        low = _decimal(low_q.get("value")) if isinstance(low_q, Mapping) else None
        high = _decimal(high_q.get("value")) if isinstance(high_q, Mapping) else None
        value = low if low is not None else high
        if value is None:
            return
        ends = [q for q in (low_q, high_q) if isinstance(q, Mapping) and q.get("value") is not None]
        # An open end is unbounded; infinities survive the store's float columns.
        yield NumberRow(
            param,
            value,
            low if low is not None else Decimal("-Infinity"),
            high if high is not None else Decimal("Infinity"),
            ends[0].get("system"),
            ends[0].get("code"),
            ends[0].get("unit"),
        )


def parse_reference(reference: str, canonical: bool = False) -> ReferenceRow | None:
    """Split a literal reference or a canonical into the parts a reference search compares.

    ``Patient/1`` and ``Patient/1/_history/2`` are local; ``http://host/fhir/Patient/1`` keeps
    its URL and also yields type and id; ``#x`` (contained) yields nothing;
    ``http://x/Questionnaire/q|1.0`` is a canonical with a version.
    See https://hl7.org/fhir/R4/references.html#literal and
    https://hl7.org/fhir/R4/references.html#canonical.
    """
    if not reference or reference.startswith("#"):
        return None
    version = None
    if canonical and "|" in reference:
        reference, version = reference.split("|", 1)
        version = version or None
    match = _REFERENCE.match(reference)
    if match is None:
        return ReferenceRow("", None, None, url=reference, canonical_version=version)
    if match["base"] is None and not canonical:
        return ReferenceRow("", match["type"], match["id"], match["version"])
    url = reference if match["version"] is None else reference.rsplit("/_history/", 1)[0]
    if match["base"] is None:
        # A relative canonical: no server base to keep, so it is searched as a local reference.
        return ReferenceRow("", match["type"], match["id"], match["version"], canonical_version=version)
    return ReferenceRow("", match["type"], match["id"], match["version"], url=url, canonical_version=version)


def reference_rows(param: str, type_name: str, data: Any) -> Iterator[IndexRow]:
    """https://hl7.org/fhir/R4/search.html#reference: Reference.reference, canonical and uri values.

    ``Reference.identifier`` is indexed as a token under ``<param>:identifier`` for the
    ``:identifier`` modifier (https://hl7.org/fhir/R4/search.html#modifiers).
    """
    if type_name == "Reference" and isinstance(data, Mapping):
        identifier = data.get("identifier")
        if isinstance(identifier, Mapping) and isinstance(identifier.get("value"), str):
            system = identifier.get("system")
            yield TokenRow(
                param + IDENTIFIER_SUFFIX, system if isinstance(system, str) else None, identifier["value"]
            )
        reference = data.get("reference")
        if not isinstance(reference, str):
            return  # a logical reference (identifier only) has no target to index
        row = parse_reference(reference)
        if row is None:
            return
        if row.target_type is None and isinstance(data.get("type"), str):
            # ``urn:uuid:`` and other non-RESTful URLs: Reference.type still names the target type.
            row = ReferenceRow(param, data["type"], None, url=row.url)
        yield _with_param(row, param)
    elif type_name in _STRING_TYPES and isinstance(data, str):
        row = parse_reference(data, canonical=type_name in ("canonical", "string"))
        if row:
            yield _with_param(row, param)


def _with_param(row: ReferenceRow, param: str) -> ReferenceRow:
    return ReferenceRow(
        param, row.target_type, row.target_id, row.target_version, row.url, row.canonical_version
    )


def uri_rows(param: str, type_name: str, data: Any) -> Iterator[UriRow]:
    """https://hl7.org/fhir/R4/search.html#uri: the uri, url, canonical (or other string) value."""
    if type_name in _STRING_TYPES and isinstance(data, str) and data:
        yield UriRow(param, data)


_Converter = Callable[[str, str, Any], Iterator[IndexRow]]
CONVERTERS: dict[str, _Converter] = {
    "token": token_rows,
    "string": string_rows,
    "date": date_rows,
    "number": number_rows,
    "quantity": quantity_rows,
    "reference": reference_rows,
    "uri": uri_rows,
}
# The second component of a composite: the types a CompositeRow can hold.
_COMPOSITE_SECOND = frozenset({"token", "quantity", "number", "date", "string"})


def _composite_second(row: IndexRow) -> dict[str, Any] | None:
    if isinstance(row, TokenRow):
        return None if row.code is None else {"c2_system": row.system, "c2_code": row.code}
    if isinstance(row, NumberRow):
        return {"c2_low": row.low, "c2_high": row.high, "c2_system": row.system, "c2_code": row.code}
    if isinstance(row, DateRow):
        return {"c2_date_low": row.low, "c2_date_high": row.high}
    if isinstance(row, StringRow):
        return {"c2_string": row.value}
    return None


# --------------------------------------------------------------------------------------------
# Compiled parameters


@dataclass(slots=True, eq=False)
class _Branch:
    """One compiled top-level union branch, shared by every parameter of a type that uses it,
    so that it is evaluated once per resource."""

    text: str
    evaluate: _Evaluate


@dataclass(frozen=True, slots=True)
class _Use:
    """A branch as one parameter uses it."""

    branch: _Branch
    # Each set must meet the keys of the resource, or the branch cannot yield anything.
    requires: tuple[frozenset[str], ...]
    # ``X.where(resolve() is T)`` runs as the (shared) ``X``; the rows then keep target type T.
    target_type: str | None = None


@dataclass(slots=True, eq=False)
class _Component:
    type: str
    expression: str
    evaluate: _Evaluate
    # The union of its branches' first steps, for a cheap pre-check on each base node.
    elements: tuple[tuple[str, str | None], ...] | None

    def present_in(self, path: str, data: Mapping[str, Any]) -> bool:
        if self.elements is None:
            return True
        return _present((_union_keys(path, self.elements),), data)


@lru_cache(maxsize=4096)
def _union_keys(path: str, steps: tuple[tuple[str, str | None], ...]) -> frozenset[str]:
    return frozenset().union(*(element_keys(path, *step) for step in steps))


@dataclass(slots=True, eq=False)
class _Param:
    code: str
    type: str
    uses: tuple[_Use, ...]
    components: tuple[_Component, ...] = ()


_RESOLVE_IS = re.compile(r"^(?P<path>.+)\.where\(\s*resolve\(\)\s*is\s+(?P<type>[A-Z]\w*)\s*\)$")


class _Evaluation:
    """The memory of one ``extract`` call: branch and component results by identity."""

    __slots__ = ("branches", "components")

    def __init__(self) -> None:
        self.branches: dict[int, list[Any]] = {}
        self.components: dict[tuple[int, int], list[Any]] = {}

    def run(self, use: _Use, resource: Mapping[str, Any]) -> list[Any]:
        if use.requires and not _present(use.requires, resource):
            return []
        key = id(use.branch)
        found = self.branches.get(key)
        if found is None:
            found = self.branches[key] = use.branch.evaluate(resource)
        return found

    def component(self, component: _Component, node: Any) -> list[Any]:
        key = (id(component.evaluate), id(node.data))
        found = self.components.get(key)
        if found is None:
            found = self.components[key] = component.evaluate(node)
        return found


class IndexExtractor:
    """Evaluates the indexed SearchParameters of a resource into index rows.

    Expressions are compiled once per resource type, on first use (or by :meth:`prepare`).
    A parameter fhirpathpy cannot handle is skipped and listed in :attr:`unsupported`; it
    never fails a write.
    """

    def __init__(self, registry: SearchParamRegistry) -> None:
        self.registry = registry
        self._plans: dict[str, tuple[_Param, ...]] = {}
        self._unsupported: dict[tuple[str, str], str] = {}
        self._failed: set[tuple[str, str]] = set()

    @property
    def unsupported(self) -> list[tuple[str, str, str]]:
        """``(resource type, code, reason)`` of the parameters skipped so far (see :meth:`prepare`)."""
        return [(t, c, reason) for (t, c), reason in self._unsupported.items()]

    def prepare(self, resource_types: Iterable[str] | None = None) -> None:
        """Compile the plans now (all supported types by default) instead of on first write."""
        for resource_type in SUPPORTED_TYPES if resource_types is None else resource_types:
            if resource_type not in self._plans:
                self._plan(resource_type)

    def extract(self, resource: Mapping[str, Any]) -> list[IndexRow]:
        """The deduplicated index rows of ``resource`` for every indexed parameter of its type."""
        resource_type = resource.get("resourceType")
        if not isinstance(resource_type, str):
            return []
        plan = self._plans.get(resource_type)
        if plan is None:
            plan = self._plan(resource_type)
        # fhirpathpy's ``ofType`` consults a class-wide model that only ``is``/``as`` set; without it
        # ``Age`` is not a ``Quantity``.
        TypeInfo.model = MODEL  # type: ignore[assignment]
        evaluation = _Evaluation()
        rows: dict[IndexRow, None] = {}
        for param in plan:
            try:
                if param.components:
                    self._composite(param, resource, evaluation, rows)
                    continue
                convert = CONVERTERS[param.type]
                for use in param.uses:
                    for type_name, data in _values(evaluation.run(use, resource)):
                        for row in convert(param.code, type_name, data):
                            if use.target_type is None or (
                                isinstance(row, ReferenceRow) and row.target_type == use.target_type
                            ):
                                rows[row] = None
            except Exception as exc:  # one parameter must never fail a write
                key = (resource_type, param.code)
                if key not in self._failed:
                    self._failed.add(key)
                    log.warning("search parameter %s.%s failed: %s", resource_type, param.code, exc)
        return list(rows)

    @staticmethod
    def _composite(
        param: _Param, resource: Mapping[str, Any], evaluation: _Evaluation, rows: dict[IndexRow, None]
    ) -> None:
        first, second = param.components
        first_convert, second_convert = CONVERTERS[first.type], CONVERTERS[second.type]
        for use in param.uses:
            for node in evaluation.run(use, resource):
                if not isinstance(node, ResourceNode) or not isinstance(node.data, Mapping):
                    continue
                path = node.path if isinstance(node.path, str) else ""
                if not (first.present_in(path, node.data) and second.present_in(path, node.data)):
                    continue
                firsts = [
                    row
                    for type_name, data in _values(evaluation.component(first, node))
                    for row in first_convert(param.code, type_name, data)
                    if isinstance(row, TokenRow) and row.code is not None
                ]
                if not firsts:
                    continue
                seconds = [
                    fields
                    for type_name, data in _values(evaluation.component(second, node))
                    for row in second_convert(param.code, type_name, data)
                    if (fields := _composite_second(row)) is not None
                ]
                for token in firsts:
                    for fields in seconds:
                        rows[CompositeRow(param.code, token.system, token.code, **fields)] = None

    def _plan(self, resource_type: str) -> tuple[_Param, ...]:
        shared: dict[str, _Branch] = {}
        params: list[_Param] = []
        for definition in self.registry.indexed(resource_type):
            try:
                params.append(self._compile(definition, resource_type, shared))
            except UnsupportedExpression as exc:
                self._unsupported[(resource_type, definition.code)] = str(exc)
                log.debug("search parameter %s.%s not indexed: %s", resource_type, definition.code, exc)
        plan = tuple(params)
        self._plans[resource_type] = plan
        return plan

    def _compile(self, definition: SearchParamDef, resource_type: str, shared: dict[str, _Branch]) -> _Param:
        if not definition.expression:
            raise UnsupportedExpression("no expression")
        if definition.type == "composite":
            components = self._components(definition, resource_type)
        elif definition.type in CONVERTERS:
            components = ()
        else:
            raise UnsupportedExpression(f"parameter type {definition.type} is not indexed")
        uses = []
        for text in split_union(rewrite_expression(definition.expression)):
            target_type = None
            match = _RESOLVE_IS.match(text) if definition.type == "reference" else None
            if match:
                text, target_type = match["path"].strip(), match["type"]
            branch = shared.get(text)
            if branch is None:
                branch = shared[text] = _Branch(text, compile_expression(text))
            uses.append(_Use(branch, self._requires(text, resource_type, components), target_type))
        return _Param(definition.code, definition.type, tuple(uses), components)

    @staticmethod
    def _requires(
        text: str, resource_type: str, components: Sequence[_Component]
    ) -> tuple[frozenset[str], ...]:
        if components and text.strip("() ") == resource_type:
            # The composite starts at the resource itself (``Observation``): it needs what each
            # component needs.
            return tuple(_union_keys(resource_type, c.elements) for c in components if c.elements is not None)
        keys = _branch_requirement(text, resource_type)
        return () if keys is None else (keys,)

    def _components(self, definition: SearchParamDef, resource_type: str) -> tuple[_Component, ...]:
        if len(definition.components) != 2:
            raise UnsupportedExpression(f"{len(definition.components)} components (2 are indexed)")
        compiled = []
        for position, component in enumerate(definition.components):
            target = self.registry.by_url(component.definition_url, resource_type)
            if target is None:
                raise UnsupportedExpression(f"component {component.definition_url} is not defined")
            allowed = {"token"} if position == 0 else _COMPOSITE_SECOND
            if target.type not in allowed:
                raise UnsupportedExpression(f"component of type {target.type} cannot be indexed")
            expression = rewrite_expression(component.expression)
            steps = [first_element(b) for b in split_union(expression)]
            elements = None if None in steps else tuple(s for s in steps if s is not None)
            compiled.append(_Component(target.type, expression, compile_expression(expression), elements))
        return tuple(compiled)


@cache
def default_extractor() -> IndexExtractor:
    return IndexExtractor(default_registry())
