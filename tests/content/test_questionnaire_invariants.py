"""The official R4 Questionnaire invariants (que-0 to que-13), evaluated with FHIRPath.

The expressions are the published ones (``fhir_norse/definitions/questionnaire-invariants.json``,
from hl7.fhir.r4.core 4.0.1); ``trace()`` is dropped because it only logs. The content check
implements the same rules in Python; this evaluates the standard's own text on every Questionnaire
we publish, and on a broken one to show the evaluation can fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fhirpathpy import evaluate
from fhirpathpy.models import models

ROOT = Path(__file__).resolve().parents[2]
INVARIANTS = json.loads((ROOT / "fhir_norse/definitions/questionnaire-invariants.json").read_text())
QUESTIONNAIRES = sorted((ROOT / "questionnaires").rglob("Questionnaire-*.json"))


def violations(questionnaire: dict[str, Any]) -> list[str]:
    found = []
    for invariant in INVARIANTS:
        expression = invariant["expression"].replace(".trace('type')", "").replace(".trace('item')", "")
        # Element invariants hold on every item at every depth.
        path = invariant["path"].replace("Questionnaire.item", "Questionnaire.repeat(item)")
        for node in evaluate(questionnaire, path, model=models["r4"]):
            if evaluate(node, expression, model=models["r4"]) not in ([True], []):
                label = node.get("linkId", "") if isinstance(node, dict) else ""
                found.append(f"{invariant['key']} {label}".strip())
    return found


def test_every_invariant_is_there() -> None:
    assert {i["key"] for i in INVARIANTS} == {f"que-{n}" for n in range(14)}


@pytest.mark.parametrize("path", QUESTIONNAIRES, ids=lambda p: p.name)
def test_published_questionnaires_meet_the_r4_invariants(path: Path) -> None:
    assert violations(json.loads(path.read_text())) == []


def test_a_broken_questionnaire_is_caught() -> None:
    broken = {
        "resourceType": "Questionnaire",
        "status": "draft",
        "name": "lowercase start",
        "item": [
            {"linkId": "g", "type": "group"},
            {"linkId": "d", "type": "display", "required": True, "code": [{"code": "x"}]},
            {"linkId": "d", "type": "boolean", "answerOption": [{"valueString": "a"}]},
        ],
    }
    assert sorted(violations(broken)) == ["que-0", "que-1 g", "que-2", "que-3 d", "que-5 d", "que-6 d"]
