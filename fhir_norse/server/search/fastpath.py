"""Plain-Python evaluation of the common shapes of the search parameters' FHIRPath expressions.

fhirpathpy walks the ANTLR parse tree of an expression anew on every evaluation, which makes it
the dominant cost of indexing a write. :func:`compile_fast` turns the parse tree of the shapes the
R4 search expressions use (after :func:`.extract.rewrite_expression`) into closures over the JSON
dicts instead:

* member paths (``Observation.component.code``), including choice elements (``value`` finds
  ``valueQuantity``) and primitive extensions (``_birthDate``), typed exactly as fhirpathpy's
  ``r4`` model types them;
* ``ofType(T)`` (what ``as T`` becomes), ``first()``, ``exists()``, ``extension('url')``,
  ``where(...)`` with a criterion made of the same parts, ``member = 'literal'``,
  ``hasExtension('url')`` and ``resolve() is T``;
* unions ``|``, ``and``, ``=`` and ``!=`` with string or boolean literals.

The closures reproduce fhirpathpy 2.x's results item for item (the same data with the same type
path, as :class:`Node` instead of ``ResourceNode``), so that the typed-value conversion of
:mod:`.extract` sees no difference. Whatever the compiler does not know raises
:class:`NotCompiled` at compile time, and whatever is unusual in the data at evaluation time (a
value whose type fhirpathpy would derive differently, an error fhirpathpy would raise) makes
:class:`FastEvaluator` run fhirpathpy instead; the fast path never guesses.

Two shortcuts on top: expressions evaluated on the same resource share the results of their
common path prefixes (:meth:`FastEvaluator.shared`), and a plain path (``Observation.code``,
``(Observation.component.value.ofType(Quantity))``, a composite's ``code`` on a node) is read
straight off the JSON into the ``(type name, value)`` pairs the extractor would make of its
items (:meth:`FastEvaluator.typed`), when no item is of a type the extractor names otherwise.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from fhirpathpy.engine.evaluators import boolean_literal as _boolean_literal
from fhirpathpy.engine.evaluators import identifier as _identifier
from fhirpathpy.engine.evaluators import string_literal as _string_literal
from fhirpathpy.engine.invocations.logic import and_op as _untyped_and_op
from fhirpathpy.engine.nodes import FP_DateTime, FP_Time, ResourceNode
from fhirpathpy.engine.util import arraify as _untyped_arraify
from fhirpathpy.engine.util import uniq as _untyped_uniq

__all__ = ["FastEvaluator", "Node", "NotCompiled", "compile_fast"]

# fhirpathpy carries no annotations.
_and_op: Callable[[Any, Any, Any], Any] = _untyped_and_op
_arraify: Callable[[Any], list[Any]] = _untyped_arraify
_uniq: Callable[[list[Any]], list[Any]] = _untyped_uniq
_literal_string: Callable[[Any, Any, Any], list[str]] = _string_literal
_literal_boolean: Callable[[Any, Any, Any], list[bool]] = _boolean_literal
_literal_identifier: Callable[[Any, Any, Any], list[str]] = _identifier
_resource_node: Callable[[Any, Any], Any] = ResourceNode

_Evaluate = Callable[[Any], list[Any]]
_Step = Callable[[list[Any]], list[Any]]

# Caches keyed by type paths taken from the data (``resourceType`` of contained resources) stop
# growing here.
_CACHE_LIMIT = 1024


class NotCompiled(Exception):
    """The expression has a shape the fast path does not evaluate: use fhirpathpy."""


class _Unsure(Exception):
    """Raised while evaluating when the data leaves the cases the fast path reproduces."""


class Node:
    """One item of a result: the JSON ``data`` with the type ``path`` fhirpathpy gives it
    (``CodeableConcept``, ``Observation.component``, ``System.String``, ``None`` after a union)."""

    __slots__ = ("data", "path")

    def __init__(self, path: Any, data: Any) -> None:
        self.path = path
        self.data = data

    def __repr__(self) -> str:
        return f"Node({self.path!r}, {self.data!r})"


def _node(data: Any, path: Any) -> Node:
    """``ResourceNode.create_node``: a (contained) resource is typed by its ``resourceType``."""
    kind = type(data)
    if kind is dict:
        if "resourceType" in data:
            path = data["resourceType"]
    elif kind is not str and isinstance(data, Mapping) and "resourceType" in data:
        path = data["resourceType"]
    return Node(path, data)


def as_resource_node(item: Any) -> Any:
    """fhirpathpy's own node for an item of a fast result (other items are returned as they are)."""
    if type(item) is Node:
        return _resource_node(item.data, item.path)
    return item


def _data(item: Any) -> Any:
    """``util.get_data``: the data of a node; floats as Decimals."""
    value = item.data if type(item) is Node else item
    if isinstance(value, float):
        return Decimal(str(value))
    return value


def _raw_output(item: Any) -> bool:
    """What fhirpathpy's ``returnRawData`` keeps: not the bare extension holders of primitives."""
    if type(item) is not Node:
        return True
    data = item.data
    return not (isinstance(data, dict) and list(data.keys()) == ["extension"])


# --------------------------------------------------------------------------------------------
# Types, as fhirpathpy's ``TypeInfo`` derives and compares them


_SYSTEM_PATH = re.compile(r"^System\.(.*)$")


class _Types:
    """The type tests of fhirpathpy's ``TypeInfo`` against one model (``TypeInfo.model`` set)."""

    def __init__(self, model: Mapping[str, Any]) -> None:
        self.type2parent: Mapping[str, str] = model["type2Parent"]
        self.path2type: Mapping[str, str] = model["path2Type"]
        self.defined_elsewhere: Mapping[str, str] = model["pathsDefinedElsewhere"]
        self.choices: Mapping[str, Sequence[str]] = model["choiceTypePaths"]

    @staticmethod
    def info(path: Any) -> tuple[str, str]:
        """``ResourceNode.get_type_info``: ``(namespace, name)`` of a node's path."""
        if path is None:
            raise _Unsure("a node without a type")  # fhirpathpy fails on ``None.is_``
        if not isinstance(path, str):
            raise _Unsure("a node with a type that is not a name")
        match = _SYSTEM_PATH.match(path)
        if match:
            return "System", match[1]
        if "." not in path:
            return "FHIR", path
        return "FHIR", "BackboneElement"

    def is_type(self, name: str, base: str) -> bool:
        seen: str | None = name
        while seen:
            if seen == base:
                return True
            seen = self.type2parent.get(seen) or self.path2type.get(seen)
        return False

    def is_(self, path: Any, namespace: str | None, name: str) -> bool:
        """``TypeInfo.from_value(node).is_(TypeInfo(name, namespace))``."""
        own_namespace, own_name = self.info(path)
        if namespace and own_namespace != namespace:
            return False
        if own_namespace == "FHIR":
            return self.is_type(own_name, name)
        return own_name == name

    def member(self, path: Any, key: str) -> tuple[tuple[str, str, Any], ...]:
        """How fhirpathpy's member invocation reads ``key`` on a node of type ``path``: the JSON
        keys to try in order (value and ``_`` extension) with the type path of what they hold.
        The first whose value or extension is present is taken (a choice element has several)."""
        child = f"{path}.{key}" if path else f"_.{key}"
        child = self.defined_elsewhere.get(child, child)
        choices = self.choices.get(child)
        if choices:
            return tuple(
                (key + suffix, f"_{key}{suffix}", self.path2type.get(child + suffix, child + suffix))
                for suffix in choices
            )
        if key == "extension":
            child = "Extension"
        return ((key, f"_{key}", self.path2type.get(child, child)),)


def _type_specifier(text: Any) -> tuple[str | None, str]:
    """``engine.type_specifier``: ``Quantity`` or ``FHIR.Quantity``."""
    if not isinstance(text, str):
        raise NotCompiled("a type without a name")
    parts = text.replace("`", "").split(".")
    if len(parts) == 1:
        return None, parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise NotCompiled(f"type {text}")


# --------------------------------------------------------------------------------------------
# Steps: each maps an input collection to an output collection, as fhirpathpy's evaluators do


def _root(key: str) -> _Step:
    """A capitalised first identifier on the resource: the resource when it is of that type."""

    def step(items: list[Any]) -> list[Any]:
        out: list[Any] = []
        for item in items:
            if type(item) is Node:
                raise _Unsure("a type name applied to a node")
            if item["resourceType"] == key:
                out.append(_node(item, key))
        return out

    return step


def _member(types: _Types, key: str) -> _Step:
    by_path: dict[Any, tuple[tuple[str, str, Any], ...]] = {}
    # fhirpathpy reads ``length`` off what is not an object (a string's length).
    length = key == "length"

    def step(items: list[Any]) -> list[Any]:
        out: list[Any] = []
        append = out.append
        for item in items:
            if type(item) is not Node:
                item = _node(item, None)
            data = item.data
            if type(data) is not dict and not isinstance(data, Mapping):
                if length:
                    raise _Unsure("length of a value")
                continue
            path = item.path
            keys = by_path.get(path)
            if keys is None:
                keys = types.member(path, key)
                if len(by_path) < _CACHE_LIMIT:
                    by_path[path] = keys
            for field, extension_field, child in keys:
                value = data.get(field)
                extension = data.get(extension_field)
                if value is None and extension is None:
                    continue
                for found in (value, extension):
                    if found is None:
                        continue
                    if isinstance(found, list):
                        for x in found:
                            append(_node(x, child))
                    else:
                        append(_node(found, child))
                break
        return out

    return step


def _of_type(types: _Types, namespace: str | None, name: str) -> _Step:
    by_path: dict[Any, bool] = {}

    def step(items: list[Any]) -> list[Any]:
        out: list[Any] = []
        for item in items:
            if type(item) is not Node:
                raise _Unsure("ofType() of a System value")
            path = item.path
            matches = by_path.get(path)
            if matches is None:
                matches = types.is_(path, namespace, name)
                if len(by_path) < _CACHE_LIMIT:
                    by_path[path] = matches
            if matches:
                out.append(item)
        return out

    return step


def _is(types: _Types, operand: _Step, namespace: str | None, name: str) -> _Step:
    def step(items: list[Any]) -> list[Any]:
        values = operand(items)
        if not values:
            return []
        if len(values) > 1 or type(values[0]) is not Node:
            raise _Unsure("is on more than one item or on a System value")
        return [types.is_(values[0].path, namespace, name)]

    return step


def _first(items: list[Any]) -> list[Any]:
    return items[:1]


def _exists(items: list[Any]) -> list[Any]:
    return [bool(items)]


def _where(criterion: _Step) -> _Step:
    def step(items: list[Any]) -> list[Any]:
        out: list[Any] = []
        for item in items:
            result = criterion([item])
            if result and result[0]:
                out.append(item)
        return out

    return step


def _extension(url: str) -> _Step:
    """``extension(url)``: the first extension with that url on each item."""

    def step(items: list[Any]) -> list[Any]:
        out: list[Any] = []
        for item in items:
            element = _data(item)
            if isinstance(element, Mapping):
                found = [e for e in element.get("extension", []) if e["url"] == url]
                if found:
                    out.append(_node(found[0], "Extension"))
        return out

    return step


def _user_function(function: Callable[..., Any], *arguments: Any) -> _Step:
    """A function of the extractor's ``userInvocationTable`` (it gets the items' data)."""

    def step(items: list[Any]) -> list[Any]:
        result = _arraify(function([_data(i) for i in items], *arguments))
        return [Node(r.path, r.data) if isinstance(r, ResourceNode) else r for r in result]

    return step


def _union(left: _Step, right: _Step) -> _Step:
    """``|``: fhirpathpy keeps the distinct data, untyped."""

    def step(items: list[Any]) -> list[Any]:
        both = left(items) + right(items)
        if not all(type(x) is Node for x in both):
            raise _Unsure("a union of System values")
        return [_node(data, None) for data in _uniq([x.data for x in both])]

    return step


def _comparable(item: Any) -> Any:
    """``util.parse_value`` for what the equality compares."""
    if type(item) is Node:
        if item.path is not None and _Types.info(item.path)[1] == "Quantity":
            raise _Unsure("a Quantity compared")
        return item.data
    if isinstance(item, FP_DateTime | FP_Time):
        raise _Unsure("a date compared")
    return item


def _equality(left: _Step, right: _Step, negate: bool) -> _Step:
    def step(items: list[Any]) -> list[Any]:
        a, b = left(items), right(items)
        if not a or not b:
            return []
        equal = len(a) == len(b) and _comparable(a[0]) == _comparable(b[0])
        return [not equal if negate else equal]

    return step


def _boolean_operand(values: list[Any]) -> Any:
    if not values:
        return []
    if len(values) > 1:
        raise _Unsure("more than one boolean")
    data = _data(values[0])
    if data is True or data is False:
        return data
    raise _Unsure("not a boolean")


def _and(left: _Step, right: _Step) -> _Step:
    def step(items: list[Any]) -> list[Any]:
        a = _boolean_operand(left(items))
        b = _boolean_operand(right(items))
        return _arraify(_and_op(None, a, b))

    return step


def _constant(values: list[Any]) -> _Step:
    def step(items: list[Any]) -> list[Any]:
        return list(values)

    return step


def _pipeline(steps: Sequence[_Step]) -> _Step:
    if len(steps) == 1:
        return steps[0]
    if len(steps) == 2:
        first, second = steps

        def pair(items: list[Any]) -> list[Any]:
            return second(first(items))

        return pair

    def chain(items: list[Any]) -> list[Any]:
        for step in steps:
            items = step(items)
        return items

    return chain


# --------------------------------------------------------------------------------------------
# The compiler

_BUILT_INS = frozenset({"where", "ofType", "first", "exists", "extension"})
_USER = frozenset({"resolve", "hasExtension"})

# A step with what it does, as a hashable description: equal descriptions, equal results.
_Keyed = tuple[Any, _Step]
# Every path prefix (a tuple of step descriptions) seen by any compiled expression, numbered: the
# key of its result in the memory of one evaluation (see :meth:`FastEvaluator.shared`).
_PREFIXES: dict[tuple[Any, ...], int] = {}


_PREFIXES_LOCK = threading.Lock()


def _prefix_id(prefix: tuple[Any, ...]) -> int:
    with _PREFIXES_LOCK:  # two prefixes compiled at once must not get the same number
        return _PREFIXES.setdefault(prefix, len(_PREFIXES))


def _tree_key(node: Any) -> Any:
    """A hashable copy of a parse (sub)tree."""
    if not isinstance(node, Mapping):
        return None
    return (
        node.get("type"),
        node.get("text"),
        tuple(node.get("terminalNodeText") or ()),
        tuple(_tree_key(c) for c in node.get("children") or ()),
    )


class _Compiler:
    def __init__(self, types: _Types, functions: Mapping[str, Mapping[str, Any]]) -> None:
        self.types = types
        self.functions = functions

    def expression(self, node: Mapping[str, Any], top: bool) -> _Step:
        """``top``: the expression is evaluated on the input of the whole expression (the
        resource), where a type name selects the resource."""
        return _pipeline([step for _, step in self.chain(node, top)])

    def chain(self, node: Mapping[str, Any], top: bool) -> list[_Keyed]:
        """The expression as a sequence of steps, each applied to the result of the one before."""
        kind = node.get("type")
        children: list[Mapping[str, Any]] = node.get("children") or []
        if kind in ("TermExpression", "InvocationTerm", "ParenthesizedTerm") and len(children) == 1:
            return self.chain(children[0], top)
        if kind == "InvocationExpression" and children:
            return [keyed for i, c in enumerate(children) for keyed in self.chain(c, top and i == 0)]
        if kind == "MemberInvocation" and len(children) == 1:
            return [self.member(children[0], top)]
        if kind == "FunctionInvocation" and len(children) == 1:
            return [self.function(children[0])]
        return [(("expression", top, _tree_key(node)), self.operation(node, top))]

    def operation(self, node: Mapping[str, Any], top: bool) -> _Step:
        kind = node.get("type")
        children: list[Mapping[str, Any]] = node.get("children") or []
        if kind == "LiteralTerm" and len(children) == 1:
            return _constant(self.literal(children[0]))
        operator = (node.get("terminalNodeText") or [None])[0]
        if len(children) == 2:
            if kind == "UnionExpression" and operator == "|":
                return _union(self.expression(children[0], top), self.expression(children[1], top))
            if kind == "EqualityExpression" and operator in ("=", "!="):
                left, right = (self.expression(c, top) for c in children)
                return _equality(left, right, operator == "!=")
            if kind == "AndExpression" and operator == "and":
                return _and(self.expression(children[0], top), self.expression(children[1], top))
            if kind == "TypeExpression" and operator == "is" and children[1].get("type") == "TypeSpecifier":
                namespace, name = _type_specifier(children[1].get("text"))
                return _is(self.types, self.expression(children[0], top), namespace, name)
        raise NotCompiled(f"{kind} {operator or ''}".strip())

    def member(self, identifier: Mapping[str, Any], top: bool) -> _Keyed:
        if identifier.get("type") != "Identifier":
            raise NotCompiled("a member without a name")
        key = _literal_identifier(None, None, identifier)[0].replace("`", "")
        if not key:
            raise NotCompiled("an empty name")
        if key[0] == key[0].upper():  # fhirpathpy's ``is_capitalized``: a type name
            if top:
                return ("type", key), _root(key)
            raise NotCompiled(f"type name {key} inside a path")
        return ("member", key), _member(self.types, key)

    def function(self, functn: Mapping[str, Any]) -> _Keyed:
        children: list[Mapping[str, Any]] = functn.get("children") or []
        if functn.get("type") != "Functn" or not children or children[0].get("type") != "Identifier":
            raise NotCompiled("a function without a name")
        name = _literal_identifier(None, None, children[0])[0]
        arguments: list[Mapping[str, Any]] = []
        if len(children) > 1:
            arguments = children[1].get("children") or []
        if name in self.functions:
            if name not in _USER:
                raise NotCompiled(f"function {name}() of the extractor")
            function = self.functions[name]["fn"]
            if name == "resolve" and not arguments:
                return (name,), _user_function(function)
            if name == "hasExtension" and len(arguments) == 1:
                url = self.string_argument(arguments[0])
                return (name, url), _user_function(function, url)
        elif name in _BUILT_INS:
            if name == "first" and not arguments:
                return (name,), _first
            if name == "exists" and not arguments:
                return (name,), _exists
            if name == "where" and len(arguments) == 1:
                return (name, _tree_key(arguments[0])), _where(self.expression(arguments[0], top=False))
            if name == "ofType" and len(arguments) == 1:
                namespace, type_name = _type_specifier(arguments[0].get("text"))
                return (name, namespace, type_name), _of_type(self.types, namespace, type_name)
            if name == "extension" and len(arguments) == 1:
                url = self.string_argument(arguments[0])
                return (name, url), _extension(url)
        raise NotCompiled(f"function {name}() with {len(arguments)} argument(s)")

    def literal(self, term: Mapping[str, Any]) -> list[Any]:
        kind = term.get("type")
        if kind == "StringLiteral":
            return _literal_string(None, None, term)
        if kind == "BooleanLiteral":
            return _literal_boolean(None, None, term)
        raise NotCompiled(f"literal {kind}")

    def string_argument(self, argument: Mapping[str, Any]) -> str:
        term = argument
        while term.get("type") == "TermExpression" and len(term.get("children") or []) == 1:
            term = term["children"][0]
        children = term.get("children") or []
        if term.get("type") != "LiteralTerm" or len(children) != 1:
            raise NotCompiled("an argument that is not a string")
        values = self.literal(children[0])
        if len(values) != 1 or not isinstance(values[0], str):
            raise NotCompiled("an argument that is not a string")
        return values[0]


# --------------------------------------------------------------------------------------------
# Typed reading of plain paths


# A path's type as the extractor names its values: a FHIR type name (not a backbone element's
# path, not a System type, not an extension, whose value the extractor takes instead).
def _plain(path: Any) -> bool:
    return isinstance(path, str) and "." not in path and path not in ("Extension", "BackboneElement", "")


# One way of reading a path from a start type: the keys of each member before the last (one
# element each), then the last member's keys with the type name of what it holds (``None``: a
# value of a type ``ofType`` drops).
_Reading = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str, str | None], ...]]


class _TypedPath:
    """``a.b.c`` or ``a.b.c.ofType(T)`` (after the resource's type, or on a node) read straight off
    the JSON as ``(type name, value)`` pairs, which is what the extractor makes of the items of the
    evaluation when every item's type is a plain type name and no contained resource is on the way
    (else :class:`_Unsure`)."""

    __slots__ = ("keys", "of_type", "readings", "root", "types")

    def __init__(self, types: _Types, root: str | None, keys: tuple[str, ...], of_type: Any) -> None:
        self.types = types
        self.root = root
        self.keys = keys
        self.of_type: tuple[str | None, str] | None = of_type
        self.readings: dict[Any, _Reading | None] = {}

    def reading(self, path: Any) -> _Reading | None:
        """How to read the path from a node of type ``path`` (``None``: it cannot be read so)."""
        found = self.readings.get(path, False)
        if found is False:
            found = self._reading(path)
            if len(self.readings) < _CACHE_LIMIT:
                self.readings[path] = found
        return found  # type: ignore[return-value]

    def _reading(self, path: Any) -> _Reading | None:
        if not isinstance(path, str) or not path:
            return None
        steps: list[tuple[str, str]] = []
        for key in self.keys[:-1]:
            options = self.types.member(path, key)
            if len(options) != 1:
                return None  # a choice before the last member
            field, extension_field, path = options[0]
            steps.append((field, extension_field))
        last: list[tuple[str, str, str | None]] = []
        for field, extension_field, child in self.types.member(path, self.keys[-1]):
            if self.of_type is not None and not self.types.is_(child, *self.of_type):
                last.append((field, extension_field, None))
            elif _plain(child):
                last.append((field, extension_field, child))
            else:
                return None
        return tuple(steps), tuple(last)

    def read(self, target: Any) -> list[tuple[str, Any]]:
        if type(target) is Node:
            data, path = target.data, target.path
        elif self.root is not None and isinstance(target, dict) and not isinstance(target, ResourceNode):
            if target.get("resourceType") != self.root:
                raise _Unsure("another type")
            data, path = target, self.root
        else:
            raise _Unsure("an unexpected input")
        reading = self.reading(path)
        if reading is None or type(data) is not dict:
            raise _Unsure("no reading")
        steps, last = reading
        items: list[Any] = [data]
        for field, extension_field in steps:
            found: list[Any] = []
            for item in items:
                if type(item) is not dict:
                    if isinstance(item, Mapping):
                        raise _Unsure("a mapping")
                    continue  # nothing under a primitive
                for value in (item.get(field), item.get(extension_field)):
                    if value is None:
                        continue
                    for x in value if type(value) is list else (value,):
                        if type(x) is dict and "resourceType" in x:
                            raise _Unsure("a contained resource")
                        found.append(x)
            items = found
        out: list[tuple[str, Any]] = []
        for item in items:
            if type(item) is not dict:
                if isinstance(item, Mapping):
                    raise _Unsure("a mapping")
                continue
            for field, extension_field, name in last:
                value, extension = item.get(field), item.get(extension_field)
                if value is None and extension is None:
                    continue
                if name is not None:
                    for found_value in (value, extension):
                        if found_value is None:
                            continue
                        for x in found_value if type(found_value) is list else (found_value,):
                            if x is None:
                                continue
                            if type(x) is dict:
                                if "resourceType" in x:
                                    raise _Unsure("a contained resource")
                                if len(x) == 1 and "extension" in x:
                                    continue  # a primitive's extensions alone: not returned
                            elif isinstance(x, list | Mapping):
                                raise _Unsure("a nested list or a mapping")
                            out.append((name, x))
                break
        return out


class FastEvaluator:
    """A compiled expression: its fast result on a resource (or on a node of one), or fhirpathpy's
    whenever the fast path is unsure.

    ``fallback`` compiles the expression with fhirpathpy (on first need: most never need it).
    """

    __slots__ = ("_fallback", "_fhirpathpy", "_path", "_prefixes", "_step", "_steps", "fallbacks")

    def __init__(
        self, chain: Sequence[_Keyed], fallback: Callable[[], _Evaluate], path: _TypedPath | None = None
    ) -> None:
        self._path = path
        self._steps = tuple(step for _, step in chain)
        self._step = _pipeline(self._steps)
        # The number of each proper prefix of the chain, longest first, with its length.
        keys = tuple(key for key, _ in chain)
        # The whole chain is the branch's own result (kept by the extractor): only its proper
        # prefixes are shared.
        self._prefixes = tuple((_prefix_id(keys[:n]), n) for n in range(len(keys) - 1, 0, -1))
        self._fallback = fallback
        self._fhirpathpy: _Evaluate | None = None
        self.fallbacks = 0

    def __call__(self, target: Any) -> list[Any]:
        """The result on ``target``: a resource, a :class:`Node` or a ``ResourceNode``."""
        if type(target) is Node:
            items: list[Any] = [target]
        elif isinstance(target, ResourceNode):
            items = [Node(target.path, target.data)]
        else:
            items = _arraify(target)
        try:
            return _output(self._step(items))
        except Exception:
            return self._fall_back(target)

    def typed(self, target: Any) -> list[tuple[str, Any]] | None:
        """The ``(type name, value)`` pairs the extractor makes of the result on ``target`` when
        the expression is a plain path that can be read straight off the JSON (see
        :class:`_TypedPath`), else ``None`` (evaluate it then)."""
        if self._path is None:
            return None
        try:
            return self._path.read(target)
        except Exception:
            return None

    def shared(self, resource: Any, memory: dict[int, list[Any]]) -> list[Any]:
        """The result on ``resource``, reusing (and adding to) the results of path prefixes in
        ``memory`` that other expressions evaluated on the same resource (``Observation.component``
        for ``Observation.component.code`` and ``Observation.component.value``)."""
        items: list[Any] | None = None
        start = 0
        for number, length in self._prefixes:
            items = memory.get(number)
            if items is not None:
                start = length
                break
        try:
            if items is None:
                items = _arraify(resource)
            steps = self._steps
            prefixes = self._prefixes
            last = len(steps) - 1
            for i in range(start, last):
                items = steps[i](items)
                memory[prefixes[last - i - 1][0]] = items
            return _output(steps[last](items))
        except Exception:
            return self._fall_back(resource)

    def _fall_back(self, target: Any) -> list[Any]:
        # Whatever made the fast path unsure (or fail): fhirpathpy decides, and raises its own
        # error if there is one.
        self.fallbacks += 1
        if self._fhirpathpy is None:
            self._fhirpathpy = self._fallback()
        return self._fhirpathpy(as_resource_node(target))


def _output(items: list[Any]) -> list[Any]:
    """What fhirpathpy's ``returnRawData`` returns: not the bare extension holders of primitives."""
    for item in items:
        if type(item) is Node:
            data = item.data
            if isinstance(data, dict) and "extension" in data and len(data) == 1:
                return [item for item in items if _raw_output(item)]
    return items


def compile_fast(
    tree: Mapping[str, Any],
    model: Mapping[str, Any],
    functions: Mapping[str, Mapping[str, Any]],
    fallback: Callable[[], _Evaluate],
) -> FastEvaluator:
    """The fast evaluator of a parsed expression (``fhirpathpy.parser.parse``), which gives what
    ``fhirpathpy.compile(expression, model, {"returnRawData": True, "userInvocationTable":
    functions})`` gives, ``ResourceNode`` items as :class:`Node` items. fhirpathpy's
    ``TypeInfo.model`` must be ``model`` while evaluating (the fallback needs it too).

    Raises :class:`NotCompiled` for a shape the fast path does not evaluate.
    """
    children = tree.get("children") or []
    if tree.get("type") is not None or len(children) != 1:
        raise NotCompiled("not a parsed expression")
    types = _Types(model)
    chain = _Compiler(types, functions).chain(children[0], top=True)
    # Steps read the model and call the functions: their results are shared only between
    # expressions compiled against the same ones.
    context = (id(model), id(functions))
    return FastEvaluator(
        [((context, *key), step) if i == 0 else (key, step) for i, (key, step) in enumerate(chain)],
        fallback,
        _typed_path(types, [key for key, _ in chain]),
    )


def _typed_path(types: _Types, keys: list[Any]) -> _TypedPath | None:
    """The typed reading of a chain ``Type.a.b`` / ``a.b`` with an optional final ``ofType``."""
    root = None
    if keys and keys[0][0] == "type":
        root = keys[0][1]
        keys = keys[1:]
    of_type = None
    if keys and keys[-1][0] == "ofType":
        of_type = keys[-1][1:]
        keys = keys[:-1]
    if not keys or any(key[0] != "member" or key[1] == "length" for key in keys):
        return None
    return _TypedPath(types, root, tuple(key[1] for key in keys), of_type)
