r"""Structural validation of a resource body on every write.

Implements the JSON representation rules of https://hl7.org/fhir/R4/json.html and the
structural part of https://hl7.org/fhir/R4/validation.html ("structure", "cardinality",
"value domains" and "bindings" -- not invariants, profiles or business rules), in two tiers:

1. **R4 definitions** (``definitions/structure-definitions.json`` and ``value-sets.json``,
   extracted from the official 4.0.1 package by ``tools/extract_definitions.py``): unknown
   elements (anything not in the R4 StructureDefinition, so R4B/R5-only elements too), choice
   types (https://hl7.org/fhir/R4/formats.html#choice), ``contentReference``, primitive
   extensions (``_birthDate``, https://hl7.org/fhir/R4/json.html#primitive), contained
   resources, JSON types and arrays, primitive formats (the regexes of
   https://hl7.org/fhir/R4/datatypes.html#primitive), empty values (``ele-1``), cardinality and
   required bindings (https://hl7.org/fhir/R4/terminologies.html#required).
2. **The ``fhir.resources`` R4B model** (:func:`fhir_norse.server.models.model_class`) as a
   second opinion, which adds calendar checks (``2024-02-30``) among others. Where R4B and R4
   differ, R4 wins: R4B's "extra field" errors are ignored, because tier 1 already decides from
   the R4 definitions which elements exist (R4 allows ``Extension.valueMeta``, R4B dropped it).
   The one place tier 2 is stricter on purpose: its ``code`` pattern counts Unicode spaces
   (U+00A0) as whitespace, where the R4 regex, read with Java's ASCII ``\s``, does not; the
   prose of https://hl7.org/fhir/R4/datatypes.html#code forbids them, so that error stands.

Both tiers walk the JSON once each; the definitions are loaded once per process and compiled
lazily, one element container at a time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from typing import Any

from fhir_norse import definitions
from fhir_norse.outcomes import BadRequest, Issue
from fhir_norse.server.models import ValidationError, model_class
from fhir_norse.store.resource_types import SUPPORTED_TYPE_SET

__all__ = ["MAX_JSON_DEPTH", "check_depth", "preload", "validate_resource"]

DEFINITIONS = definitions.DIR

# Set by the server on every write (https://hl7.org/fhir/R4/resource.html#Meta); whatever a client
# sends there is replaced, so it is not worth failing a write over.
SERVER_META = ("versionId", "lastUpdated", "_versionId", "_lastUpdated")

# Issue codes from http://hl7.org/fhir/ValueSet/issue-type.
STRUCTURE = "structure"
REQUIRED = "required"
VALUE = "value"
CODE_INVALID = "code-invalid"
INVALID = "invalid"

_INT32 = (-(2**31), 2**31 - 1)
# https://hl7.org/fhir/R4/datatypes.html#string: no control characters except TAB, CR, LF.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_WHITESPACE = re.compile(r"\s+")
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/=]*")
_RESOURCE_TYPES_VS = "http://hl7.org/fhir/ValueSet/resource-types"

# Primitive check: returns a description of what is wrong with a JSON value, or None.
_Check = Callable[[Any], "str | None"]


# --- compiled definitions -------------------------------------------------------------------------

_PRIMITIVE, _COMPLEX, _RESOURCE = 0, 1, 2


@dataclass(slots=True, eq=False)
class _Element:
    """One JSON property of an element container (choice types expanded to one per type)."""

    name: str  # JSON property name: ``valueQuantity``, ``_birthDate``
    type_code: str  # FHIR type of the value (``Quantity``; the primitive's type for ``_x``)
    kind: int
    many: bool
    max: int | None  # None: unbounded
    check: _Check | None = None  # primitives
    node_key: tuple[str, str] | None = None  # (type, path) of the children of complex values
    node: _Node | None = None  # resolved from node_key on first use
    value_set: str | None = None
    codes: frozenset[str] | None = None  # allowed codes of a required binding on ``code``
    coding_codes: Mapping[str, frozenset[str]] | None = None  # same, per system, for Coding(s)
    choice: str | None = None  # ``value[x]`` for every ``valueXxx`` property
    primitive_extension: bool = False  # the ``_x`` twin of primitive ``x``


@dataclass(slots=True, eq=False)
class _Node:
    """The properties allowed in one JSON object: a datatype, a backbone element or a resource."""

    label: str
    elements: dict[str, _Element] = field(default_factory=dict)
    # (element name for messages, JSON properties any of which satisfies min >= 1)
    required: tuple[tuple[str, tuple[str, ...]], ...] = ()


def _choice_name(base: str, code: str) -> str:
    return base + code[0].upper() + code[1:]


class _Definitions:
    """The R4 definitions compiled into :class:`_Node` objects on demand."""

    def __init__(self, structures: dict[str, Any], value_sets: dict[str, Any]) -> None:
        self.types: dict[str, Any] = structures["types"]
        self.rows: dict[str, dict[str, dict[str, Any]]] = {
            name: {row["path"]: row for row in t["elements"]} for name, t in self.types.items()
        }
        self.value_sets: dict[str, dict[str, frozenset[str]]] = {
            url: {system: frozenset(codes) for system, codes in systems.items()}
            for url, systems in value_sets["valueSets"].items()
        }
        self.flat_codes: dict[str, frozenset[str]] = {
            url: frozenset().union(*systems.values()) for url, systems in self.value_sets.items()
        }
        self.nodes: dict[tuple[str, str], _Node] = {}
        self.checks: dict[str, _Check] = {}
        self.r4_resource_types = self.flat_codes.get(_RESOURCE_TYPES_VS, frozenset())

    def is_primitive(self, code: str) -> bool:
        return bool(self.types[code]["kind"] == "primitive-type")

    def resource_node(self, resource_type: str) -> _Node | None:
        if resource_type not in SUPPORTED_TYPE_SET:
            return None
        return self.node(resource_type, "")

    def node(self, type_name: str, path: str) -> _Node:
        # Two threads may build the same node at once; both results are equal, one wins.
        key = (type_name, path)
        found = self.nodes.get(key)
        if found is None:
            found = self.nodes[key] = self._build(type_name, path)
        return found

    def _build(self, type_name: str, path: str) -> _Node:
        rows = self.rows[type_name]
        prefix = f"{path}." if path else ""
        node = _Node(label=f"{type_name}.{path}" if path else type_name)
        required: list[tuple[str, tuple[str, ...]]] = []
        for row_path, row in rows.items():
            if not row_path.startswith(prefix) or "." in row_path[len(prefix) :]:
                continue
            name = row_path[len(prefix) :]
            target = rows[row["contentReference"]] if "contentReference" in row else row
            codes: list[str] = target.get("types", [])
            max_: int | None = None if row["max"] == "*" else int(row["max"])
            many = max_ is None or max_ > 1
            keys: list[str] = []
            if name.endswith("[x]"):
                for code in codes:
                    choice = _choice_name(name[:-3], code)
                    keys += self._add(node, choice, code, type_name, row, target, many, max_)
            else:
                keys += self._add(node, name, codes[0], type_name, row, target, many, max_)
            if row["min"] >= 1:
                required.append((name, tuple(keys)))
        node.required = tuple(required)
        return node

    def _add(
        self,
        node: _Node,
        name: str,
        code: str,
        type_name: str,
        row: dict[str, Any],
        target: dict[str, Any],
        many: bool,
        max_: int | None,
    ) -> list[str]:
        """Add property ``name`` (and its ``_name`` twin for primitives); return the JSON keys."""
        choice = row["path"].rsplit(".", 1)[-1] if row["path"].endswith("[x]") else None
        el = _Element(name=name, type_code=code, kind=_COMPLEX, many=many, max=max_, choice=choice)
        vs = row.get("valueSet")
        if code in self.types and self.is_primitive(code):
            el.kind = _PRIMITIVE
            el.check = self.check(code)
            if vs is not None and code == "code":
                el.value_set, el.codes = vs, self.flat_codes.get(vs)
            node.elements[name] = el
            if code == "xhtml":
                # https://hl7.org/fhir/R4/narrative.html#Narrative: the div carries no extensions.
                return [name]
            twin = _Element(
                name=f"_{name}",
                type_code=code,
                kind=_COMPLEX,
                many=many,
                max=max_,
                node_key=(code, ""),
                choice=choice,
                primitive_extension=True,
            )
            node.elements[twin.name] = twin
            return [name, twin.name]
        if code == "Resource":
            el.kind = _RESOURCE
        elif code in ("Element", "BackboneElement") and any(
            p.startswith(target["path"] + ".") for p in self.rows[type_name]
        ):
            el.node_key = (type_name, target["path"])
        else:
            el.node_key = (row.get("profiles", {}).get(code, code), "")
        if vs is not None and code in ("Coding", "CodeableConcept"):
            el.value_set, el.coding_codes = vs, self.value_sets.get(vs)
        node.elements[name] = el
        return [name]

    def check(self, code: str) -> _Check:
        found = self.checks.get(code)
        if found is None:
            found = self.checks[code] = _primitive_check(code, self.types[code])
        return found


def _primitive_check(code: str, definition: Mapping[str, Any]) -> _Check:
    """The JSON representation rule and value regex of one primitive type.

    https://hl7.org/fhir/R4/json.html#primitive: ``boolean`` is a JSON boolean, ``integer``,
    ``positiveInt``, ``unsignedInt`` and ``decimal`` JSON numbers, everything else a JSON string
    matching the type's regex (https://hl7.org/fhir/R4/datatypes.html#primitive).
    """
    if code == "boolean":

        def check_boolean(value: Any) -> str | None:
            return None if isinstance(value, bool) else f"expected a JSON boolean for {code}"

        return check_boolean
    if code in ("integer", "positiveInt", "unsignedInt"):
        low = {"integer": _INT32[0], "positiveInt": 1, "unsignedInt": 0}[code]

        def check_integer(value: Any) -> str | None:
            if not isinstance(value, int) or isinstance(value, bool):
                return f"expected a JSON integer for {code}"
            if not low <= value <= _INT32[1]:
                return f"{value} is out of range for {code} ({low}..{_INT32[1]})"
            return None

        return check_integer
    if code == "decimal":

        def check_decimal(value: Any) -> str | None:
            if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
                return "expected a JSON number for decimal"
            if isinstance(value, float | Decimal) and not math.isfinite(value):
                return "decimal must be a finite number"
            return None

        return check_decimal

    # The definitions' regexes follow Java semantics, where \s and \S are ASCII-only.
    regex = re.compile(definition["regex"], re.ASCII) if "regex" in definition else None
    max_length: int | None = definition.get("maxLength")
    if code == "base64Binary":
        # The R4 regex backtracks exponentially on long whitespace-laden input; this is the same
        # language check (base64 alphabet in groups of four, whitespace ignored) in linear time.
        regex = None

    def check_string(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"expected a JSON string for {code}"
        if not value:
            return "empty strings are not allowed (use no property)"
        if _CONTROL.search(value):
            return "control characters are not allowed"
        if max_length is not None and len(value) > max_length:
            return f"longer than {max_length} characters"
        if regex is not None and regex.fullmatch(value) is None:
            shown = value if len(value) <= 60 else value[:57] + "..."
            return f"{shown!r} is not a valid {code}"
        if code == "base64Binary":
            packed = _WHITESPACE.sub("", value)
            if len(packed) % 4 or _BASE64_CHARS.fullmatch(packed) is None:
                return "not valid base64"
        return None

    return check_string


@cache
def _definitions() -> _Definitions:
    structures = json.loads((DEFINITIONS / "structure-definitions.json").read_text())
    value_sets = json.loads((DEFINITIONS / "value-sets.json").read_text())
    return _Definitions(structures, value_sets)


def primitive_problem(code: str, value: Any) -> str | None:
    """What is wrong with ``value`` as an R4 primitive of type ``code`` (None: nothing)."""
    return _definitions().check(code)(value)


# --- tier 1: the walk -----------------------------------------------------------------------------


class _Walker:
    def __init__(self, defs: _Definitions) -> None:
        self.defs = defs
        self.issues: list[Issue] = []

    def add(self, message: str, expression: str, code: str = INVALID) -> None:
        self.issues.append(Issue(f"{expression}: {message}", code=code, expression=(expression,)))

    def resource(self, obj: Mapping[str, Any], expr: str) -> None:
        resource_type = obj.get("resourceType")
        if not isinstance(resource_type, str):
            self.add("a resource must have a resourceType", expr, STRUCTURE)
            return
        node = self.defs.resource_node(resource_type)
        if node is None:
            self.add(_unsupported_type(self.defs, resource_type), expr, "not-supported")
            return
        self.object(obj, node, expr, resource=True)

    def object(self, obj: Mapping[str, Any], node: _Node, expr: str, *, resource: bool = False) -> None:
        elements = node.elements
        choices: dict[str, str] | None = None
        for key, value in obj.items():
            el = elements.get(key)
            if el is None:
                if not (resource and key == "resourceType"):
                    self.add(f"unknown element '{key}' in {node.label}", f"{expr}.{key}", STRUCTURE)
                continue
            if el.choice is not None:
                if choices is None:
                    choices = {}
                # ``valueString`` and its ``_valueString`` twin are one choice.
                bare = key[1:] if el.primitive_extension else key
                other = choices.setdefault(el.choice, bare)
                if other != bare:
                    self.add(
                        f"only one of {el.choice} is allowed, found {other} and {bare}",
                        f"{expr}.{bare}",
                        STRUCTURE,
                    )
            path = f"{expr}.{key[1:]}" if el.primitive_extension else f"{expr}.{key}"
            if el.max == 0:
                self.add(f"'{key}' is not allowed in {node.label}", path, STRUCTURE)
                continue
            if el.many:
                if not isinstance(value, list):
                    self.add(f"'{key}' must be a JSON array (max cardinality {_max(el)})", path, STRUCTURE)
                    continue
                if not value:
                    self.add("empty arrays are not allowed (use no property)", path, STRUCTURE)
                    continue
                if el.max is not None and len(value) > el.max:
                    self.add(f"at most {el.max} allowed, found {len(value)}", path, STRUCTURE)
                twin = self._twin(obj, key, el, path, len(value))
                for i, item in enumerate(value):
                    if item is None:
                        # In ``given: ["a", null]`` the null keeps the array aligned with
                        # ``_given``, which must then carry the element at that index (and the
                        # other way round); a null in both is reported once, for ``given``.
                        if twin is None or i >= len(twin) or (twin[i] is None and not el.primitive_extension):
                            self.add("null is not allowed", f"{path}[{i}]", STRUCTURE)
                        continue
                    self.value(el, item, f"{path}[{i}]")
            else:
                if isinstance(value, list):
                    self.add(f"'{key}' must be a single value, not an array (max 1)", path, STRUCTURE)
                    continue
                if value is None:
                    self.add("null is not allowed", path, STRUCTURE)
                    continue
                self.value(el, value, path)
        for name, keys in node.required:
            if not any(k in obj for k in keys):
                message = f"missing required element '{name}' (min 1) in {node.label}"
                self.add(message, f"{expr}.{name}", REQUIRED)

    def _twin(
        self, obj: Mapping[str, Any], key: str, el: _Element, path: str, length: int
    ) -> list[Any] | None:
        """For a primitive array, the aligned ``_x`` (or ``x``) array; checks that lengths agree."""
        if el.kind != _PRIMITIVE and not el.primitive_extension:
            return None
        twin = obj.get(key[1:] if el.primitive_extension else f"_{key}")
        if not isinstance(twin, list):
            return None
        if len(twin) != length and not el.primitive_extension:
            self.add(f"'{key}' and '_{key}' must have the same number of items", path, STRUCTURE)
        return twin

    def value(self, el: _Element, value: Any, expr: str) -> None:
        kind = el.kind
        if kind == _PRIMITIVE:
            assert el.check is not None
            problem = el.check(value)
            if problem is not None:
                self.add(problem, expr, VALUE if isinstance(value, str | int | float | bool) else STRUCTURE)
            elif el.codes is not None and value not in el.codes:
                self.add(_not_in_value_set(value, el), expr, CODE_INVALID)
            return
        if not isinstance(value, dict):
            what = "a resource" if kind == _RESOURCE else el.type_code
            self.add(f"expected a JSON object ({what})", expr, STRUCTURE)
            return
        if not value:
            self.add("empty objects are not allowed (use no property)", expr, STRUCTURE)
            return
        if kind == _RESOURCE:
            self.resource(value, expr)
            return
        node = el.node
        if node is None:
            assert el.node_key is not None
            node = el.node = self.defs.node(*el.node_key)
        self.object(value, node, expr)
        if el.coding_codes is not None:
            self._coding_binding(el, value, expr)

    def _coding_binding(self, el: _Element, value: Mapping[str, Any], expr: str) -> None:
        """A required binding on Coding/CodeableConcept, checked for codings of systems the ValueSet uses.

        https://hl7.org/fhir/R4/terminologies.html#required
        """
        assert el.coding_codes is not None
        if el.type_code == "Coding":
            codings: list[tuple[str, Any]] = [(expr, value)]
        else:
            items = value.get("coding")
            listed = items if isinstance(items, list) else []
            codings = [(f"{expr}.coding[{i}]", c) for i, c in enumerate(listed)]
        for where, coding in codings:
            if not isinstance(coding, dict):
                continue
            allowed = el.coding_codes.get(coding.get("system"))  # type: ignore[arg-type]
            code = coding.get("code")
            if allowed is not None and isinstance(code, str) and code not in allowed:
                self.add(_not_in_value_set(code, el), f"{where}.code", CODE_INVALID)


def _max(el: _Element) -> str:
    return "*" if el.max is None else str(el.max)


def _not_in_value_set(code: str, el: _Element) -> str:
    allowed = el.codes or frozenset().union(*(el.coding_codes or {}).values())
    listed = f" (one of {', '.join(sorted(allowed))})" if len(allowed) <= 20 else ""
    return f"'{code}' is not in the required value set {el.value_set}{listed}"


def _unsupported_type(defs: _Definitions, resource_type: str) -> str:
    if resource_type in defs.r4_resource_types:
        return f"resource type '{resource_type}' is not supported by this server"
    return f"'{resource_type}' is not a FHIR R4 resource type"


# --- tier 2: the R4B model ------------------------------------------------------------------------


def _loc_expression(root: str, loc: tuple[int | str, ...]) -> str:
    """``('name', 0, 'given', 1)`` -> ``Patient.name[0].given[1]``; ``_birthDate`` -> ``birthDate``."""
    out = root
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += "." + (part[1:] if part.startswith("_") else part)
    return out


def _related(a: str, b: str) -> bool:
    """Whether one expression is the other or inside it."""
    if len(a) > len(b):
        a, b = b, a
    return b == a or (b.startswith(a) and b[len(a)] in ".[")


def _model_issues(body: Mapping[str, Any], resource_type: str, known: list[Issue]) -> list[Issue]:
    try:
        model_class(resource_type).model_validate(body)
    except ValidationError as exc:
        seen = [e for issue in known for e in issue.expression]
        out: list[Issue] = []
        for error in exc.errors(include_url=False, include_input=False):
            # Tier 1 decides from the R4 definitions which elements exist; R4B lacks a few R4 ones.
            if error["type"] == "extra_forbidden":
                continue
            expr = _loc_expression(resource_type, tuple(error["loc"]))
            if any(_related(expr, other) for other in seen):
                continue
            seen.append(expr)
            out.append(Issue(f"{expr}: {error['msg']}", code=INVALID, expression=(expr,)))
        return out
    except Exception as exc:
        # Some R4B model validators assume well-formed input and crash on what tier 1 has already
        # rejected (``_birthDate: "x"`` raises AttributeError); only a crash on input tier 1
        # accepted is worth reporting.
        if known:
            return []
        message = f"{resource_type}: the resource could not be read ({type(exc).__name__})"
        return [Issue(message, code=INVALID, expression=(resource_type,))]
    return []


# --- entry point ----------------------------------------------------------------------------------

# How deeply the JSON of a request may nest objects and arrays (README, "Limits"). Real resources stay
# far below it (a Questionnaire's groups, extensions within extensions: two levels each); a body nested
# some hundreds deep ran the validators, the search-index extraction and JSON Patch into Python's
# recursion limit (a 500). Everything that walks a body recursively stays well within the limit below it.
MAX_JSON_DEPTH = 100


def check_depth(value: Any, what: str = "The request body", *, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON that nests objects and arrays more than ``limit`` deep (400 ``too-costly``); walks
    the value once, where a body enters the server (recursing at most ``limit`` frames deep: the walk
    stops there, far within Python's recursion limit; 3x the speed of an explicit stack)."""
    if (type(value) is dict or type(value) is list) and not _within(value, limit - 1):
        raise BadRequest(
            f"{what} nests objects and arrays more than {limit} levels deep, the most this server accepts",
            code="too-costly",
        )


def _within(node: dict[str, Any] | list[Any], remaining: int) -> bool:
    """Whether the containers in ``node`` nest at most ``remaining`` levels below it (JSON from a parser:
    exactly dicts and lists)."""
    children: Iterable[Any] = node.values() if type(node) is dict else node
    for child in children:
        kind = type(child)
        if (kind is dict or kind is list) and (remaining == 0 or not _within(child, remaining - 1)):
            return False
    return True


def validate_resource(body: dict[str, Any], *, expected_type: str | None = None, model: bool = True) -> None:
    """Check a resource body against the R4 definitions; raise :class:`BadRequest` listing every problem.

    ``expected_type`` is the type named by the URL (``POST /Observation``): a body of another type
    is rejected. ``meta.versionId`` and ``meta.lastUpdated`` are not checked: the server sets them.
    ``model=False`` skips the second tier (the R4B model, the costly one) for bodies that are not
    stored as they are (``$next-question``'s working response).
    See https://hl7.org/fhir/R4/validation.html and https://hl7.org/fhir/R4/http.html#create.
    """
    if not isinstance(body, dict):
        raise BadRequest("The resource must be a JSON object", code=STRUCTURE)
    resource_type = body.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise BadRequest("The resource has no resourceType", code=STRUCTURE, expression="resourceType")
    defs = _definitions()
    if resource_type not in SUPPORTED_TYPE_SET:
        message = _unsupported_type(defs, resource_type)
        raise BadRequest(message, code="not-supported", expression="resourceType")
    if expected_type is not None and resource_type != expected_type:
        raise BadRequest(
            f"The resource is a {resource_type}, expected a {expected_type}",
            expression=f"{resource_type}.resourceType",
        )
    body = _without_server_meta(body)
    walker = _Walker(defs)
    walker.resource(body, resource_type)
    issues = walker.issues
    if model:
        issues += _model_issues(body, resource_type, issues)
    if issues:
        count = f"{len(issues)} problems" if len(issues) > 1 else "1 problem"
        raise BadRequest(f"The {resource_type} is not valid FHIR R4: {count}", issues=issues)


def preload() -> None:
    """Load the definitions and the R4B models of every supported type (call at start-up).

    Without it the first write of each type pays for compiling its definitions and importing its
    model (together about 0.3 s for all supported types).
    """
    defs = _definitions()
    for resource_type in sorted(SUPPORTED_TYPE_SET):
        defs.resource_node(resource_type)
        model_class(resource_type)


def _without_server_meta(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("meta")
    if not isinstance(meta, dict) or not any(k in meta for k in SERVER_META):
        return body
    rest = {k: v for k, v in meta.items() if k not in SERVER_META}
    out = {k: v for k, v in body.items() if k != "meta"}
    if rest:
        out["meta"] = rest
    return out
