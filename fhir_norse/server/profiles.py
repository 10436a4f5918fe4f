"""Validation against this server's own profiles (the differentials in ``profiles/``).

A :class:`ProfileValidator` loads the StructureDefinitions of the content pack and the CodeSystems
and ValueSets it binds to, compiles each profile once into a tree of rules and checks resources
against them. It implements the constraint part of https://hl7.org/fhir/R4/profiling.html on top of
the structural validation of :mod:`fhir_norse.server.validation` (which checks a resource against the
base R4 definitions and should run first). What the ElementDefinitions of a differential say
(https://hl7.org/fhir/R4/elementdefinition.html) and how each part is checked:

* **cardinality** (``min``/``max``) of every element the differential names, at any depth, inside
  choice types (``value[x].code``) and slices; whatever the differential leaves out comes from the
  R4 core definitions (``definitions/structure-definitions.json``);
* **fixed[x]** (the instance equals the value exactly) and **pattern[x]** (the instance contains the
  pattern: every property of the pattern, recursively; every item of a pattern array matched by some
  item of the instance array), https://hl7.org/fhir/R4/elementdefinition-definitions.html#ElementDefinition.pattern_x_;
* **type** restrictions: a choice element restricted to ``Quantity`` refuses ``valueString``;
* **targetProfile** of ``Reference``: a relative literal reference (``Patient/1``, also versioned)
  and ``Reference.type`` must name a type the target profiles constrain; other references
  (absolute, ``urn:uuid:``, contained, logical) are not resolved and pass;
* **bindings**: *required* (an error) and *extensible* (a warning) to a ValueSet the pack, or the R4
  core extract, can expand (``compose.include`` of a whole complete CodeSystem, of a concept list or
  of other ValueSets; ``exclude``; a stored ``expansion``). A ValueSet that cannot be expanded here
  (unknown, a filter, an external code system) is skipped, as a terminology server's absence is;
* **constraint** invariants (https://hl7.org/fhir/R4/conformance-rules.html#constraints), evaluated
  with fhirpathpy on the element they sit on (``%resource`` is the resource); ``severity: warning``
  gives a warning;
* **slicing** (https://hl7.org/fhir/R4/profiling.html#slicing) with discriminators of type
  ``value`` or ``pattern`` on a path of element names (``url``, ``$this``, ``code``,
  ``code.coding``...): each instance element is assigned to the first slice it matches, every
  slice's cardinality and own constraints are checked, elements of *closed* slicing that match no
  slice are errors, and ``ordered``/``openAtEnd`` are honoured. ``extension`` is sliced by ``url``
  when the differential says nothing else;
* **extension profiles**: a slice (or element) of type ``Extension`` with a ``profile`` is identified
  by the extension's url; when that profile is in the pack the extension is checked against it too
  (its value type, binding and sub-extensions), otherwise only its cardinality is.

Not checked: the base R4 invariants (``ele-1``, ``obs-6``...; not in the core extract), discriminators
of type ``exists``, ``type`` and ``profile`` or with FHIRPath functions in the path (reported once per
validation as information), re-slicing, whether a referenced resource conforms to a target profile,
``maxLength``, ``minValue``/``maxValue``, ``mustSupport`` and ``isModifier`` (no instance rule).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import fhirpathpy
from fhirpathpy.models import models

from fhir_norse.outcomes import Issue
from fhir_norse.server.search.extract import UnsupportedExpression
from fhir_norse.server.search.extract import compile_expression as check_expression
from fhir_norse.server.validation import DEFINITIONS

__all__ = ["ProfileError", "ProfileValidator"]

JsonDict = dict[str, Any]

CORE_SD = "http://hl7.org/fhir/StructureDefinition/"
_FHIRPATH_MODEL: dict[str, Any] = models["r4"]

# Issue codes from http://hl7.org/fhir/ValueSet/issue-type.
REQUIRED = "required"
STRUCTURE = "structure"
VALUE = "value"
CODE_INVALID = "code-invalid"
INVARIANT = "invariant"
PROCESSING = "processing"
NOT_SUPPORTED = "not-supported"

# A relative literal reference, optionally versioned: https://hl7.org/fhir/R4/references.html#literal.
_RELATIVE_REFERENCE = re.compile(r"([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?")
_SIMPLE_PATH = re.compile(r"\$this|[A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z][A-Za-z0-9]*)*")
_MISSING: Any = object()


class ProfileError(ValueError):
    """A StructureDefinition of the content pack that cannot be compiled."""


def _split_canonical(canonical: str) -> tuple[str, str | None]:
    url, bar, version = canonical.partition("|")
    return url, (version if bar and version else None)


def _choice_name(base: str, code: str) -> str:
    return base + code[0].upper() + code[1:]


def _max(value: Any) -> int | None:
    """``max`` as an int, ``None`` for ``*`` (unbounded)."""
    if value == "*" or value is None:
        return None
    return int(value)


# --- the R4 core definitions ---------------------------------------------------------------------


class _Core:
    """The R4 element rows and expanded core ValueSets extracted by ``tools/extract_definitions.py``."""

    def __init__(self, structures: Mapping[str, Any], value_sets: Mapping[str, Any]) -> None:
        types: dict[str, Any] = structures["types"]
        self.kinds: dict[str, str] = {name: t["kind"] for name, t in types.items()}
        self.rows: dict[str, dict[str, JsonDict]] = {
            name: {row["path"]: row for row in t["elements"]} for name, t in types.items()
        }
        self.primitives = frozenset(name for name, kind in self.kinds.items() if kind == "primitive-type")
        self.value_sets: dict[str, dict[str, frozenset[str]]] = {
            url: {system: frozenset(codes) for system, codes in systems.items()}
            for url, systems in value_sets["valueSets"].items()
        }

    def row(self, owner: str, path: str) -> JsonDict | None:
        """The row of ``path`` in type ``owner``; a type-named choice (``valueQuantity``) too."""
        rows = self.rows.get(owner)
        if rows is None:
            return None
        found = rows.get(path)
        if found is not None:
            return found
        parent, _, name = path.rpartition(".")
        prefix = f"{parent}." if parent else ""
        for row_path, row in rows.items():
            if not row_path.endswith("[x]") or not row_path.startswith(prefix):
                continue
            base = row_path[len(prefix) : -3]
            if "." in base or not name.startswith(base):
                continue
            for code in row.get("types", ()):
                if _choice_name(base, code) == name:
                    return {**row, "path": path, "types": [code]}
        return None

    def has_children(self, owner: str, path: str) -> bool:
        prefix = f"{path}."
        return any(p.startswith(prefix) for p in self.rows.get(owner, ()))


@cache
def _core() -> _Core:
    structures = json.loads((DEFINITIONS / "structure-definitions.json").read_text())
    value_sets = json.loads((DEFINITIONS / "value-sets.json").read_text())
    return _Core(structures, value_sets)


# --- terminology ---------------------------------------------------------------------------------

Expansion = Mapping[str, frozenset[str]]  # system -> codes


class _Terminology:
    """ValueSet expansion from the pack's CodeSystems and ValueSets, the R4 core extract as fallback.

    https://hl7.org/fhir/R4/valueset.html#compositions. ``None`` means "cannot be expanded here".
    """

    def __init__(self, resources: Iterable[Mapping[str, Any]], core: _Core) -> None:
        self.code_systems: dict[str, Mapping[str, Any]] = {}
        self.value_sets: dict[str, Mapping[str, Any]] = {}
        for resource in resources:
            url = resource.get("url")
            if not isinstance(url, str):
                continue
            if resource.get("resourceType") == "CodeSystem":
                self.code_systems[url] = resource
            elif resource.get("resourceType") == "ValueSet":
                self.value_sets[url] = resource
        self.core = core
        self._expansions: dict[str, Expansion | None] = {}

    def expand(self, canonical: str) -> Expansion | None:
        url, version = _split_canonical(canonical)
        key = canonical if version else url
        if key not in self._expansions:
            self._expansions[key] = self._expand(url, version, ())
        return self._expansions[key]

    def _expand(self, url: str, version: str | None, stack: tuple[str, ...]) -> Expansion | None:
        if url in stack:
            return None
        value_set = self.value_sets.get(url)
        if value_set is None:
            return self.core.value_sets.get(url) if version is None else None
        if version is not None and value_set.get("version") not in (None, version):
            return None
        stored = value_set.get("expansion")
        if isinstance(stored, Mapping) and "contains" in stored:
            found: dict[str, set[str]] = {}
            _collect_contains(stored.get("contains") or [], found)
            return {system: frozenset(codes) for system, codes in found.items()}
        compose = value_set.get("compose")
        if not isinstance(compose, Mapping) or not compose.get("include"):
            return None
        inner = (*stack, url)
        included: dict[str, frozenset[str]] = {}
        for part in compose["include"]:
            codes = self._include(part, inner)
            if codes is None:
                return None
            for system, values in codes.items():
                included[system] = included.get(system, frozenset()) | values
        for part in compose.get("exclude") or []:
            codes = self._include(part, inner)
            if codes is None:
                return None
            for system, values in codes.items():
                if system in included:
                    included[system] = included[system] - values
        return included

    def _include(self, part: Mapping[str, Any], stack: tuple[str, ...]) -> Expansion | None:
        """One ``compose.include`` (or ``exclude``): its system part intersected with its ValueSets."""
        if part.get("filter"):
            return None
        parts: list[Expansion] = []
        system = part.get("system")
        if isinstance(system, str):
            concepts = part.get("concept")
            if concepts:
                parts.append(
                    {system: frozenset(c["code"] for c in concepts if isinstance(c.get("code"), str))}
                )
            else:
                all_codes = self._code_system(system, part.get("version"))
                if all_codes is None:
                    return None
                parts.append({system: all_codes})
        for canonical in part.get("valueSet") or []:
            url, version = _split_canonical(canonical)
            expanded = self._expand(url, version, stack)
            if expanded is None:
                return None
            parts.append(expanded)
        if not parts:
            return None
        result = dict(parts[0])
        for other in parts[1:]:
            result = {s: codes & other[s] for s, codes in result.items() if s in other}
        return result

    def _code_system(self, url: str, version: Any) -> frozenset[str] | None:
        code_system = self.code_systems.get(url)
        if code_system is None or code_system.get("content") != "complete":
            return None
        if isinstance(version, str) and code_system.get("version") not in (None, version):
            return None
        found: set[str] = set()
        _collect_concepts(code_system.get("concept") or [], found)
        return frozenset(found)


def _collect_concepts(concepts: Iterable[Any], found: set[str]) -> None:
    for concept in concepts:
        if isinstance(concept, Mapping):
            if isinstance(concept.get("code"), str):
                found.add(concept["code"])
            _collect_concepts(concept.get("concept") or [], found)


def _collect_contains(contains: Iterable[Any], found: dict[str, set[str]]) -> None:
    for entry in contains:
        if isinstance(entry, Mapping):
            system, code = entry.get("system"), entry.get("code")
            if isinstance(system, str) and isinstance(code, str) and not entry.get("abstract"):
                found.setdefault(system, set()).add(code)
            _collect_contains(entry.get("contains") or [], found)


# --- compiled profiles ---------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _compile_fhirpath(expression: str) -> Callable[[Any, Any], list[Any]]:
    """Compile an invariant once; refuse what fhirpathpy cannot parse or lacks a function for."""
    check_expression(expression)
    compiled: Callable[[Any, Any], list[Any]] = fhirpathpy.compile(expression, _FHIRPATH_MODEL)
    return compiled


@dataclass(frozen=True, slots=True)
class _Constraint:
    key: str
    severity: str
    human: str
    expression: str
    evaluate: Callable[[Any, Any], list[Any]] | None  # None: not evaluable (see ``problem``)
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class _Matcher:
    """How one discriminator identifies a slice: the value at ``path`` equals or contains ``value``."""

    path: tuple[str, ...]  # () for $this
    exact: bool  # fixed (equality) or pattern (containment)
    value: Any


@dataclass(slots=True)
class _Slicing:
    rules: str
    ordered: bool
    description: str
    unsupported: str | None = None


@dataclass(slots=True, eq=False)
class _Rule:
    """One element of a profile: the checks on its instance values and its constrained children."""

    profile: str  # canonical (url|version) of the profile the element belongs to
    element_id: str
    name: str  # property name in the parent: ``category``, ``value[x]``, ``valueQuantity``
    keys: tuple[tuple[str, str], ...]  # (JSON property, FHIR type) an instance value may sit at
    many: bool
    min: int
    max: int | None
    allowed: frozenset[str] | None = None  # restricted types; None: any of the base types
    fixed: Any = _MISSING
    pattern: Any = _MISSING
    binding: tuple[str, str] | None = None  # (strength, ValueSet canonical)
    targets: frozenset[str] | None = None  # resource types a Reference may point to
    extension_profiles: tuple[str, ...] = ()
    constraints: tuple[_Constraint, ...] = ()
    children: list[_Rule] = field(default_factory=list)
    slicing: _Slicing | None = None
    slices: list[_Rule] = field(default_factory=list)
    slice_name: str | None = None
    matchers: tuple[_Matcher, ...] = ()  # for a slice: what identifies its elements


@dataclass(frozen=True, slots=True)
class _Profile:
    url: str
    version: str | None
    type: str
    kind: str
    root: _Rule


@dataclass(slots=True)
class _Draft:
    """An element of the differential (or an element implied by a deeper one), before compiling."""

    element: JsonDict = field(default_factory=dict)
    children: dict[str, _Draft] = field(default_factory=dict)
    slices: dict[str, _Draft] = field(default_factory=dict)


def _steps(element: Mapping[str, Any]) -> list[str]:
    element_id = element.get("id")
    if isinstance(element_id, str) and element_id:
        return element_id.split(".")
    steps = str(element["path"]).split(".")
    if element.get("sliceName"):
        steps[-1] = f"{steps[-1]}:{element['sliceName']}"
    return steps


def _prefixed(element: Mapping[str, Any], prefix: str) -> Any:
    for key, value in element.items():
        if key.startswith(prefix) and key[len(prefix) : len(prefix) + 1].isupper():
            return value
    return _MISSING


class _Compiler:
    def __init__(self, core: _Core, structure_definitions: Mapping[str, Mapping[str, Any]]) -> None:
        self.core = core
        self.sds = structure_definitions
        self.label = ""

    def compile(self, sd: Mapping[str, Any]) -> _Profile:
        url = sd["url"]
        self.label = url if sd.get("version") is None else f"{url}|{sd['version']}"
        type_name = sd.get("type")
        if not isinstance(type_name, str) or type_name not in self.core.rows:
            raise ProfileError(f"{url}: type {type_name!r} is not an R4 type this server knows")
        root = _Draft()
        for element in (sd.get("differential") or {}).get("element") or []:
            steps = _steps(element)
            if steps[0] != type_name:
                raise ProfileError(f"{url}: element {'.'.join(steps)} is not on {type_name}")
            node = root
            for step in steps[1:]:
                name, _, slice_name = step.partition(":")
                node = node.children.setdefault(name, _Draft())
                if slice_name:
                    node = node.slices.setdefault(slice_name, _Draft())
            node.element = dict(element)
        row: JsonDict = {"path": "", "min": 0, "max": "*", "types": [type_name]}
        rule = self._rule(url, root, type_name, type_name, row, type_name, None)
        return _Profile(url, sd.get("version"), type_name, str(sd.get("kind")), rule)

    def _rule(
        self,
        url: str,
        draft: _Draft,
        element_id: str,
        name: str,
        row: Mapping[str, Any],
        owner: str,
        sliced: _Rule | None,
        slice_name: str | None = None,
    ) -> _Rule:
        e = draft.element
        where = f"{url}: element {element_id}"
        if "contentReference" in row:
            target = self.core.rows[owner][str(row["contentReference"])]
            base_types = list(target.get("types", ()))
            content_rel: str | None = str(row["contentReference"])
        else:
            base_types = list(row.get("types", ()))
            content_rel = None
        type_entries: list[Mapping[str, Any]] = list(e.get("type") or [])
        if type_entries:
            restricted = frozenset(str(t["code"]) for t in type_entries)
            allowed: frozenset[str] | None = restricted
            if unknown := restricted - set(base_types):
                raise ProfileError(f"{where}: type {', '.join(sorted(unknown))} is not allowed by R4")
        elif sliced is not None:
            allowed = sliced.allowed
            type_entries = []
        else:
            allowed = None
        if name.endswith("[x]"):
            keys = tuple((_choice_name(name[:-3], code), code) for code in base_types)
        else:
            keys = ((name, base_types[0] if base_types else "BackboneElement"),)
        if sliced is not None:
            min_ = int(e.get("min", 0))
            max_ = _max(e["max"]) if "max" in e else sliced.max
        else:
            min_ = int(e.get("min", row["min"]))
            max_ = _max(e.get("max", row["max"]))
        rule = _Rule(
            profile=self.label,
            element_id=element_id,
            name=name,
            keys=keys,
            many=_max(row["max"]) != 1,
            min=min_,
            max=max_,
            allowed=allowed,
            fixed=_prefixed(e, "fixed"),
            pattern=_prefixed(e, "pattern"),
            slice_name=slice_name,
        )
        binding = e.get("binding")
        if isinstance(binding, Mapping) and binding.get("strength") in ("required", "extensible"):
            value_set = binding.get("valueSet") or binding.get("valueSetCanonical")
            if isinstance(value_set, str):
                rule.binding = (str(binding["strength"]), value_set)
        rule.constraints = tuple(self._constraint(c) for c in e.get("constraint") or [])
        rule.targets = self._targets(type_entries)
        rule.extension_profiles = tuple(
            str(p) for t in type_entries if t.get("code") == "Extension" for p in t.get("profile") or []
        )
        if len(rule.extension_profiles) == 1 and slice_name is not None:
            # An extension slice cannot repeat more often than its extension's own root allows.
            ext_max = self._extension_root_max(rule.extension_profiles[0])
            if ext_max is not None and (rule.max is None or ext_max < rule.max):
                rule.max = ext_max

        containers = self._containers(owner, row, content_rel, allowed, base_types)
        for child_name, child in draft.children.items():
            child_row, child_owner = self._child_row(containers, child_name)
            if child_row is None:
                raise ProfileError(f"{where}.{child_name}: no such element in R4")
            rule.children.append(
                self._rule(
                    url,
                    child,
                    f"{element_id}.{child_name}",
                    child_name,
                    child_row,
                    child_owner,
                    None,
                )
            )
        for s_name, s_draft in draft.slices.items():
            rule.slices.append(
                self._rule(url, s_draft, f"{element_id}:{s_name}", name, row, owner, rule, s_name)
            )
        if rule.slices:
            rule.slicing = self._slicing(e.get("slicing"), rule)
        elif isinstance(e.get("slicing"), Mapping):
            rule.slicing = self._slicing(e["slicing"], rule)
        return rule

    def _containers(
        self,
        owner: str,
        row: Mapping[str, Any],
        content_rel: str | None,
        allowed: frozenset[str] | None,
        base_types: Sequence[str],
    ) -> list[tuple[str, str]]:
        """Where the children of an element are defined: (type, relative path) candidates."""
        if content_rel is not None:
            return [(owner, content_rel)]
        path = str(row["path"])
        if path == "":  # the root
            return [(owner, "")]
        if list(base_types) in (["BackboneElement"], ["Element"]) and self.core.has_children(owner, path):
            # A backbone element: its children are defined inline in the same type.
            return [(owner, path)]
        types = [t for t in base_types if allowed is None or t in allowed]
        return [(t, "") for t in types if t in self.core.rows and t not in self.core.primitives]

    def _child_row(self, containers: Sequence[tuple[str, str]], name: str) -> tuple[JsonDict | None, str]:
        for owner, rel in containers:
            found = self.core.row(owner, f"{rel}.{name}" if rel else name)
            if found is not None:
                return found, owner
        return None, ""

    def _constraint(self, c: Mapping[str, Any]) -> _Constraint:
        expression = str(c.get("expression") or "")
        key = str(c.get("key") or "?")
        severity = "warning" if c.get("severity") == "warning" else "error"
        human = str(c.get("human") or key)
        if not expression:
            return _Constraint(key, severity, human, expression, None, "it has no FHIRPath expression")
        try:
            return _Constraint(key, severity, human, expression, _compile_fhirpath(expression))
        except UnsupportedExpression as exc:
            return _Constraint(key, severity, human, expression, None, str(exc))

    def _targets(self, type_entries: Sequence[Mapping[str, Any]]) -> frozenset[str] | None:
        targets: set[str] = set()
        for entry in type_entries:
            if entry.get("code") != "Reference":
                continue
            for canonical in entry.get("targetProfile") or []:
                resource_type = self._profile_type(str(canonical))
                if resource_type is None:
                    return None  # a target this server cannot place: accept any
                targets.add(resource_type)
        return frozenset(targets) if targets else None

    def _profile_type(self, canonical: str) -> str | None:
        url, _ = _split_canonical(canonical)
        sd = self.sds.get(url)
        if sd is not None:
            return str(sd["type"])
        if url.startswith(CORE_SD):
            name = url[len(CORE_SD) :]
            if "/" not in name and name[:1].isupper():
                return name
        return None

    def _extension_root_max(self, canonical: str) -> int | None:
        sd = self.sds.get(_split_canonical(canonical)[0])
        if sd is None:
            return None
        for element in (sd.get("differential") or {}).get("element") or []:
            if element.get("path") == "Extension" and "max" in element:
                return _max(element["max"])
        return None

    def _slicing(self, slicing: Any, rule: _Rule) -> _Slicing:
        if not isinstance(slicing, Mapping):
            if rule.name not in ("extension", "modifierExtension"):
                return _Slicing("open", False, "?", f"{rule.element_id} has slices but no slicing")
            # https://hl7.org/fhir/R4/extensibility.html: extensions are sliced by url.
            slicing = {"discriminator": [{"type": "value", "path": "url"}], "rules": "open"}
        discriminators = list(slicing.get("discriminator") or [])
        description = ", ".join(f"{d.get('type')}:{d.get('path')}" for d in discriminators)
        result = _Slicing(str(slicing.get("rules") or "open"), bool(slicing.get("ordered")), description)
        if not discriminators:
            result.unsupported = "slicing without a discriminator"
            return result
        for d in discriminators:
            path = str(d.get("path"))
            if d.get("type") not in ("value", "pattern"):
                result.unsupported = f"discriminator type '{d.get('type')}' is not supported"
                return result
            if not _SIMPLE_PATH.fullmatch(path):
                result.unsupported = f"discriminator path '{path}' is not a path of element names"
                return result
        for s in rule.slices:
            matchers: list[_Matcher] = []
            for d in discriminators:
                matcher = self._matcher(s, str(d["path"]))
                if matcher is None:
                    result.unsupported = f"slice '{s.slice_name}' fixes no value at '{d['path']}'"
                    return result
                matchers.append(matcher)
            s.matchers = tuple(matchers)
        return result

    def _matcher(self, slice_rule: _Rule, path: str) -> _Matcher | None:
        steps = () if path == "$this" else tuple(path.split("."))
        node: _Rule | None = slice_rule
        for step in steps:
            assert node is not None
            node = next((c for c in node.children if c.name == step), None)
            if node is None:
                break
        if node is not None:
            if node.fixed is not _MISSING:
                return _Matcher(steps, True, node.fixed)
            if node.pattern is not _MISSING:
                return _Matcher(steps, False, node.pattern)
        if steps == ("url",) and len(slice_rule.extension_profiles) == 1:
            # An extension's url is its profile's canonical.
            return _Matcher(steps, True, _split_canonical(slice_rule.extension_profiles[0])[0])
        return None


# --- comparing values ----------------------------------------------------------------------------


def _scalar_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def _equal(actual: Any, fixed: Any) -> bool:
    """fixed[x]: the instance is exactly the value (https://hl7.org/fhir/R4/elementdefinition.html)."""
    if isinstance(fixed, dict):
        return (
            isinstance(actual, dict)
            and set(actual) == set(fixed)
            and all(_equal(actual[k], v) for k, v in fixed.items())
        )
    if isinstance(fixed, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(fixed)
            and all(_equal(a, f) for a, f in zip(actual, fixed, strict=True))
        )
    return not isinstance(actual, dict | list) and _scalar_equal(actual, fixed)


def _contains(actual: Any, pattern: Any) -> bool:
    """pattern[x]: every property of the pattern is in the instance, every array item matched."""
    if isinstance(pattern, dict):
        return isinstance(actual, dict) and all(
            k in actual and _contains(actual[k], v) for k, v in pattern.items()
        )
    if isinstance(pattern, list):
        return isinstance(actual, list) and all(any(_contains(a, p) for a in actual) for p in pattern)
    return not isinstance(actual, dict | list) and _scalar_equal(actual, pattern)


def _at_path(value: Any, path: tuple[str, ...]) -> list[Any]:
    """The values at a discriminator path (arrays on the way are flattened)."""
    current = [value]
    for step in path:
        nxt: list[Any] = []
        for item in current:
            if isinstance(item, dict) and step in item:
                found = item[step]
                nxt.extend(found if isinstance(found, list) else [found])
        current = nxt
    return current


def _slice_index(slices: Sequence[_Rule]) -> dict[tuple[str, str], list[int]] | None:
    """For slices told apart by one CodeableConcept pattern on the same path (the usual
    ``component.code`` slicing), the slices each (system, code) may select: a lookup instead of
    testing every slice's pattern against every value. None when the slicing has another shape."""
    if not slices:
        return None
    paths = {s.matchers[0].path for s in slices if len(s.matchers) == 1}
    if len(paths) != 1 or any(len(s.matchers) != 1 or s.matchers[0].exact for s in slices):
        return None
    index: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(slices):
        pattern = s.matchers[0].value
        codings = pattern.get("coding") if isinstance(pattern, dict) and set(pattern) == {"coding"} else None
        if not isinstance(codings, list) or not codings or not isinstance(codings[0], dict):
            return None
        system, code = codings[0].get("system"), codings[0].get("code")
        if not isinstance(system, str) or not isinstance(code, str):
            return None
        index.setdefault((system, code), []).append(i)
    return index


def _candidates(value: Any, path: tuple[str, ...], index: dict[tuple[str, str], list[int]]) -> list[int]:
    """The slices whose pattern may match ``value``: those keyed by one of its codings at ``path``."""
    found: set[int] = set()
    for concept in _at_path(value, path):
        for coding in concept.get("coding") or [] if isinstance(concept, dict) else []:
            if isinstance(coding, dict):
                found.update(index.get((coding.get("system"), coding.get("code")), ()))  # type: ignore[arg-type]
    return sorted(found)


def _matches(value: Any, matchers: Sequence[_Matcher]) -> bool:
    for m in matchers:
        found = _at_path(value, m.path)
        if m.exact:
            ok = len(found) == 1 and _equal(found[0], m.value)
        elif isinstance(m.value, list):
            ok = _contains(found, m.value)
        else:
            ok = any(_contains(item, m.value) for item in found)
        if not ok:
            return False
    return True


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


# --- checking an instance ------------------------------------------------------------------------


class _Value(NamedTuple):
    key: str  # JSON property it was found at
    type: str  # its FHIR type
    value: Any  # None for a primitive that only has an extension (``_status``)
    expr: str


class _Run:
    """One validation of one instance against one profile."""

    def __init__(self, validator: ProfileValidator, root: Any) -> None:
        self.validator = validator
        self.root = root
        self.issues: list[Issue] = []

    def add(self, rule: _Rule, expr: str, message: str, code: str, severity: str = "error") -> None:
        """One issue; the diagnostics name the element definition and the profile it comes from."""
        diagnostics = f"{expr}: {message} ({rule.element_id} in {rule.profile})"
        self.issues.append(Issue(diagnostics, code=code, severity=severity, expression=(expr,)))

    # one element of a parent object
    def rule(self, rule: _Rule, parent: Mapping[str, Any], parent_expr: str) -> None:
        values = self._gather(rule, parent, parent_expr)
        self._cardinality(rule, values, parent_expr, f"{parent_expr}.{rule.name}", "")
        typed = [v for v in values if self._type_allowed(rule, v)]
        for v in typed:
            self.value(rule, v)
        if rule.slicing is not None:
            self._slices(rule, typed, parent_expr)

    def _gather(self, rule: _Rule, parent: Mapping[str, Any], parent_expr: str) -> list[_Value]:
        out: list[_Value] = []
        primitives = self.validator.core.primitives
        for key, type_code in rule.keys:
            raw = parent.get(key)
            twin = parent.get(f"_{key}") if type_code in primitives else None
            if raw is None and twin is None:
                continue
            if rule.many or isinstance(raw, list):
                items = raw if isinstance(raw, list) else ([] if raw is None else [raw])
                twins = twin if isinstance(twin, list) else []
                for i in range(max(len(items), len(twins))):
                    item = items[i] if i < len(items) else None
                    if item is None and (i >= len(twins) or twins[i] is None):
                        continue
                    out.append(_Value(key, type_code, item, f"{parent_expr}.{key}[{i}]"))
            else:
                out.append(_Value(key, type_code, raw, f"{parent_expr}.{key}"))
        return out

    def _type_allowed(self, rule: _Rule, v: _Value) -> bool:
        if rule.allowed is None or v.type in rule.allowed:
            return True
        expected = " or ".join(sorted(rule.allowed))
        self.add(rule, v.expr, f"type {v.type} is not allowed here (expected {expected})", STRUCTURE)
        return False

    def _cardinality(
        self, rule: _Rule, values: Sequence[_Value], parent_expr: str, missing_expr: str, what: str
    ) -> None:
        n = len(values)
        if n < rule.min:
            self.add(rule, missing_expr, f"{what}at least {rule.min} required, found {n}", REQUIRED)
        if rule.max is not None and n > rule.max:
            for key in dict.fromkeys(v.key for v in values):
                expr = f"{parent_expr}.{key}"
                if rule.max == 0:
                    self.add(rule, expr, f"{what}not allowed (max 0)", STRUCTURE)
                else:
                    self.add(rule, expr, f"{what}at most {rule.max} allowed, found {n}", STRUCTURE)

    # one instance value of an element
    def value(self, rule: _Rule, v: _Value) -> None:
        if rule.fixed is not _MISSING and not _equal(v.value, rule.fixed):
            self.add(rule, v.expr, f"{_shown(v.value)} is not the fixed value {_shown(rule.fixed)}", VALUE)
        if rule.pattern is not _MISSING and not _contains(v.value, rule.pattern):
            message = f"{_shown(v.value)} does not match the pattern {_shown(rule.pattern)}"
            self.add(rule, v.expr, message, VALUE)
        if rule.binding is not None and v.value is not None:
            self._binding(rule, rule.binding, v)
        if rule.targets is not None and v.type == "Reference" and isinstance(v.value, dict):
            self._reference(rule, rule.targets, v)
        if rule.extension_profiles and isinstance(v.value, dict):
            self._extension(rule.extension_profiles, v)
        for constraint in rule.constraints:
            self._constraint(rule, constraint, v)
        if isinstance(v.value, dict):
            for child in rule.children:
                self.rule(child, v.value, v.expr)

    def _slices(self, rule: _Rule, values: Sequence[_Value], parent_expr: str) -> None:
        slicing = rule.slicing
        assert slicing is not None
        element_expr = f"{parent_expr}.{rule.name}"
        if slicing.unsupported is not None:
            message = f"slicing ({slicing.description}) not checked: {slicing.unsupported}"
            self.add(rule, element_expr, message, NOT_SUPPORTED, "information")
            return
        assigned: list[int | None] = []
        lookup = self.validator.slice_index(rule)
        for v in values:
            if lookup is not None:
                candidates = _candidates(v.value, rule.slices[0].matchers[0].path, lookup)
                order = (rule.slices[i] for i in candidates)
                found = next((s for s in order if _matches(v.value, s.matchers)), None)
                index = None if found is None else rule.slices.index(found)
            else:
                index = next((i for i, s in enumerate(rule.slices) if _matches(v.value, s.matchers)), None)
            assigned.append(index)
        for i, s in enumerate(rule.slices):
            members = [v for v, a in zip(values, assigned, strict=True) if a == i]
            self._cardinality(s, members, parent_expr, element_expr, f"slice '{s.slice_name}': ")
            for v in members:
                if self._type_allowed(s, v):
                    self.value(s, v)
        last = -1
        seen_unmatched = False
        for v, a in zip(values, assigned, strict=True):
            if a is None:
                if slicing.rules == "closed":
                    message = f"matches no slice of the closed slicing ({slicing.description})"
                    self.add(rule, v.expr, message, STRUCTURE)
                seen_unmatched = True
                continue
            name = rule.slices[a].slice_name
            if slicing.rules == "openAtEnd" and seen_unmatched:
                self.add(rule, v.expr, f"slice '{name}' after unsliced elements (openAtEnd)", STRUCTURE)
            if slicing.ordered and a < last:
                self.add(rule, v.expr, f"slice '{name}' is out of order (ordered slicing)", STRUCTURE)
            last = max(last, a)

    def _binding(self, rule: _Rule, binding: tuple[str, str], v: _Value) -> None:
        strength, value_set = binding
        expansion = self.validator.terminology.expand(value_set)
        if expansion is None:
            return
        severity = "error" if strength == "required" else "warning"
        where = f"ValueSet {value_set} ({strength})"
        value = v.value

        def known(coding: Any) -> bool:
            if not isinstance(coding, Mapping):
                return False
            system, code = coding.get("system"), coding.get("code")
            return isinstance(system, str) and code in expansion.get(system, ())

        problem: str | None = None
        if v.type in ("code", "string", "uri"):
            if not any(value in codes for codes in expansion.values()):
                problem = f"code {_shown(value)} is not in {where}"
        elif v.type == "Coding":
            if not known(value):
                problem = f"{_coding(value)} is not in {where}"
        elif v.type == "CodeableConcept" and isinstance(value, Mapping):
            codings = value.get("coding") if isinstance(value.get("coding"), list) else []
            if not codings:
                # Text alone is what an extensible binding allows when no code fits.
                if strength == "required":
                    problem = f"no coding, but one from {where} is needed"
            elif not any(known(c) for c in codings):
                problem = f"none of the codings ({', '.join(_coding(c) for c in codings)}) is in {where}"
        elif v.type == "Quantity" and isinstance(value, Mapping) and "code" in value and not known(value):
            problem = f"unit {_coding(value)} is not in {where}"
        if problem is not None:
            self.add(rule, v.expr, problem, CODE_INVALID, severity)

    def _reference(self, rule: _Rule, targets: frozenset[str], v: _Value) -> None:
        expected = " or ".join(sorted(targets))
        reference = v.value.get("reference")
        if isinstance(reference, str):
            match = _RELATIVE_REFERENCE.fullmatch(reference)
            if match is not None and match[1] not in targets:
                self.add(rule, v.expr, f"refers to a {match[1]}, but only {expected} is allowed", STRUCTURE)
        declared = v.value.get("type")
        if isinstance(declared, str):
            name = declared.removeprefix(CORE_SD)
            if "/" not in name and name not in targets:
                message = f"type {name} is not allowed (expected {expected})"
                self.add(rule, f"{v.expr}.type", message, STRUCTURE)

    def _extension(self, canonicals: Sequence[str], v: _Value) -> None:
        profiles = self.validator.profiles
        known = [p for p in (profiles.get(_split_canonical(c)[0]) for c in canonicals) if p is not None]
        chosen = next((p for p in known if p.url == v.value.get("url")), None)
        if chosen is None and len(canonicals) == 1 and known:
            chosen = known[0]
        if chosen is None or chosen.type != "Extension":
            return
        self.value(chosen.root, _Value(v.key, "Extension", v.value, v.expr))

    def _constraint(self, rule: _Rule, constraint: _Constraint, v: _Value) -> None:
        label = f"{constraint.key}: {constraint.human}"
        if constraint.evaluate is None:
            message = f"invariant {label} not checked: {constraint.problem}"
            self.add(rule, v.expr, message, NOT_SUPPORTED, "information")
            return
        try:
            result = constraint.evaluate(v.value, {"resource": self.root, "rootResource": self.root})
        except Exception as exc:  # fhirpathpy raises plain exceptions on data it cannot handle
            message = f"invariant {label} could not be evaluated: {type(exc).__name__}: {exc}"
            self.add(rule, v.expr, message, PROCESSING, "warning")
            return
        if any(item is False for item in result):
            message = f"invariant {label} failed ({constraint.expression})"
            self.add(rule, v.expr, message, INVARIANT, constraint.severity)


def _coding(value: Any) -> str:
    if not isinstance(value, Mapping):
        return _shown(value)
    return f"{value.get('system', '(no system)')}#{value.get('code', '(no code)')}"


# --- the validator -------------------------------------------------------------------------------


class ProfileValidator:
    """Validates resources against the profiles of this server's content pack.

    https://hl7.org/fhir/R4/profiling.html and https://hl7.org/fhir/R4/elementdefinition.html; see
    the module documentation for what is checked. Built once at start-up; :meth:`validate` is
    thread-safe (expansions are cached on first use; two threads may compute the same one).
    """

    def __init__(
        self,
        structure_definitions: Iterable[Mapping[str, Any]],
        terminology: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        self.core = _core()
        self.terminology = _Terminology(terminology, self.core)
        by_url = {str(sd["url"]): sd for sd in structure_definitions}
        compiler = _Compiler(self.core, by_url)
        self.profiles: dict[str, _Profile] = {url: compiler.compile(sd) for url, sd in by_url.items()}
        # Slice lookups by rule, built on first use (the same for every thread that builds one).
        self._slice_indexes: dict[int, dict[tuple[str, str], list[int]] | None] = {}

    def slice_index(self, rule: _Rule) -> dict[tuple[str, str], list[int]] | None:
        """The (system, code) lookup of a sliced element's slices (:func:`_slice_index`), cached."""
        key = id(rule)
        if key not in self._slice_indexes:
            self._slice_indexes[key] = _slice_index(rule.slices)
        return self._slice_indexes[key]

    @classmethod
    def from_content_dir(cls, root: Path) -> ProfileValidator:
        """Every StructureDefinition under ``root/profiles`` and every CodeSystem and ValueSet under
        ``root/profiles`` and ``root/questionnaires`` (not ``questionnaires/source``)."""
        structure_definitions: list[JsonDict] = []
        terminology: list[JsonDict] = []
        for folder in (root / "profiles", root / "questionnaires"):
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*.json")):
                relative = path.relative_to(folder).parts
                if folder.name == "questionnaires" and relative[0] == "source":
                    continue
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data, dict):
                    continue
                kind = data.get("resourceType")
                if kind == "StructureDefinition" and folder.name == "profiles":
                    structure_definitions.append(data)
                elif kind in ("CodeSystem", "ValueSet"):
                    terminology.append(data)
        return cls(structure_definitions, terminology)

    @property
    def urls(self) -> list[str]:
        """The canonical URLs of the profiles (and extensions) this validator knows."""
        return sorted(self.profiles)

    def _find(self, canonical: str) -> _Profile | None:
        url, version = _split_canonical(canonical)
        profile = self.profiles.get(url)
        if profile is None or (version is not None and profile.version not in (None, version)):
            return None
        return profile

    def knows(self, url: str) -> bool:
        """Whether ``url`` (or ``url|version``) names a profile of the pack."""
        return self._find(url) is not None

    def profile_type(self, url: str) -> str | None:
        """The type a known profile constrains (``Observation``, ``Extension``)."""
        profile = self._find(url)
        return None if profile is None else profile.type

    def validate(self, resource: Mapping[str, Any], profile_url: str) -> list[Issue]:
        """The problems of ``resource`` against the profile ``profile_url`` (empty: it conforms).

        ``resource`` is a resource, or a bare element (an Extension) for a profile on a data type.
        Errors have severity ``error``; extensible-binding misses and warning-level invariants
        ``warning``; what could not be checked ``information``.
        """
        profile = self._find(profile_url)
        resource_type = resource.get("resourceType") if isinstance(resource, Mapping) else None
        root_expr = resource_type if isinstance(resource_type, str) else "Resource"
        if profile is None:
            message = f"profile {profile_url} is not known to this server"
            return [Issue(f"{root_expr}: {message}", code=NOT_SUPPORTED, expression=(root_expr,))]
        run = _Run(self, resource)
        if profile.kind == "resource":
            if resource_type != profile.type:
                message = f"the profile constrains {profile.type}, not {resource_type}"
                run.add(profile.root, root_expr, message, STRUCTURE)
                return run.issues
        else:
            root_expr = profile.type
            if not isinstance(resource, Mapping) or "resourceType" in resource:
                message = f"the profile constrains the data type {profile.type}, not a resource"
                run.add(profile.root, root_expr, message, STRUCTURE)
                return run.issues
        run.value(profile.root, _Value(profile.type, profile.type, resource, root_expr))
        return run.issues
