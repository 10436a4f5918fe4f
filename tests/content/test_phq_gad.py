"""PHQ-9 and GAD-7 content: the Questionnaires are valid R4 with the LOINC codes of their panels,
and their mappings agree with them.

LOINC panels: https://loinc.org/44249-1 (PHQ-9), https://loinc.org/69737-5 (GAD-7); answer lists
LL358-3 (frequency) and LL359-1 (difficulty). Scores use the R4 core extension
https://hl7.org/fhir/R4/extension-ordinalvalue.html.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml

from fhir_norse.server.validation import validate_resource
from tests.fhir_r4_client import parse_r4

ROOT = Path(__file__).resolve().parents[2]
LOINC = "http://loinc.org"
ORDINAL_VALUE = "http://hl7.org/fhir/StructureDefinition/ordinalValue"
FREQUENCY = {"LA6568-5": 0, "LA6569-3": 1, "LA6570-1": 2, "LA6571-9": 3}
DIFFICULTY = ["LA6572-7", "LA6573-5", "LA6575-0", "LA6574-3"]
DIFFICULTY_ITEM = "69722-7"


@dataclass(frozen=True)
class Instrument:
    key: str
    panel: str
    items: tuple[str, ...]
    total: str
    max_total: int


PHQ9 = Instrument(
    key="phq9",
    panel="44249-1",
    items=("44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8"),
    total="44261-6",
    max_total=27,
)
GAD7 = Instrument(
    key="gad7",
    panel="69737-5",
    items=("69725-0", "68509-9", "69733-4", "69734-2", "69735-9", "69689-8", "69736-7"),
    total="70274-6",
    max_total=21,
)
INSTRUMENTS = [pytest.param(PHQ9, id="phq9"), pytest.param(GAD7, id="gad7")]


def questionnaire(inst: Instrument) -> dict[str, Any]:
    path = ROOT / "questionnaires" / inst.key / f"Questionnaire-{inst.key}.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def mapping(inst: Instrument) -> dict[str, Any]:
    path = ROOT / "mappings" / f"{inst.key}-1.0.0.yaml"
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def items_by_link_id(q: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}

    def walk(items: list[dict[str, Any]]) -> None:
        for item in items:
            assert item["linkId"] not in found, f"duplicate linkId {item['linkId']}"
            found[item["linkId"]] = item
            walk(item.get("item", []))

    walk(q["item"])
    return found


def loinc_codes(element: dict[str, Any]) -> list[str]:
    return [c["code"] for c in element.get("code", []) if c.get("system") == LOINC]


def ordinal_value(option: dict[str, Any]) -> Decimal | None:
    values = [e["valueDecimal"] for e in option.get("extension", []) if e["url"] == ORDINAL_VALUE]
    assert len(values) <= 1, option
    return Decimal(str(values[0])) if values else None


@pytest.mark.parametrize("inst", INSTRUMENTS)
def test_questionnaire_passes_project_validator(inst: Instrument) -> None:
    validate_resource(questionnaire(inst))


@pytest.mark.parametrize("inst", INSTRUMENTS)
def test_questionnaire_parses_with_independent_r4_parser(inst: Instrument) -> None:
    parsed = parse_r4(questionnaire(inst))
    assert parsed.resource_type == "Questionnaire"


@pytest.mark.parametrize("inst", INSTRUMENTS)
def test_canonical_metadata(inst: Instrument) -> None:
    q = questionnaire(inst)
    assert q["url"] == f"http://fhir-norse.org/fhir/Questionnaire/{inst.key}"
    assert q["version"] == "1.0.0"
    assert q["status"] == "active"
    assert "No permission required to reproduce, translate, display or distribute" in q["copyright"]
    assert "Pfizer" in q["copyright"]


@pytest.mark.parametrize("inst", INSTRUMENTS)
def test_panel_item_and_answer_codes_are_the_loinc_ones(inst: Instrument) -> None:
    q = questionnaire(inst)
    assert loinc_codes(q) == [inst.panel]
    coded = [item for item in q["item"] if item["type"] != "display"]
    assert [loinc_codes(item) for item in coded] == [[c] for c in (*inst.items, DIFFICULTY_ITEM, inst.total)]
    by_id = items_by_link_id(q)
    for code in inst.items:
        item = by_id[code]
        assert item["type"] == "choice"
        assert item["required"] is True
        assert [o["valueCoding"]["code"] for o in item["answerOption"]] == list(FREQUENCY)
        assert {o["valueCoding"]["system"] for o in item["answerOption"]} == {LOINC}
    difficulty = by_id[DIFFICULTY_ITEM]
    assert difficulty.get("required", False) is False
    assert [o["valueCoding"]["code"] for o in difficulty["answerOption"]] == DIFFICULTY
    assert {o["valueCoding"]["system"] for o in difficulty["answerOption"]} == {LOINC}


@pytest.mark.parametrize("inst", INSTRUMENTS)
def test_every_scored_answer_carries_its_ordinal_value(inst: Instrument) -> None:
    by_id = items_by_link_id(questionnaire(inst))
    for code in inst.items:
        scores = {o["valueCoding"]["code"]: ordinal_value(o) for o in by_id[code]["answerOption"]}
        assert scores == {c: Decimal(s) for c, s in FREQUENCY.items()}, code
    # The difficulty item is not part of the published score, so it carries no weight a summing
    # form filler could pick up.
    assert all(ordinal_value(o) is None for o in by_id[DIFFICULTY_ITEM]["answerOption"])


@pytest.mark.parametrize("inst", INSTRUMENTS)
def test_total_item_is_calculated_and_read_only(inst: Instrument) -> None:
    total = items_by_link_id(questionnaire(inst))[inst.total]
    assert total["type"] == "integer"
    assert total["readOnly"] is True
    assert total.get("required", False) is False
    assert "answerOption" not in total
    (calc,) = [e for e in total["extension"] if e["url"].endswith("sdc-questionnaire-calculatedExpression")]
    expression = calc["valueExpression"]["expression"]
    assert all(f"'{code}'" in expression for code in inst.items)
    assert DIFFICULTY_ITEM not in expression


@pytest.mark.parametrize("inst", INSTRUMENTS)
def test_mapping_matches_questionnaire(inst: Instrument) -> None:
    q, m = questionnaire(inst), mapping(inst)
    assert m["instrument"] == inst.key
    assert m["version"] == q["version"]
    assert m["questionnaire"] == f"{q['url']}|{q['version']}"
    total = m["total"]
    assert total["code"]["system"] == LOINC
    assert total["code"]["code"] == inst.total
    assert total["items"] == list(inst.items)
    by_id = items_by_link_id(q)
    for link_id in total["items"]:
        option_scores = {o["valueCoding"]["code"]: ordinal_value(o) for o in by_id[link_id]["answerOption"]}
        assert {c: Decimal(s) for c, s in total["answer_scores"].items()} == option_scores, link_id
    assert total["min"] == 0
    assert total["max"] == inst.max_total == len(total["items"]) * max(total["answer_scores"].values())
    for alert in m["alerts"]:
        assert alert["item"] in total["items"]
        assert alert["when_score_at_least"] in total["answer_scores"].values()
    assert m["source"]


@pytest.mark.parametrize("inst", INSTRUMENTS)
def test_severity_bands_cover_the_total_range_without_gaps_or_overlaps(inst: Instrument) -> None:
    m = mapping(inst)
    bands = m["severity_bands"]
    assert bands[0]["min"] == m["total"]["min"]
    assert bands[-1]["max"] == m["total"]["max"]
    for band in bands:
        assert band["min"] <= band["max"]
        assert band["code"] and band["display"]
    for lower, upper in pairwise(bands):
        assert upper["min"] == lower["max"] + 1
    assert len({band["code"] for band in bands}) == len(bands)


def test_published_severity_cut_points() -> None:
    def cuts(inst: Instrument) -> list[tuple[int, int, str]]:
        return [(b["min"], b["max"], b["code"]) for b in mapping(inst)["severity_bands"]]

    assert cuts(PHQ9) == [
        (0, 4, "minimal"),
        (5, 9, "mild"),
        (10, 14, "moderate"),
        (15, 19, "moderately-severe"),
        (20, 27, "severe"),
    ]
    assert cuts(GAD7) == [(0, 4, "minimal"), (5, 9, "mild"), (10, 14, "moderate"), (15, 21, "severe")]


def test_phq9_item_9_raises_the_suicide_risk_alert() -> None:
    (alert,) = mapping(PHQ9)["alerts"]
    assert alert["item"] == "44260-8"
    assert alert["when_score_at_least"] == 1
    assert alert["flag"] == "suicide-risk"
    assert mapping(GAD7)["alerts"] == []
