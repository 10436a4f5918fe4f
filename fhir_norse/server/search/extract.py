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

fhirpathpy stays the reference, but the rewritten expressions are evaluated by
:mod:`.fastpath` (plain Python over the JSON, the same items with the same types, fhirpathpy
whenever the data leaves what it reproduces); ``IndexExtractor(registry, fast=False)`` evaluates
everything with fhirpathpy. Each write then does the work once for all the parameters that share
it: a branch is evaluated once (and path prefixes such as ``Observation.component`` once for all
branches), a value is converted once into row templates for every parameter of a type indexing it
and for the composites whose components reach it, and short strings, dates, numbers, references
and whole rows are converted once per process (bounded caches).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
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

from fhir_norse.outcomes import BadRequest
from fhir_norse.server.search.fastpath import FastEvaluator, Node, NotCompiled, as_resource_node, compile_fast
from fhir_norse.store.resource_types import SUPPORTED_TYPES
from fhir_norse.store.rows import (
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
from fhir_norse.store.search.params import SearchParamDef, SearchParamRegistry, default_registry, split_union
from fhir_norse.store.search.values import date_range, decimal_range, normalize_string

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
def _checked_tree(expression: str) -> Mapping[str, Any]:
    """The parse tree of an expression fhirpathpy can evaluate (or :class:`UnsupportedExpression`)."""
    errors = _syntax_errors(expression)
    if errors:
        raise UnsupportedExpression(f"cannot parse: {'; '.join(errors)}")
    try:
        tree: Mapping[str, Any] = _parse(expression)
    except Exception as exc:  # the ANTLR lexer raises plain Exceptions
        raise UnsupportedExpression(f"cannot parse: {exc}") from exc
    for name, count in _functions(tree):
        known = cast("Mapping[str, Any] | None", _USER_FUNCTIONS.get(name) or invocation_registry.get(name))
        if known is None:
            raise UnsupportedExpression(f"function {name}() is not implemented by fhirpathpy")
        if "variadic" not in known and count not in known.get("arity", {0: ()}):
            raise UnsupportedExpression(f"function {name}() does not take {count} argument(s)")
    return tree


@lru_cache(maxsize=4096)
def compile_expression(expression: str) -> _Evaluate:
    """Compile a rewritten expression once: fhirpathpy's parser takes about a millisecond."""
    _checked_tree(expression)
    compiled = fhirpathpy.compile(expression, MODEL, _OPTIONS)
    return lambda resource: compiled(resource, None)


@lru_cache(maxsize=4096)
def _fhirpathpy_on_nodes(expression: str) -> _Evaluate:
    """fhirpathpy's evaluation, also of the :class:`.fastpath.Node` items of a fast result."""
    compiled = compile_expression(expression)
    return lambda target: compiled(as_resource_node(target))


@lru_cache(maxsize=4096)
def compile_fast_expression(expression: str) -> FastEvaluator | None:
    """The plain-Python evaluator of an expression (see :mod:`.fastpath`), ``None`` when its shape
    is left to fhirpathpy; compiled once. Raises :class:`UnsupportedExpression` as
    :func:`compile_expression` does."""
    tree = _checked_tree(expression)
    try:
        return compile_fast(tree, MODEL, _USER_FUNCTIONS, lambda: compile_expression(expression))
    except NotCompiled as exc:
        log.debug("%s is evaluated by fhirpathpy: %s", expression, exc)
        return None


def _evaluator(expression: str, fast: bool) -> tuple[_Evaluate, FastEvaluator | None]:
    """The evaluator of a rewritten expression, and the same when it is the fast one."""
    if fast:
        compiled = compile_fast_expression(expression)
        if compiled is not None:
            return compiled, compiled
    return _fhirpathpy_on_nodes(expression), None


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
    keys = data.keys()
    for needed in requires:  # noqa: SIM110 (a loop: called for every parameter of every write)
        if keys.isdisjoint(needed):
            return False
    return True


# --------------------------------------------------------------------------------------------
# fhirpathpy results -> (FHIR type, JSON value)


def _typed(item: Any) -> tuple[str | None, Any] | None:
    """The FHIR type (``None`` when only the JSON shape tells) and value of one result item."""
    if type(item) is Node or isinstance(item, ResourceNode):
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
        if type(item) is Node:
            # ``_typed`` of the items of fast results, inline.
            data = item.data
            if data is None:
                continue
            name = item.path
            if not isinstance(name, str) or "." in name:
                name = None
            elif name == "Extension":
                typed = _extension_value(data)
                if typed is None:
                    continue
                name, data = typed
                if data is None:
                    continue
        else:
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


_Number = tuple[Decimal, Decimal, Decimal]


def _number(value: Any) -> _Number | None:
    """A number with its implicit range (:func:`.values.decimal_range`), ``None`` for what is not
    a finite number."""
    kind = type(value)
    # Equal ints, floats (but 0.0 and -0.0) and strings have equal digits: those are converted once.
    if (kind is float and value) or kind is int or kind is str:
        return _cached_number(kind.__name__, value)
    return _convert_number(value)


def _convert_number(value: Any) -> _Number | None:
    number = _decimal(value)
    return None if number is None else (number, *decimal_range(number))


@lru_cache(maxsize=16384)
def _cached_number(kind: str, value: Any) -> _Number | None:
    return _convert_number(value)


# Folding is the costliest part of converting values, and the same codes, displays and texts come
# back on every write: short strings are folded once, as are dates and references below.
_FOLD_CACHED = 256
_folded = lru_cache(maxsize=16384)(normalize_string)


def _normalized(text: str) -> str:
    return _folded(text) if len(text) <= _FOLD_CACHED else normalize_string(text)


def _fold(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    folded = _normalized(text)
    return folded or None


@lru_cache(maxsize=16384)
def _range(value: str) -> tuple[datetime, datetime] | None:
    try:
        return date_range(value)
    except BadRequest:
        return None


# --------------------------------------------------------------------------------------------
# Conversions by parameter type (https://hl7.org/fhir/R4/search.html#ptypes)
#
# Each conversion gives the rows of a value as templates: the row's class, what is appended to
# the parameter's code (``:identifier``) and the other fields. The extractor converts a value once
# for every parameter that indexes it (``code`` and ``combo-code``) and composites take fields
# from them; ``token_rows`` and the like give the rows of one parameter.

_Template = tuple[Callable[..., IndexRow], str, tuple[Any, ...]]
_NO_SUFFIX = ""
# A template's fields are all the row's fields after ``param``, defaults included, so that equal
# rows have equal templates (see ``_row``).


def _token_templates(type_name: str, data: Any, out: list[_Template]) -> None:
    """https://hl7.org/fhir/R4/search.html#token: the token forms of each data type."""
    if type_name == "boolean":
        if isinstance(data, bool):
            out.append((TokenRow, _NO_SUFFIX, (None, "true" if data else "false", None)))
        return
    if type_name in _STRING_TYPES:
        if isinstance(data, str) and data:
            out.append((TokenRow, _NO_SUFFIX, (None, data, None)))
        return
    if type_name in _NUMBER_TYPES:
        if not isinstance(data, bool) and isinstance(data, int | float | Decimal):
            out.append((TokenRow, _NO_SUFFIX, (None, str(data), None)))
        return
    if not (type(data) is dict or isinstance(data, Mapping)):
        return
    if type_name == "Coding":
        fields = _coding_fields(data, None)
        if fields:
            out.append((TokenRow, _NO_SUFFIX, fields))
    elif type_name == "CodeableConcept":
        text = data.get("text")
        emitted = False
        for coding in data.get("coding", ()):
            if type(coding) is dict or isinstance(coding, Mapping):
                fields = _coding_fields(coding, text)
                if fields:
                    emitted = True
                    out.append((TokenRow, _NO_SUFFIX, fields))
        folded = _fold(text)
        if not emitted and folded:
            out.append((TokenRow, _NO_SUFFIX, (None, None, folded)))
    elif type_name == "Identifier":
        system, value = data.get("system"), data.get("value")
        if system or value:
            type_text = data.get("type", {}).get("text") if isinstance(data.get("type"), Mapping) else None
            out.append((TokenRow, _NO_SUFFIX, (system, value, _fold(type_text))))
    elif type_name == "ContactPoint":
        # The token of a ContactPoint is its value; ContactPoint.system (phone, email) is not a
        # code system, and the ``phone``/``email`` parameters already select by it.
        value = data.get("value")
        if isinstance(value, str) and value:
            out.append((TokenRow, _NO_SUFFIX, (None, value, None)))


def _coding_fields(coding: Mapping[str, Any], text: Any) -> tuple[Any, Any, str | None] | None:
    system, code = coding.get("system"), coding.get("code")
    if not system and not code:
        return None
    # One text column per row: the CodeableConcept.text when there is one, else the display.
    return system, code, _fold(text) or _fold(coding.get("display"))


def _string_fields(value: Any) -> tuple[str, str] | None:
    if not isinstance(value, str):
        return None
    folded = _normalized(value)[:STRING_MAX]
    return (folded, value) if folded else None


_NAME_PARTS = ("family", "given", "prefix", "suffix", "text")
_ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")


def _string_templates(type_name: str, data: Any, out: list[_Template]) -> None:
    """https://hl7.org/fhir/R4/search.html#string: each part of a name or an address on its own."""
    if type_name in _STRING_TYPES:
        fields = _string_fields(data)
        if fields:
            out.append((StringRow, _NO_SUFFIX, fields))
        return
    if not (type(data) is dict or isinstance(data, Mapping)):
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
            fields = _string_fields(item)
            if fields:
                out.append((StringRow, _NO_SUFFIX, fields))


def _date_templates(type_name: str, data: Any, out: list[_Template]) -> None:
    """https://hl7.org/fhir/R4/search.html#date: the implicit range of a date, a Period's span,
    a Timing's outer limits."""
    if type_name in _DATE_TYPES or type_name == "string":
        bounds = _range(data) if isinstance(data, str) else None
        if bounds:
            out.append((DateRow, _NO_SUFFIX, bounds))
        return
    if not (type(data) is dict or isinstance(data, Mapping)):
        return
    if type_name == "Period":
        span = _period_span(data)
        if span:
            out.append((DateRow, _NO_SUFFIX, span))
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
            span = _period_span(bounds_period)
            if span:
                lows.append(span[0])
                highs.append(span[1])
        if lows:
            low = None if None in lows else min(x for x in lows if x is not None)
            high = None if None in highs else max(x for x in highs if x is not None)
            out.append((DateRow, _NO_SUFFIX, (low, high)))


def _period_span(period: Mapping[str, Any]) -> tuple[datetime | None, datetime | None] | None:
    start, end = period.get("start"), period.get("end")
    low_bounds = _range(start) if isinstance(start, str) else None
    high_bounds = _range(end) if isinstance(end, str) else None
    if low_bounds is None and high_bounds is None:
        return None
    return low_bounds[0] if low_bounds else None, high_bounds[1] if high_bounds else None


def _number_templates(type_name: str, data: Any, out: list[_Template]) -> None:
    """https://hl7.org/fhir/R4/search.html#number: a number with its implicit precision range."""
    if type_name not in _NUMBER_TYPES:
        return
    number = _number(data)
    if number is not None:
        out.append((NumberRow, _NO_SUFFIX, (*number, None, None, None)))


def _quantity_templates(type_name: str, data: Any, out: list[_Template]) -> None:
    """https://hl7.org/fhir/R4/search.html#quantity: Quantity (and its profiles), Money, Range.

    A Quantity's ``comparator`` is not indexed: the row holds the stated value's range.
    """
    if not (type(data) is dict or isinstance(data, Mapping)):
        if type_name in _NUMBER_TYPES:
            _number_templates(type_name, data, out)
        return
    if type_name in _QUANTITY_TYPES:
        number = _number(data.get("value"))
        if number is not None:
            out.append(
                (NumberRow, _NO_SUFFIX, (*number, data.get("system"), data.get("code"), data.get("unit")))
            )
    elif type_name == "Money":
        number = _number(data.get("value"))
        if number is not None:
            out.append((NumberRow, _NO_SUFFIX, (*number, ISO_4217, data.get("currency"), None)))
    elif type_name == "Range":
        low_q, high_q = data.get("low"), data.get("high")
        low = _decimal(low_q.get("value")) if isinstance(low_q, Mapping) else None
        high = _decimal(high_q.get("value")) if isinstance(high_q, Mapping) else None
        value = low if low is not None else high
        if value is None:
            return
        ends = [q for q in (low_q, high_q) if isinstance(q, Mapping) and q.get("value") is not None]
        # An open end is unbounded; infinities survive the store's float columns.
        out.append(
            (
                NumberRow,
                _NO_SUFFIX,
                (
                    value,
                    low if low is not None else Decimal("-Infinity"),
                    high if high is not None else Decimal("Infinity"),
                    ends[0].get("system"),
                    ends[0].get("code"),
                    ends[0].get("unit"),
                ),
            )
        )


def parse_reference(reference: str, canonical: bool = False) -> ReferenceRow | None:
    """Split a literal reference or a canonical into the parts a reference search compares.

    ``Patient/1`` and ``Patient/1/_history/2`` are local; ``http://host/fhir/Patient/1`` keeps
    its URL and also yields type and id; ``#x`` (contained) yields nothing;
    ``http://x/Questionnaire/q|1.0`` is a canonical with a version.
    See https://hl7.org/fhir/R4/references.html#literal and
    https://hl7.org/fhir/R4/references.html#canonical.
    """
    parts = _reference_parts(reference, canonical)
    return None if parts is None else ReferenceRow("", *parts)


# ``ReferenceRow`` fields after ``param``: target_type, target_id, target_version, url and
# canonical_version.
_ReferenceParts = tuple[str | None, str | None, str | None, str | None, str | None]


@lru_cache(maxsize=16384)
def _reference_parts(reference: str, canonical: bool) -> _ReferenceParts | None:
    if not reference or reference.startswith("#"):
        return None
    version = None
    if canonical and "|" in reference:
        reference, version = reference.split("|", 1)
        version = version or None
    match = _REFERENCE.match(reference)
    if match is None:
        return None, None, None, reference, version
    if match["base"] is None and not canonical:
        return match["type"], match["id"], match["version"], None, None
    url = reference if match["version"] is None else reference.rsplit("/_history/", 1)[0]
    if match["base"] is None:
        # A relative canonical: no server base to keep, so it is searched as a local reference.
        return match["type"], match["id"], match["version"], None, version
    return match["type"], match["id"], match["version"], url, version


def _reference_templates(type_name: str, data: Any, out: list[_Template]) -> None:
    """https://hl7.org/fhir/R4/search.html#reference: Reference.reference, canonical and uri values.

    ``Reference.identifier`` is indexed as a token under ``<param>:identifier`` for the
    ``:identifier`` modifier (https://hl7.org/fhir/R4/search.html#modifiers).
    """
    if type_name == "Reference" and (type(data) is dict or isinstance(data, Mapping)):
        identifier = data.get("identifier")
        if (type(identifier) is dict or isinstance(identifier, Mapping)) and isinstance(
            identifier.get("value"), str
        ):
            system = identifier.get("system")
            out.append(
                (
                    TokenRow,
                    IDENTIFIER_SUFFIX,
                    (system if isinstance(system, str) else None, identifier["value"], None),
                )
            )
        reference = data.get("reference")
        if not isinstance(reference, str):
            return  # a logical reference (identifier only) has no target to index
        parts = _reference_parts(reference, False)
        if parts is None:
            return
        if parts[0] is None and isinstance(data.get("type"), str):
            # ``urn:uuid:`` and other non-RESTful URLs: Reference.type still names the target type.
            out.append((ReferenceRow, _NO_SUFFIX, (data["type"], None, None, parts[3], None)))
            return
        out.append((ReferenceRow, _NO_SUFFIX, parts))
    elif type_name in _STRING_TYPES and isinstance(data, str):
        parts = _reference_parts(data, type_name in ("canonical", "string"))
        if parts is not None:
            out.append((ReferenceRow, _NO_SUFFIX, parts))


def _uri_templates(type_name: str, data: Any, out: list[_Template]) -> None:
    """https://hl7.org/fhir/R4/search.html#uri: the uri, url, canonical (or other string) value."""
    if type_name in _STRING_TYPES and isinstance(data, str) and data:
        out.append((UriRow, _NO_SUFFIX, (data,)))


_Templates = Callable[[str, Any, list[_Template]], None]
TEMPLATES: dict[str, _Templates] = {
    "token": _token_templates,
    "string": _string_templates,
    "date": _date_templates,
    "number": _number_templates,
    "quantity": _quantity_templates,
    "reference": _reference_templates,
    "uri": _uri_templates,
}


def _rows(templates: _Templates, param: str, type_name: str, data: Any) -> Iterator[Any]:
    converted, error = _convert(templates, type_name, data)
    for make, suffix, fields in converted:
        yield make(param + suffix, *fields)
    if error is not None:
        raise error


def _convert(templates: _Templates, type_name: str, data: Any) -> tuple[list[_Template], Exception | None]:
    """The row templates of a value, and the error that stopped the conversion (what came before
    it is kept: one value never fails a parameter's other values, as before templates)."""
    converted: list[_Template] = []
    try:
        templates(type_name, data, converted)
    except Exception as exc:
        return converted, exc
    return converted, None


def token_rows(param: str, type_name: str, data: Any) -> Iterator[TokenRow]:
    """The token rows of a value (see :func:`_token_templates`)."""
    return _rows(_token_templates, param, type_name, data)


def string_rows(param: str, type_name: str, data: Any) -> Iterator[StringRow]:
    """The string rows of a value (see :func:`_string_templates`)."""
    return _rows(_string_templates, param, type_name, data)


def date_rows(param: str, type_name: str, data: Any) -> Iterator[DateRow]:
    """The date rows of a value (see :func:`_date_templates`)."""
    return _rows(_date_templates, param, type_name, data)


def number_rows(param: str, type_name: str, data: Any) -> Iterator[NumberRow]:
    """The number rows of a value (see :func:`_number_templates`)."""
    return _rows(_number_templates, param, type_name, data)


def quantity_rows(param: str, type_name: str, data: Any) -> Iterator[NumberRow]:
    """The quantity rows of a value (see :func:`_quantity_templates`)."""
    return _rows(_quantity_templates, param, type_name, data)


def reference_rows(param: str, type_name: str, data: Any) -> Iterator[IndexRow]:
    """The reference rows of a value, and the ``:identifier`` tokens of a Reference (see
    :func:`_reference_templates`)."""
    return _rows(_reference_templates, param, type_name, data)


def uri_rows(param: str, type_name: str, data: Any) -> Iterator[UriRow]:
    """The uri rows of a value (see :func:`_uri_templates`)."""
    return _rows(_uri_templates, param, type_name, data)


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
# Rows by ``(class, param, fields)``: the same codes, references and dates come back on every write,
# and a row (immutable) is built once. Equal keys are equal rows, so rows are deduplicated by key.
# Free text (string rows, long values) is not kept.
_RowKey = tuple[Callable[..., IndexRow], str, tuple[Any, ...]]
_ROWS: dict[_RowKey, IndexRow] = {}
_ROWS_KEPT = 16384
_ROW_TEXT_KEPT = 256


def _row(key: _RowKey) -> IndexRow:
    row = _ROWS.get(key)
    if row is None:
        make, param, fields = key
        row = make(param, *fields)
        if make is StringRow:
            return row
        for field_value in fields:
            if type(field_value) is str and len(field_value) > _ROW_TEXT_KEPT:
                return row
        if len(_ROWS) >= _ROWS_KEPT:
            _ROWS.clear()
        _ROWS[key] = row
    return row


# The second component of a composite: the types a CompositeRow can hold.
_COMPOSITE_SECOND = frozenset({"token", "quantity", "number", "date", "string"})


# ``CompositeRow`` fields after ``c1_code``: c2_system, c2_code, c2_low, c2_high, c2_date_low,
# c2_date_high and c2_string.
_Second = tuple[Any, Any, Any, Any, Any, Any, Any]


def _composite_second(make: Callable[..., IndexRow], fields: tuple[Any, ...]) -> _Second | None:
    """The second component's part of a :class:`CompositeRow`, from a row template."""
    if make is TokenRow:
        system, code = fields[0], fields[1]
        return None if code is None else (system, code, None, None, None, None, None)
    if make is NumberRow:
        _, low, high, system, code, _ = fields
        return (system, code, low, high, None, None, None)
    if make is DateRow:
        return (None, None, None, None, fields[0], fields[1], None)
    if make is StringRow:
        return (None, None, None, None, None, None, fields[0])
    return None


# --------------------------------------------------------------------------------------------
# Compiled parameters


@dataclass(slots=True, eq=False)
class _Branch:
    """One compiled top-level union branch, shared by every parameter of a type that uses it,
    so that it is evaluated once per resource."""

    text: str
    evaluate: _Evaluate
    # The same, when evaluated by :mod:`.fastpath` (else by fhirpathpy).
    fast: FastEvaluator | None = None
    # Where an extraction keeps its result (``_Evaluation.branches``).
    slot: int = 0


@dataclass(frozen=True, slots=True)
class _Use:
    """A branch as one parameter uses it."""

    branch: _Branch
    # Each set must meet the keys of the resource, or the branch cannot yield anything.
    requires: tuple[frozenset[str], ...]
    # ``X.where(resolve() is T)`` runs as the (shared) ``X``; the rows then keep target type T.
    target_type: str | None = None
    # Where an extraction keeps the row templates of the branch for this parameter's type
    # (``_Evaluation.converted``): shared by the parameters of that type using the branch.
    slot: int = 0


@dataclass(slots=True, eq=False)
class _Component:
    type: str
    expression: str
    evaluate: _Evaluate
    # The union of its branches' first steps, for a cheap pre-check on each base node.
    elements: tuple[tuple[str, str | None], ...] | None
    fast: FastEvaluator | None = None
    # ``_union_keys`` of ``elements`` by the type path of the node.
    keys: dict[str, tuple[frozenset[str], ...]] = field(default_factory=dict)

    def present_in(self, path: str, data: Mapping[str, Any]) -> bool:
        if self.elements is None:
            return True
        keys = self.keys.get(path)
        if keys is None:
            keys = self.keys[path] = (_union_keys(path, self.elements),)
        return _present(keys, data)


@lru_cache(maxsize=4096)
def _union_keys(path: str, steps: tuple[tuple[str, str | None], ...]) -> frozenset[str]:
    return frozenset().union(*(element_keys(path, *step) for step in steps))


@dataclass(slots=True, eq=False)
class _Param:
    code: str
    type: str
    uses: tuple[_Use, ...]
    components: tuple[_Component, ...] = ()
    # Each set must meet the keys of the resource, or no use yields anything: the parameter is
    # skipped at once (the requirements of a single use move here).
    needs: tuple[frozenset[str], ...] = ()
    # The number of the pair of components (expressions and types): composites with the same pair
    # give the same combinations on a node.
    pair: int = -1

    @property
    def fast(self) -> bool:
        return all(u.branch.fast is not None for u in self.uses) and all(
            c.fast is not None for c in self.components
        )


_RESOLVE_IS = re.compile(r"^(?P<path>.+)\.where\(\s*resolve\(\)\s*is\s+(?P<type>[A-Z]\w*)\s*\)$")


# Pairs of composite components, numbered (see ``_Param.pair``).
_PAIRS: dict[tuple[_Evaluate, str, _Evaluate, str], int] = {}
_PAIRS_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class _Plan:
    params: tuple[_Param, ...]
    # The number of branches and of (branch, parameter type) pairs (see ``_Evaluation``).
    branches: int
    converted: int


class _Evaluation:
    """The memory of one ``extract`` call: what branches and components evaluate to, and what
    their values convert to, each computed once for all the parameters using it."""

    __slots__ = ("branches", "combinations", "converted", "paths", "values")

    def __init__(self, plan: _Plan) -> None:
        # By ``_Branch.slot``.
        self.branches: list[list[Any] | None] = [None] * plan.branches
        # The results of the path prefixes the fast branches share (see ``FastEvaluator.shared``).
        self.paths: dict[int, list[Any]] = {}
        # The row templates of a branch's values by parameter type, with the error that stopped
        # the conversion (the rows before it are kept, as a parameter's own conversion keeps them).
        # By ``_Use.slot``.
        self.converted: list[tuple[list[_Template], Exception | None] | None] = [None] * plan.converted
        # The same of one value (an element of the resource: kept here so that its id stays its own).
        self.values: dict[tuple[str, str, int], tuple[Any, list[_Template], Exception | None]] = {}
        # What a composite's components give on a node: ``Observation.component`` for both
        # ``combo-code-value-quantity`` and ``component-code-value-quantity``.
        self.combinations: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}

    def run(self, use: _Use, resource: Mapping[str, Any]) -> list[Any]:
        if use.requires and not _present(use.requires, resource):
            return []
        branch = use.branch
        found = self.branches[branch.slot]
        if found is None:
            if branch.fast is not None:
                found = branch.fast.shared(resource, self.paths)
            else:
                found = branch.evaluate(resource)
            self.branches[branch.slot] = found
        return found

    def convert(self, kind: str, type_name: str, data: Any) -> tuple[list[_Template], Exception | None]:
        """The row templates of one value for parameters of type ``kind``, and the error that
        stopped the conversion. Elements that composite components also convert are converted once."""
        if type(data) is dict and kind in _COMPOSITE_SECOND:
            key = (kind, type_name, id(data))
            found = self.values.get(key)
            if found is None:
                found = self.values[key] = (data, *_convert(TEMPLATES[kind], type_name, data))
            return found[1], found[2]
        return _convert(TEMPLATES[kind], type_name, data)

    def templates(
        self, use: _Use, kind: str, resource: Mapping[str, Any]
    ) -> tuple[list[_Template], Exception | None]:
        """The row templates of the values of a use's branch for parameters of type ``kind``."""
        found = self.converted[use.slot]
        if found is None:
            templates: list[_Template] = []
            error: Exception | None = None
            try:
                for type_name, data in self._values(use, resource):
                    converted, error = self.convert(kind, type_name, data)
                    templates.extend(converted)
                    if error is not None:
                        break
            except Exception as exc:
                error = exc
            found = self.converted[use.slot] = (templates, error)
        return found

    def _values(self, use: _Use, resource: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
        """The typed values of a use's branch: read straight off the resource when the fast path
        can (see ``FastEvaluator.typed``), else from its evaluation."""
        fast = use.branch.fast
        if fast is not None:
            if use.requires and not _present(use.requires, resource):
                return ()
            typed = fast.typed(resource)
            if typed is not None:
                return typed
        return _values(self.run(use, resource))

    def combined(self, param: _Param, node: Any) -> list[tuple[Any, ...]]:
        """The fields after ``param`` of the rows of a composite on a node: the first component's
        system and code, then the second component's part."""
        path = node.path if isinstance(node.path, str) else ""
        key = (param.pair, id(node.data), path)
        found = self.combinations.get(key)
        if found is None:
            found = []
            data = node.data
            first, second = param.components
            if first.present_in(path, data) and second.present_in(path, data):
                firsts = [
                    (fields[0], fields[1])
                    for make, _, fields in self._component_templates(first, node)
                    if make is TokenRow and fields[1] is not None
                ]
                if firsts:
                    seconds = [
                        fields
                        for make, _, templated in self._component_templates(second, node)
                        if (fields := _composite_second(make, templated)) is not None
                    ]
                    found = [(system, code, *fields) for system, code in firsts for fields in seconds]
            self.combinations[key] = found
        return found

    def _component_templates(self, component: _Component, node: Any) -> list[_Template]:
        templates: list[_Template] = []
        typed = component.fast.typed(node) if component.fast is not None else None
        for type_name, data in _values(component.evaluate(node)) if typed is None else typed:
            converted, error = self.convert(component.type, type_name, data)
            if error is not None:
                raise error
            templates.extend(converted)
        return templates


def _contained_questionnaire(resource: Mapping[str, Any], rows: dict[_RowKey, IndexRow]) -> None:
    """A response to a form it contains (SDC adaptive forms: ``questionnaire`` = ``#q``) is also found
    by the canonical the form derives from, so ``QuestionnaireResponse?questionnaire=<url>`` finds
    adaptive responses too."""
    reference = resource.get("questionnaire")
    if not isinstance(reference, str) or not reference.startswith("#"):
        return
    for contained in resource.get("contained") or []:
        if isinstance(contained, Mapping) and f"#{contained.get('id')}" == reference:
            for canonical in (contained.get("derivedFrom") or [])[:1]:
                if isinstance(canonical, str):
                    converted, _ = _convert(_reference_templates, "canonical", canonical)
                    for make, suffix, fields in converted:
                        key = (make, "questionnaire" + suffix, fields)
                        rows[key] = _row(key)


# A known shape: the parameter codes its function gives rows for, and the function (None: the resource
# is not of that shape after all, and the generic plan indexes it).
KnownShape = tuple[frozenset[str], Callable[[Mapping[str, Any]], "list[IndexRow] | None"]]


class IndexExtractor:
    """Evaluates the indexed SearchParameters of a resource into index rows.

    Expressions are compiled once per resource type, on first use (or by :meth:`prepare`).
    A parameter fhirpathpy cannot handle is skipped and listed in :attr:`unsupported`; it
    never fails a write.

    With ``fast`` (the default) the expressions of the common shapes are evaluated by
    :mod:`.fastpath`, which gives what fhirpathpy gives many times faster; ``fast=False``
    evaluates everything with fhirpathpy (the reference the fast path is tested against). With
    ``known_shapes`` (and ``fast``) the resources of a type whose indexed parameters are exactly a known
    shape's codes are read off that shape by its function (:mod:`.known_shape` gives the Observations
    scoring writes; :func:`.known_shape.extractor_for` builds the server's extractor with it).
    """

    def __init__(
        self,
        registry: SearchParamRegistry,
        fast: bool = True,
        known_shapes: Mapping[str, KnownShape] | None = None,
    ) -> None:
        self.registry = registry
        self.fast = fast
        self.known_shapes: Mapping[str, KnownShape] = known_shapes or {}
        self._plans: dict[str, _Plan] = {}
        self._unsupported: dict[tuple[str, str], str] = {}
        self._failed: set[tuple[str, str]] = set()
        # Server-written Observations read off their known shape (:mod:`.known_shape`), while the
        # indexed Observation parameters are exactly those it produces.
        self._direct: dict[str, Callable[[Mapping[str, Any]], list[IndexRow] | None]] = {}

    @property
    def fast_path(self) -> dict[tuple[str, str], bool]:
        """``(resource type, code)`` of the parameters compiled so far (see :meth:`prepare`): whether
        all of the parameter's expressions run on the fast path."""
        return {(t, p.code): p.fast for t, plan in self._plans.items() for p in plan.params}

    @property
    def failed(self) -> list[tuple[str, str]]:
        """``(resource type, code)`` of the parameters that failed on some resource's data so far
        (logged once each; the write went on without their rows)."""
        return sorted(self._failed)

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
        direct = self._direct.get(resource_type)
        if direct is not None:
            try:
                known = direct(resource)
            except Exception:  # the generic path below decides
                known = None
            if known is not None:
                return known
        # fhirpathpy's ``ofType`` consults a class-wide model that only ``is``/``as`` set; without it
        # ``Age`` is not a ``Quantity``.
        TypeInfo.model = MODEL  # type: ignore[assignment]
        evaluation = _Evaluation(plan)
        rows: dict[_RowKey, IndexRow] = {}
        for param in plan.params:
            if param.needs and not _present(param.needs, resource):
                continue
            try:
                if param.components:
                    self._composite(param, resource, evaluation, rows)
                    continue
                code = param.code
                for use in param.uses:
                    templates, error = evaluation.templates(use, param.type, resource)
                    target_type = use.target_type
                    for make, suffix, fields in templates:
                        if target_type is None or (make is ReferenceRow and fields[0] == target_type):
                            key = (make, code + suffix, fields)
                            rows[key] = _row(key)
                    if error is not None:
                        raise error
            except Exception as exc:  # one parameter must never fail a write
                failed = (resource_type, param.code)
                if failed not in self._failed:
                    self._failed.add(failed)
                    log.warning("search parameter %s.%s failed: %s", resource_type, param.code, exc)
        if resource_type == "QuestionnaireResponse":
            _contained_questionnaire(resource, rows)
        return list(rows.values())

    @staticmethod
    def _composite(
        param: _Param, resource: Mapping[str, Any], evaluation: _Evaluation, rows: dict[_RowKey, IndexRow]
    ) -> None:
        code = param.code
        for use in param.uses:
            for node in evaluation.run(use, resource):
                if not (type(node) is Node or isinstance(node, ResourceNode)):
                    continue
                if type(node.data) is not dict and not isinstance(node.data, Mapping):
                    continue
                for fields in evaluation.combined(param, node):
                    key = (CompositeRow, code, fields)
                    rows[key] = _row(key)

    def _plan(self, resource_type: str) -> _Plan:
        shared: dict[str, _Branch] = {}
        converted: dict[tuple[str, str], int] = {}
        params: list[_Param] = []
        for definition in self.registry.indexed(resource_type):
            try:
                params.append(self._compile(definition, resource_type, shared, converted))
            except UnsupportedExpression as exc:
                self._unsupported[(resource_type, definition.code)] = str(exc)
                log.debug("search parameter %s.%s not indexed: %s", resource_type, definition.code, exc)
        plan = _Plan(tuple(params), len(shared), len(converted))
        self._plans[resource_type] = plan
        known = self.known_shapes.get(resource_type)
        if known is not None and self.fast and {p.code for p in params} == known[0]:
            self._direct[resource_type] = known[1]
        return plan

    def _compile(
        self,
        definition: SearchParamDef,
        resource_type: str,
        shared: dict[str, _Branch],
        converted: dict[tuple[str, str], int],
    ) -> _Param:
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
                branch = shared[text] = _Branch(text, *_evaluator(text, self.fast), slot=len(shared))
            slot = converted.setdefault((text, definition.type), len(converted))
            uses.append(_Use(branch, self._requires(text, resource_type, components), target_type, slot))
        needs: tuple[frozenset[str], ...] = ()
        if len(uses) == 1:
            needs = uses[0].requires
            uses = [replace(uses[0], requires=())]
        elif all(use.requires for use in uses):
            needs = (frozenset().union(*(keys for use in uses for keys in use.requires)),)
        pair = -1
        if components:
            first, second = components
            with _PAIRS_LOCK:
                pair = _PAIRS.setdefault(
                    (first.evaluate, first.type, second.evaluate, second.type), len(_PAIRS)
                )
        return _Param(definition.code, definition.type, tuple(uses), components, needs, pair)

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
            evaluate, fast = _evaluator(expression, self.fast)
            compiled.append(_Component(target.type, expression, evaluate, elements, fast))
        return tuple(compiled)


@cache
def extractor_for(registry: SearchParamRegistry) -> IndexExtractor:
    """The generic extractor of ``registry`` (one per registry and process: plans are compiled once);
    the server's adds the known shapes (:func:`.known_shape.extractor_for`), which give the same rows."""
    return IndexExtractor(registry)


def default_extractor() -> IndexExtractor:
    """The extractor of the R4 search parameters alone (the server's adds its content pack's)."""
    return extractor_for(default_registry())
