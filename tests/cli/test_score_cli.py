"""``fhir-norse score FILE.json``: the offline twin of ``$extract`` (no database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_norse.cli import main
from tests.intake_support import NF21_STATIC, PHQ9, PHQ9_ITEMS, nf21_answers, response


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: Any) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "qr.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    code = main(["score", str(path)])
    return code, json.loads(capsys.readouterr().out)


def test_a_valid_response_prints_the_transaction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = response(NF21_STATIC, nf21_answers({"suicide": 6}), patient="p1") | {"id": "qr-1"}
    code, out = run(tmp_path, capsys, body)
    assert code == 0
    assert out["resourceType"] == "Bundle" and out["type"] == "transaction"
    kinds = [e["resource"]["resourceType"] for e in out["entry"]]
    assert kinds.count("DiagnosticReport") == 1 and kinds.count("Flag") == 1 and kinds[-1] == "Provenance"
    refs = {
        o["resource"]["derivedFrom"][0]["reference"] for o in out["entry"] if "derivedFrom" in o["resource"]
    }
    assert refs == {"QuestionnaireResponse/qr-1/_history/1"}
    # Offline there is no history: no change statistics.
    components = [
        c["code"]["coding"][0]["code"] for e in out["entry"] for c in e["resource"].get("component", [])
    ]
    assert "rc-first" not in components


def test_warnings_come_as_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = response(PHQ9, dict.fromkeys(PHQ9_ITEMS, "LA6569-3") | {"44261-6": 4}, patient="p1")
    code, out = run(tmp_path, capsys, body)
    assert code == 0
    assert [p["name"] for p in out["parameter"]] == ["return", "issues"]
    assert "submitted total 4" in out["parameter"][1]["resource"]["issue"][0]["diagnostics"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"questionnaire": "http://example.org/Questionnaire/x|1"}, "not in the content pack"),
        ({"status": "in-progress"}, "Only completed"),
        ({"subject": None}, "subject is required"),
        ({"item": [{"linkId": "sad-1", "answer": [{"valueString": "x"}]}]}, "sad-1"),
    ],
)
def test_refusals_print_an_operation_outcome(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], expected: str
) -> None:
    body = response(NF21_STATIC, nf21_answers(), patient="p1")
    for key, value in change.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    code, out = run(tmp_path, capsys, body)
    assert code == 1
    assert out["resourceType"] == "OperationOutcome"
    assert expected in " ".join(i["diagnostics"] for i in out["issue"])


def test_a_response_without_authored_is_dated_now_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """R4 makes authored optional: scored as of the time it is scored, and the answer says so."""
    body = response(NF21_STATIC, nf21_answers(), patient="p1")
    del body["authored"]
    code, out = run(tmp_path, capsys, body)
    assert code == 0
    issues = out["parameter"][1]["resource"]["issue"]
    assert any("authored is absent" in i["diagnostics"] for i in issues)
    bundle = out["parameter"][0]["resource"]
    panel = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert panel["effectiveDateTime"].startswith(str(datetime.now(UTC).year))


def test_not_json_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(tmp_path, capsys, "{not json")
    assert code == 1 and out["issue"][0]["code"] == "structure"
    assert main(["score", str(tmp_path / "missing.json")]) == 2


def test_a_response_to_a_contained_adaptive_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A completed $next-question response names its contained form; the form's source scores it."""
    root = Path(__file__).resolve().parents[2]
    adaptive = json.loads((root / "questionnaires/nf21/Questionnaire-nf21-adaptive.json").read_text())
    sad_1 = next(i for i in adaptive["item"] if i["linkId"] == "sad-1")
    contained = {
        "resourceType": "Questionnaire",
        "id": "q",
        "status": "active",
        "derivedFrom": ["http://fhir-norse.org/fhir/Questionnaire/nf21-adaptive|2.1.0"],
        "item": [{"linkId": "page-triggers", "type": "group", "item": [sad_1]}],
    }
    answer = {"valueCoding": {"system": "http://fhir-norse.org/fhir/CodeSystem/nf21-answers", "code": "6"}}
    body: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "id": "qr-2",
        "contained": [contained],
        "questionnaire": "#q",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "authored": "2026-03-02T09:00:00+01:00",
        "item": [{"linkId": "page-triggers", "item": [{"linkId": "sad-1", "answer": [answer]}]}],
    }
    code, out = run(tmp_path, capsys, body)
    assert code == 0, out
    scales = [
        e["resource"]["code"]["coding"][0]["code"]
        for e in out["entry"]
        if "rom-scale-score" in str(e["resource"].get("meta"))
    ]
    assert scales == ["sad"]
    # An answer outside the contained form is refused as it would be by the server.
    body["item"][0]["item"].append({"linkId": "sad-2", "answer": [answer]})
    code, out = run(tmp_path, capsys, body)
    assert code == 1 and "sad-2" in out["issue"][0]["diagnostics"]
