"""The layers of DESIGN.md ("Layers"): no import cycles, and the import-linter contracts that enforce them.

The import graph is read from the source with :mod:`ast` (every ``import``, also inside functions and
under ``TYPE_CHECKING``: a lazy import still is a dependency). Two graphs:

* packages: the first level under ``fhir_norse`` (``server``, ``rom`` ...; a module such as
  ``outcomes.py`` is its own node, the package root ``fhir_norse/__init__.py`` too);
* modules: every ``.py`` file (a package is its ``__init__.py``).

Neither may have a cycle. ``lint-imports`` (``make check``) checks the contracts themselves; the last
tests here make sure the contracts are still there, as strict as DESIGN.md draws them.
"""

from __future__ import annotations

import ast
import itertools
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ROOT_PACKAGE = "fhir_norse"

Graph = dict[str, set[str]]


# --- the import graph --------------------------------------------------------------------------------


def modules_under(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``package_dir``."""
    found: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _known_prefix(name: str, known: Mapping[str, Path]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imported_modules(name: str, path: Path, known: Mapping[str, Path]) -> Iterator[str]:
    """The project modules that module ``name`` (file ``path``) imports."""
    is_package = path.name == "__init__.py"
    root = name.split(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            # ``from package import module`` imports the module; ``from module import name`` the module.
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != root:
                continue
            resolved = _known_prefix(target, known)
            if resolved is not None and resolved != name:
                yield resolved


def module_graph(package_dir: Path) -> Graph:
    known = modules_under(package_dir)
    return {name: set(imported_modules(name, path, known)) for name, path in known.items()}


def package_of(module: str) -> str:
    """``fhir_norse.server.search.parse`` -> ``server``; ``fhir_norse.outcomes`` -> ``outcomes``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph(modules: Graph) -> Graph:
    graph: Graph = {}
    for source, targets in modules.items():
        node = graph.setdefault(package_of(source), set())
        node.update(package_of(t) for t in targets if package_of(t) != package_of(source))
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``) per strongly connected component of more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan; the graphs here are a few hundred nodes deep at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: Graph, component: set[str]) -> list[str]:
    """The shortest cycle through the component's first node (breadth-first, inside the component)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for target in sorted(graph.get(node, set()) & component):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def _describe(found: list[list[str]], modules: Graph | None = None) -> str:
    lines = []
    for cycle in found:
        lines.append(" -> ".join(cycle))
        if modules is not None:  # name the module imports behind each package edge
            for source, target in itertools.pairwise(cycle):
                edges = sorted(
                    f"{m} -> {t}"
                    for m, targets in modules.items()
                    if package_of(m) == source
                    for t in targets
                    if package_of(t) == target
                )
                lines.append(f"    {source} -> {target}: {', '.join(edges)}")
    return "\n".join(lines)


def test_no_cycle_between_packages() -> None:
    modules = module_graph(ROOT / ROOT_PACKAGE)
    found = cycles(package_graph(modules))
    assert not found, "packages of fhir_norse import each other in a cycle:\n" + _describe(found, modules)


def test_no_cycle_between_modules() -> None:
    found = cycles(module_graph(ROOT / ROOT_PACKAGE))
    assert not found, "modules of fhir_norse import each other in a cycle:\n" + _describe(found)


def test_the_graphs_see_relative_lazy_and_from_imports(tmp_path: Path) -> None:
    """The checks above can fail: a small package with a package cycle and a module cycle."""
    package = tmp_path / "pkg"
    for folder in ("a", "b"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text("X = 1\n")
    (package / "a" / "one.py").write_text("from pkg.b import two\nfrom ..base import X\n")
    (package / "b" / "two.py").write_text("def later() -> None:\n    from pkg.a.one import X\n")
    (package / "b" / "three.py").write_text("from . import two\nimport pkg.base\n")
    modules = module_graph(package)
    assert modules["pkg.a.one"] == {"pkg.b.two", "pkg.base"}
    assert modules["pkg.b.two"] == {"pkg.a.one"}
    assert modules["pkg.b.three"] == {"pkg.b.two", "pkg.base"}
    assert cycles(modules) == [["pkg.a.one", "pkg.b.two", "pkg.a.one"]]
    assert package_graph(modules)["a"] == {"b", "base"}
    assert cycles(package_graph(modules)) == [["a", "b", "a"]]
    (package / "b" / "two.py").write_text("")
    assert cycles(module_graph(package)) == []


# --- the import-linter contracts in pyproject.toml ------------------------------------------------------

LAYERS = [
    {"fhir_norse.api", "fhir_norse.cli"},
    {"fhir_norse.web"},
    {"fhir_norse.compose"},
    {"fhir_norse.rom"},
    {"fhir_norse.server"},
    {"fhir_norse.auth"},
    {"fhir_norse.store", "fhir_norse.messaging"},
    {"fhir_norse.outcomes", "fhir_norse.canonicals", "fhir_norse.definitions"},
]
DOMAIN = {"fhir_norse.instruments", "fhir_norse.scoring", "fhir_norse.alerts", "fhir_norse.adaptive"}
SERVER = {"fhir_norse.server", "fhir_norse.auth", "fhir_norse.store"}
FOUNDATIONS = {"fhir_norse.outcomes", "fhir_norse.canonicals", "fhir_norse.definitions"}
# What each forbidden contract must refuse (at least): (sources, forbidden).
FORBIDDEN: dict[str, tuple[set[str], set[str]]] = {
    "pure domain": (
        DOMAIN,
        {
            "fhir_norse.api",
            "fhir_norse.cli",
            "fhir_norse.rom",
            "fhir_norse.server",
            "fhir_norse.auth",
            "fhir_norse.store",
            "fhir_norse.config",
            "fastapi",
            "sqlalchemy",
            "sqlmodel",
        },
    ),
    "generic server": (SERVER, DOMAIN | {"fhir_norse.rom"}),
    "foundations": (
        FOUNDATIONS,
        {
            "fhir_norse.api",
            "fhir_norse.cli",
            "fhir_norse.rom",
            "fhir_norse.server",
            "fhir_norse.auth",
            "fhir_norse.store",
            "fhir_norse.config",
            *DOMAIN,
        },
    ),
}


def _layer(entry: str) -> set[str]:
    """``"a | b"`` -> {a, b}; an optional layer ``"(a)"`` -> {a}."""
    return {part.strip().strip("()").strip() for part in entry.replace(":", "|").split("|")}


def contract_problems(config: Mapping[str, Any]) -> list[str]:
    """What is missing from ``[tool.importlinter]`` for the layers of DESIGN.md (empty: all there)."""
    linter = config.get("tool", {}).get("importlinter")
    if not isinstance(linter, dict):
        return ["pyproject.toml has no [tool.importlinter]"]
    problems = []
    if linter.get("root_package") != ROOT_PACKAGE:
        problems.append(f"root_package is {linter.get('root_package')!r}, not {ROOT_PACKAGE!r}")
    if linter.get("include_external_packages") is not True:
        problems.append("include_external_packages must be true (the domain may not import fastapi ...)")
    contracts = linter.get("contracts") or []
    layered = [c for c in contracts if c.get("type") == "layers"]
    if not any([_layer(e) for e in c.get("layers", [])] == LAYERS for c in layered):
        problems.append(f"no layers contract with the layers {LAYERS}")
    for c in layered:
        if c.get("exhaustive") is False and c.get("containers"):
            problems.append(f"{c.get('name')}: layers must not be limited to containers")
        for ignored in c.get("ignore_imports", []):
            if ignored != "fhir_norse.cli -> fhir_norse.api.app":
                problems.append(f"{c.get('name')}: ignores {ignored!r}")
    forbidden = [c for c in contracts if c.get("type") == "forbidden"]
    for what, (sources, refused) in FORBIDDEN.items():
        if not any(
            sources <= set(c.get("source_modules", []))
            and refused <= set(c.get("forbidden_modules", []))
            and not c.get("allow_indirect_imports", False)
            and not c.get("ignore_imports")
            for c in forbidden
        ):
            problems.append(f"no forbidden contract for the {what}: {sorted(sources)} -/-> {sorted(refused)}")
    return problems


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_import_linter_contracts_are_in_pyproject() -> None:
    assert contract_problems(pyproject()) == []


def test_the_contract_check_notices_a_weakened_contract() -> None:
    config = pyproject()
    contracts = config["tool"]["importlinter"]["contracts"]
    for drop in range(len(contracts)):
        weakened = {"tool": {"importlinter": {**config["tool"]["importlinter"]}}}
        weakened["tool"]["importlinter"]["contracts"] = contracts[:drop] + contracts[drop + 1 :]
        assert contract_problems(weakened), f"dropping contract {drop} went unnoticed"
    for index, contract in enumerate(contracts):
        if contract["type"] == "forbidden":
            loose = [
                *contracts[:index],
                {**contract, "allow_indirect_imports": True},
                *contracts[index + 1 :],
            ]
            weakened = {"tool": {"importlinter": {**config["tool"]["importlinter"], "contracts": loose}}}
            assert contract_problems(weakened)
    assert contract_problems({}) == ["pyproject.toml has no [tool.importlinter]"]
