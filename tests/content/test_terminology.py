"""Displays come from the content pack (``fhir_norse.instruments.terminology``), not from Python code."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, get_args

import pytest

from fhir_norse.alerts.rules import AlertCode
from fhir_norse.canonicals import CS_ALERTS, CS_SCALES, LOINC, VS_PANELS
from fhir_norse.instruments.registry import InstrumentRegistry
from fhir_norse.instruments.schema import ContentError, SumScoreMapping
from fhir_norse.instruments.terminology import Terminology, load_terminology

ROOT = Path(__file__).resolve().parents[2]


@cache
def content_registry() -> InstrumentRegistry:
    return InstrumentRegistry.from_content_dir(ROOT)


def _json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def test_code_system_displays_and_designations() -> None:
    terminology = load_terminology(ROOT)
    # CodeSystem rom-alerts is written in bokmål with English designations.
    assert terminology.display(CS_ALERTS, "suicide-risk") == "Selvmordsrisiko"
    assert terminology.display(CS_ALERTS, "suicide-risk", "nb") == "Selvmordsrisiko"
    assert terminology.display(CS_ALERTS, "suicide-risk", "en") == "Suicide risk"
    assert terminology.display(CS_SCALES, "sad") == "Tristhet"
    assert terminology.display(CS_ALERTS, "no-such-code") is None


def test_value_set_concepts_give_displays_of_external_codes() -> None:
    panels = _json(ROOT / "profiles" / "ValueSet-rom-panels.json")
    assert panels["url"] == VS_PANELS
    terminology = load_terminology(ROOT)
    listed = [
        (include["system"], concept)
        for include in panels["compose"]["include"]
        for concept in include.get("concept", [])
        if "display" in concept
    ]
    assert listed
    for system, concept in listed:
        assert terminology.display(system, concept["code"]) == concept["display"]


def test_a_code_system_display_wins_over_a_value_set_display() -> None:
    system = "http://example.org/cs"
    value_set = {
        "resourceType": "ValueSet",
        "compose": {"include": [{"system": system, "concept": [{"code": "a", "display": "From the VS"}]}]},
    }
    code_system = {
        "resourceType": "CodeSystem",
        "url": system,
        "concept": [{"code": "a", "display": "A", "concept": [{"code": "a1", "display": "A one"}]}],
    }
    terminology = Terminology.from_resources([value_set, code_system])
    assert terminology.display(system, "a") == "A"
    assert terminology.display(system, "a1") == "A one"  # nested concepts count
    # A ValueSet concept of a system the pack defines is not a second source of displays.
    assert Terminology.from_resources([code_system, value_set]).display(system, "a") == "A"


def test_every_alert_code_has_an_english_display_in_content() -> None:
    registry = content_registry()
    for instrument in registry:
        for code in get_args(AlertCode):
            display = instrument.alert_display(code)
            assert display, f"{CS_ALERTS}#{code} has no English display"
            assert display == registry.terminology.display(CS_ALERTS, code, "en")


def test_every_sum_score_panel_is_a_rom_panels_code_and_the_questionnaire_code() -> None:
    panels = _json(ROOT / "profiles" / "ValueSet-rom-panels.json")
    allowed = {
        (include["system"], concept["code"])
        for include in panels["compose"]["include"]
        for concept in include.get("concept", [])
    }
    sums = [i for i in content_registry() if isinstance(i.mapping, SumScoreMapping)]
    assert sums
    for instrument in sums:
        mapping = instrument.mapping
        assert isinstance(mapping, SumScoreMapping)
        assert mapping.panel is not None, f"{instrument.path.name} names no panel code"
        assert (mapping.panel.system, mapping.panel.code) in allowed
        assert mapping.panel.system == LOINC
        url = mapping.questionnaire.partition("|")[0]
        questionnaire = _json(
            ROOT / "questionnaires" / mapping.instrument / f"Questionnaire-{mapping.instrument}.json"
        )
        assert questionnaire["url"] == url
        assert {"system": mapping.panel.system, "code": mapping.panel.code} in [
            {"system": c["system"], "code": c["code"]} for c in questionnaire["code"]
        ]
        assert instrument.terminology.display(mapping.panel.system, mapping.panel.code)


def test_the_registry_gives_its_terminology_to_every_instrument(tmp_path: Path) -> None:
    registry = content_registry()
    assert len(registry.terminology) > 0
    assert all(i.terminology is registry.terminology for i in registry)
    # A pack without terminology still loads; its codes then have no display.
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "phq9-1.0.0.yaml").write_text(
        (ROOT / "mappings" / "phq9-1.0.0.yaml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    bare = InstrumentRegistry.from_content_dir(tmp_path)
    assert len(bare.terminology) == 0
    assert next(iter(bare)).alert_display("suicide-risk") is None


def test_unreadable_terminology_is_a_content_error(tmp_path: Path) -> None:
    folder = tmp_path / "questionnaires" / "terminology"
    folder.mkdir(parents=True)
    (folder / "CodeSystem-broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ContentError) as error:
        InstrumentRegistry.from_content_dir(tmp_path)
    assert error.value.file == "questionnaires/terminology/CodeSystem-broken.json"
