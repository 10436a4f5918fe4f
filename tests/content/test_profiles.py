"""The profiles package (``profiles/``): R4 StructureDefinitions and the OperationDefinitions of this
server's own operations, packaged as a FHIR NPM package.

Checks the package layout of https://hl7.org/fhir/R4/packages.html (``package.json`` and
``.index.json``), that every StructureDefinition and OperationDefinition is a valid R4 resource (the
server's own validator and the independent fhirclient parser), that every differential element names a
real R4 element path (https://hl7.org/fhir/R4/elementdefinition.html#id) without widening the base
cardinality, and that the OperationDefinitions describe the operations as the server runs them.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from fhirpathpy import evaluate

from fhir_norse.outcomes import BadRequest
from fhir_norse.server.validation import validate_resource
from tests.fhir_r4_client import parse_r4

JsonDict = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "profiles"
R4_DEFINITIONS = ROOT / "fhir_norse" / "definitions" / "structure-definitions.json"
CANONICAL = "http://fhir-norse.org/fhir"
CORE_SD = "http://hl7.org/fhir/StructureDefinition/"
# Canonicals a profile may point to outside its own package: the R4 core package it depends on (with
# the FHIRPath system types its snapshots name), HL7 terminology and UCUM.
EXTERNAL_PREFIXES = (
    "http://hl7.org/fhir/",
    "http://hl7.org/fhirpath/",
    "http://terminology.hl7.org/",
    "http://unitsofmeasure.org",
)
META_FILES = {"package.json", ".index.json"}

EXPECTED_PROFILES = {
    "rom-scale-score": "Observation",
    "rom-alliance": "Observation",
    "rom-preference": "Observation",
    "rom-panel": "Observation",
    "rom-report": "DiagnosticReport",
    "rom-questionnaire-response": "QuestionnaireResponse",
    "rom-alert-flag": "Flag",
    "rom-scale-override": "ServiceRequest",
    "administration-context": "Extension",
    "nf21-item": "Extension",
    "monitoring-answer-window": "Extension",
    "monitoring-before-appointment": "Extension",
    "messaging-opt-out": "Extension",
}
# id -> code of this server's own operations (listed in the CapabilityStatement on Patient).
EXPECTED_OPERATIONS = {
    "Patient-tailored-form": "tailored-form",
    "Patient-adaptive-state": "adaptive-state",
}


def _load(path: Path) -> JsonDict:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: not a JSON object"
    return data


def _json_files() -> list[Path]:
    return sorted(p for p in PROFILES.iterdir() if p.is_file() and p.name.endswith(".json"))


def _resource_files() -> list[Path]:
    return [p for p in _json_files() if p.name not in META_FILES]


def _structure_definitions() -> list[JsonDict]:
    return [
        r for r in (_load(p) for p in _resource_files()) if r.get("resourceType") == "StructureDefinition"
    ]


SD_FILES = [p for p in _resource_files() if p.name.startswith("StructureDefinition-")]
SD_IDS = [p.name.removeprefix("StructureDefinition-").removesuffix(".json") for p in SD_FILES]


@pytest.fixture(params=SD_FILES, ids=SD_IDS)
def sd(request: pytest.FixtureRequest) -> JsonDict:
    path: Path = request.param
    return _load(path)


def _elements(sd: JsonDict) -> list[JsonDict]:
    elements = sd["differential"]["element"]
    assert isinstance(elements, list)
    return elements


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


# --- R4 base definitions, to resolve element paths ------------------------------------------------


@cache
def _r4_rows() -> dict[str, dict[str, JsonDict]]:
    types = json.loads(R4_DEFINITIONS.read_text())["types"]
    return {name: {row["path"]: row for row in t["elements"]} for name, t in types.items()}


def _base_row(sd: JsonDict, element_id: str) -> JsonDict | None:
    """The R4 row an element id refers to, descending into datatypes (``value[x].system``).

    A choice element (``value[x]``) is followed into the one type the differential restricts it to
    at that id (component slices may restrict ``value[x]`` to different types).
    """
    rows = _r4_rows()
    restricted = {e["id"]: e["type"][0]["code"] for e in _elements(sd) if len(e.get("type", [])) == 1}
    steps = element_id.split(".")
    parts = [step.split(":")[0] for step in steps]
    type_name, rel = parts[0], ""
    row: JsonDict | None = None
    for i, part in enumerate(parts[1:], start=1):
        candidate = f"{rel}.{part}" if rel else part
        if candidate in rows[type_name]:
            row, rel = rows[type_name][candidate], candidate
            if "contentReference" in row:
                rel = row["contentReference"].lstrip("#").split(".", 1)[1]
            continue
        if row is None:
            return None
        types: list[str] = row.get("types", [])
        chosen = restricted.get(".".join(steps[:i])) if len(types) > 1 else types[0]
        if chosen is None or chosen not in rows or part not in rows[chosen]:
            return None
        type_name, rel, row = chosen, part, rows[chosen][part]
    return row


# --- every file -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _json_files(), ids=lambda p: p.name)
def test_every_json_file_parses(path: Path) -> None:
    _load(path)


def test_the_package_holds_the_expected_profiles() -> None:
    found = {sd["id"]: sd["type"] for sd in _structure_definitions()}
    assert found == EXPECTED_PROFILES


def test_package_json() -> None:
    package = _load(PROFILES / "package.json")
    assert package["name"] == "fhir-norse.rom"
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", package["version"])
    assert package["canonical"] == CANONICAL
    assert package["fhirVersions"] == ["4.0.1"]
    assert package["dependencies"] == {"hl7.fhir.r4.core": "4.0.1"}
    assert package["license"] == "Apache-2.0"
    assert package["type"] == "IG"
    for key in ("url", "title", "description", "author"):
        assert isinstance(package[key], str) and package[key], key
    # Package names: two or more lowercase dot-separated namespaces.
    assert re.fullmatch(r"[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)+", package["name"])


def test_index_lists_exactly_the_resource_files() -> None:
    index = _load(PROFILES / ".index.json")
    assert index["index-version"] == 2
    entries = {entry["filename"]: entry for entry in index["files"]}
    assert len(entries) == len(index["files"]), "a file is listed twice"
    assert set(entries) == {p.name for p in _resource_files()}
    for path in _resource_files():
        resource, entry = _load(path), entries[path.name]
        for key in ("resourceType", "id", "url", "version", "kind", "type"):
            if key == "type" and not isinstance(resource.get(key), str):
                # The index's ``type`` is a StructureDefinition's; OperationDefinition.type is a boolean.
                assert key not in entry, f"{path.name}: .index.json has a type"
                continue
            assert entry.get(key) == resource.get(key), f"{path.name}: .index.json {key} differs"


# --- each StructureDefinition ---------------------------------------------------------------------


def test_passes_the_server_validator(sd: JsonDict) -> None:
    try:
        validate_resource(sd, expected_type="StructureDefinition")
    except BadRequest as exc:
        pytest.fail("\n".join(issue.diagnostics for issue in exc.issues))


def test_passes_the_independent_r4_parser(sd: JsonDict) -> None:
    parse_r4(sd)


def test_metadata(sd: JsonDict) -> None:
    package = _load(PROFILES / "package.json")
    assert sd["url"] == f"{CANONICAL}/StructureDefinition/{sd['id']}"
    assert sd["version"] == package["version"]
    assert sd["status"] == "draft"
    assert sd["publisher"] == "fhir-norse"
    assert sd["fhirVersion"] == "4.0.1"
    assert sd["derivation"] == "constraint"
    assert sd["abstract"] is False
    assert sd["baseDefinition"] == CORE_SD + sd["type"]
    assert sd["kind"] == ("complex-type" if sd["type"] == "Extension" else "resource")
    # The snapshot is generated from the differential (tools/snapshots.py, checked in
    # tests/content/test_integrator_content.py).
    assert sd["snapshot"]["element"][0]["id"] == sd["type"]
    assert re.fullmatch(r"[A-Z][A-Za-z0-9_]{0,254}", sd["name"])  # inv sdf-0 style computable name


def test_every_canonical_is_ours_or_from_a_dependency(sd: JsonDict) -> None:
    for value in _strings(sd):
        if value.startswith(("http://", "https://")):
            assert value.startswith((f"{CANONICAL}/", *EXTERNAL_PREFIXES)), value


def test_references_to_our_own_profiles_resolve(sd: JsonDict) -> None:
    ours = {other["url"] for other in _structure_definitions()}
    for element in _elements(sd):
        for type_ in element.get("type", []):
            for url in type_.get("profile", []) + type_.get("targetProfile", []):
                if url.startswith(f"{CANONICAL}/StructureDefinition/"):
                    assert url in ours, f"{element['id']}: {url} is not in the package"


def test_element_ids_and_paths(sd: JsonDict) -> None:
    seen: set[str] = set()
    for element in _elements(sd):
        id_, path = element.get("id"), element.get("path")
        assert isinstance(id_, str) and isinstance(path, str), f"element without id or path: {element}"
        assert path == sd["type"] or path.startswith(sd["type"] + "."), path
        assert id_ not in seen, f"duplicate element id {id_}"
        seen.add(id_)
        # https://hl7.org/fhir/R4/elementdefinition.html#id: the path with ':sliceName' per sliced step.
        assert ".".join(step.split(":")[0] for step in id_.split(".")) == path, id_
        last = id_.rsplit(".", 1)[-1]
        if ":" in last:
            assert element.get("sliceName") == last.split(":", 1)[1], id_
            sliced = id_.rsplit(":", 1)[0]
            assert any(e["id"] == sliced and "slicing" in e for e in _elements(sd)), (
                f"{id_}: {sliced} declares no slicing"
            )
        else:
            assert "sliceName" not in element, id_


def test_every_path_is_an_r4_element_and_no_cardinality_is_widened(sd: JsonDict) -> None:
    for element in _elements(sd):
        path = element["path"]
        if path == sd["type"]:
            continue
        row = _base_row(sd, element["id"])
        assert row is not None, f"{element['id']}: {path} is not an R4 element"
        if "min" in element and "sliceName" not in element:
            assert element["min"] >= row["min"], f"{element['id']}: min below the base"
        if "max" in element:
            base_max = row["max"]
            if base_max != "*":
                assert element["max"] != "*" and int(element["max"]) <= int(base_max), element["id"]
        for type_ in element.get("type", []):
            assert type_["code"] in row.get("types", []), f"{element['id']}: {type_['code']} not allowed"


def test_invariants_compile_and_name_their_source(sd: JsonDict) -> None:
    for element in _elements(sd):
        for constraint in element.get("constraint", []):
            assert constraint["source"] == sd["url"]
            result = evaluate({"resourceType": sd["type"]}, constraint["expression"])
            assert result in ([True], [False], []), constraint["key"]


# --- rules that scoring relies on -----------------------------------------------------------------


def _sd(id_: str) -> JsonDict:
    return _load(PROFILES / f"StructureDefinition-{id_}.json")


def _element(id_: str, element_id: str) -> JsonDict:
    found = [e for e in _elements(_sd(id_)) if e["id"] == element_id]
    assert found, f"{id_} has no element {element_id}"
    return found[0]


def _invariant(id_: str, key: str) -> str:
    for element in _elements(_sd(id_)):
        for constraint in element.get("constraint", []):
            if constraint["key"] == key:
                expression: str = constraint["expression"]
                return expression
    raise AssertionError(f"{id_} has no invariant {key}")


@pytest.mark.parametrize("profile", ["rom-scale-score", "rom-alliance", "rom-preference", "rom-panel"])
def test_observations_follow_the_screening_assessment_pattern(profile: str) -> None:
    survey = _element(profile, "Observation.category:survey")
    assert survey["min"] == 1
    coding = survey["patternCodeableConcept"]["coding"][0]
    assert coding == {
        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
        "code": "survey",
    }
    derived = _element(profile, "Observation.derivedFrom")
    assert derived["min"] == 1
    assert derived["type"][0]["targetProfile"] == [CORE_SD + "QuestionnaireResponse"]
    assert _element(profile, "Observation.subject")["type"][0]["targetProfile"] == [CORE_SD + "Patient"]


@pytest.mark.parametrize(
    ("status", "ok"), [("final", True), ("amended", True), ("entered-in-error", True), ("preliminary", False)]
)
def test_status_invariant(status: str, ok: bool) -> None:
    expression = _invariant("rom-scale-score", "rom-status-1")
    assert evaluate({"resourceType": "Observation", "status": status}, expression) == [ok]


def test_scale_score_value_is_a_ucum_score() -> None:
    assert _element("rom-scale-score", "Observation.value[x]")["type"] == [{"code": "Quantity"}]
    assert (
        _element("rom-scale-score", "Observation.value[x].system")["fixedUri"] == "http://unitsofmeasure.org"
    )
    assert _element("rom-scale-score", "Observation.value[x].code")["fixedCode"] == "{score}"


def test_panel_has_members_and_no_value() -> None:
    assert _element("rom-panel", "Observation.value[x]")["max"] == "0"
    assert _element("rom-panel", "Observation.hasMember")["min"] == 1


def test_flag_invariant_requires_an_end_when_inactive() -> None:
    expression = _invariant("rom-alert-flag", "rom-flag-1")
    inactive: JsonDict = {"resourceType": "Flag", "status": "inactive", "period": {"start": "2024-01-01"}}
    assert evaluate(inactive, expression) == [False]
    inactive["period"]["end"] = "2024-02-01"
    assert evaluate(inactive, expression) == [True]
    assert evaluate({"resourceType": "Flag", "status": "active"}, expression) == [True]


def test_extension_fixes_its_own_url_and_context() -> None:
    ext = _sd("administration-context")
    assert _element("administration-context", "Extension.url")["fixedUri"] == ext["url"]
    assert ext["context"] == [
        {"type": "element", "expression": e}
        for e in ("QuestionnaireResponse", "Observation", "DiagnosticReport")
    ]


def test_the_nf21_item_extension_describes_what_the_questionnaires_use() -> None:
    """Every part of the ``nf21-item`` extension on the Questionnaires is a slice of its definition."""
    root = Path(__file__).resolve().parents[2]
    sd = _load(root / "profiles" / "StructureDefinition-nf21-item.json")
    slices = {e["sliceName"] for e in sd["differential"]["element"] if e.get("sliceName")}
    used: set[str] = set()

    def walk(items: list[JsonDict]) -> None:
        for item in items:
            for ext in item.get("extension", []):
                if ext["url"] == sd["url"]:
                    used.update(part["url"] for part in ext["extension"])
            walk(item.get("item", []))

    for name in ("Questionnaire-nf21-static.json", "Questionnaire-nf21-adaptive.json"):
        walk(_load(root / "questionnaires" / "nf21" / name)["item"])
    assert used and used <= slices


# --- the OperationDefinitions of this server's own operations ----------------------------------------

OD_FILES = [p for p in _resource_files() if p.name.startswith("OperationDefinition-")]
OD_IDS = [p.name.removeprefix("OperationDefinition-").removesuffix(".json") for p in OD_FILES]
TERMINOLOGY = ROOT / "questionnaires" / "terminology"


@pytest.fixture(params=OD_FILES, ids=OD_IDS)
def od(request: pytest.FixtureRequest) -> JsonDict:
    path: Path = request.param
    return _load(path)


def test_the_package_holds_the_expected_operation_definitions() -> None:
    found = {_load(p)["id"]: _load(p)["code"] for p in OD_FILES}
    assert found == EXPECTED_OPERATIONS
    assert [p.name for p in OD_FILES] == [f"OperationDefinition-{i}.json" for i in OD_IDS]


def test_operation_definition_passes_the_server_validator(od: JsonDict) -> None:
    try:
        validate_resource(od, expected_type="OperationDefinition")
    except BadRequest as exc:
        pytest.fail("\n".join(issue.diagnostics for issue in exc.issues))


def test_operation_definition_passes_the_independent_r4_parser(od: JsonDict) -> None:
    parse_r4(od)


def test_operation_definition_metadata(od: JsonDict) -> None:
    package = _load(PROFILES / "package.json")
    assert od["url"] == f"{CANONICAL}/OperationDefinition/{od['id']}"
    assert od["version"] == package["version"]
    assert od["status"] == "active"
    assert od["kind"] == "operation"
    assert od["publisher"] == "fhir-norse"
    # Instance level on Patient only, and safe to invoke with GET.
    assert od["resource"] == ["Patient"]
    assert od["id"] == f"Patient-{od['code']}"
    assert (od["system"], od["type"], od["instance"], od["affectsState"]) == (False, False, True, False)
    assert re.fullmatch(r"[A-Z][A-Za-z0-9_]{0,254}", od["name"])  # inv opd-0
    for key in ("title", "description", "purpose", "comment"):
        assert isinstance(od[key], str) and od[key].strip(), key
    for value in _strings(od):
        if value.startswith(("http://", "https://")):
            assert value.startswith((f"{CANONICAL}/", *EXTERNAL_PREFIXES)), value


@pytest.mark.parametrize(
    "invariant",
    [
        "parameter.all(type.exists() or part.exists())",  # opd-1
        "parameter.all(searchType.exists() implies type = 'string')",  # opd-2
        "parameter.all(targetProfile.exists() implies (type = 'Reference' or type = 'canonical'))",  # opd-3
    ],
)
def test_operation_definition_invariants(od: JsonDict, invariant: str) -> None:
    assert evaluate(od, invariant) == [True]


def test_operation_definition_parameters(od: JsonDict) -> None:
    """The in parameters the server reads (``fhir_norse.rom.operations.adaptive``) and one ``return``."""
    params = {p["name"]: p for p in od["parameter"]}
    assert len(params) == len(od["parameter"]), "a parameter is defined twice"
    assert [p["name"] for p in od["parameter"] if p["use"] == "in"] == ["context", "episode", "questionnaire"]
    for param in od["parameter"]:
        assert param["documentation"].strip(), param["name"]
        if param["use"] == "in":
            assert (param["min"], param["max"]) == (0, "1"), param["name"]
    assert params["context"]["type"] == "code"
    assert params["context"]["binding"] == {
        "strength": "required",
        "valueSet": f"{CANONICAL}/ValueSet/administration-context",
    }
    assert params["episode"]["type"] == "Reference"
    assert params["episode"]["targetProfile"] == [CORE_SD + "EpisodeOfCare"]
    assert params["questionnaire"]["type"] == "canonical"
    assert params["questionnaire"]["targetProfile"] == [CORE_SD + "Questionnaire"]
    out = [p for p in od["parameter"] if p["use"] == "out"]
    expected_type = {"tailored-form": "Questionnaire", "adaptive-state": "Parameters"}[od["code"]]
    assert out == [{**params["return"], "min": 1, "max": "1", "type": expected_type}]
    assert out[0]["name"] == "return"  # a single resource-typed ``return`` is the response body itself


def test_the_context_binding_resolves_to_the_administration_contexts(od: JsonDict) -> None:
    binding = next(p for p in od["parameter"] if p["name"] == "context")["binding"]["valueSet"]
    value_sets = [_load(p) for p in sorted(TERMINOLOGY.rglob("ValueSet-*.json"))]
    value_set = next(v for v in value_sets if v["url"] == binding)
    systems = [include["system"] for include in value_set["compose"]["include"]]
    code_systems = [_load(p) for p in sorted(TERMINOLOGY.rglob("CodeSystem-*.json"))]
    codes = {c["code"] for cs in code_systems if cs["url"] in systems for c in cs["concept"]}
    assert codes == {"intake", "weekly", "termination"}
