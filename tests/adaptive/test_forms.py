"""What an administration asks, as Questionnaire content: $next-question pages and the tailored form."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from fhir_norse.adaptive import Measured, scale_states
from fhir_norse.adaptive.forms import AdministrationPlan, next_page, tailored_questionnaire
from fhir_norse.adaptive.history import administrations
from fhir_norse.instruments.schema import InstrumentMapping, load_mapping

ROOT = Path(__file__).resolve().parents[2]


@cache
def nf21() -> InstrumentMapping:
    return load_mapping(ROOT / "mappings" / "nf21-2.1.0.yaml")


def canonical(name: str) -> dict[str, Any]:
    path = ROOT / "questionnaires" / "nf21" / f"Questionnaire-nf21-{name}.json"
    return dict(json.loads(path.read_text(encoding="utf-8")))


def items_by_link_id() -> dict[str, dict[str, Any]]:
    return {i["linkId"]: i for i in canonical("adaptive")["item"]}


def plan_after(
    history: list[dict[str, Measured]], overrides: dict[str, Any] | None = None
) -> AdministrationPlan:
    return AdministrationPlan(nf21(), scale_states(nf21(), history, overrides or {}))


def test_pages_come_in_order_and_skip_an_empty_scale_page() -> None:
    m = nf21()
    plan = plan_after([{"sad": Measured(6, 6)}])  # sad open after one administration
    items = items_by_link_id()
    first = next_page(plan, items, [], {})
    assert first is not None and first["linkId"] == "page-triggers"
    assert [i["linkId"] for i in first["item"]] == [
        m.scale(c).trigger for c in m.display_order if m.scale(c).trigger
    ]
    # The items are the canonical definitions, copied (texts, translations and options included).
    assert first["item"][0] == items["sad-1"] and first["item"][0] is not items["sad-1"]
    second = next_page(plan, items, ["page-triggers"], {"worry-1": 6.0})
    assert second is not None and second["linkId"] == "page-scales"
    assert [i["linkId"] for i in second["item"]] == ["sad-2", "sad-3", "worry-2", "worry-3"]
    third = next_page(plan, items, ["page-triggers", "page-scales"], {})
    assert third is not None and third["linkId"] == "page-closing" and len(third["item"]) == 16
    assert next_page(plan, items, ["page-triggers", "page-scales", "page-closing"], {}) is None
    # Nothing open and no trigger above its threshold: straight from the triggers to the closing page.
    empty = plan_after([{"sad": Measured(2, 2)}])
    skipped = next_page(empty, items, ["page-triggers"], {"sad-1": 2.0})
    assert skipped is not None and skipped["linkId"] == "page-closing"


def test_full_bank_asks_every_scale_but_a_clinician_closed_one() -> None:
    m = nf21()
    plan = AdministrationPlan(m, scale_states(m, [], {"eating": "closed"}), full_bank=True)
    assert plan.in_full({}) == [c for c in m.display_order if c != "eating"]
    asked = plan.asked({})
    assert len(asked) == len(m.all_link_ids()) - (len(m.scale("eating").items) - 1)


def test_the_tailored_form_opens_closes_and_keeps_the_rest_adaptive() -> None:
    static = canonical("static")
    plan = plan_after([{"sad": Measured(6, 6)}], {"worry": "open", "eating": "closed"})
    form = tailored_questionnaire(static, plan)
    groups = {g["linkId"]: g for g in form["item"]}
    assert "group-eating" not in groups  # its items are not asked; its trigger stays in group-triggers
    assert "eating-1" in [i["linkId"] for i in groups["group-triggers"]["item"]]
    for open_scale in ("group-sad", "group-worry"):
        assert "enableWhen" not in groups[open_scale] and "enableBehavior" not in groups[open_scale]
    assert (
        groups["group-somAnx"]["enableWhen"]
        == {g["linkId"]: g for g in static["item"]}["group-somAnx"]["enableWhen"]
    )
    # The canonical itself is left untouched, and drop_closed=False keeps the closed scale's group.
    assert "enableWhen" in {g["linkId"]: g for g in static["item"]}["group-sad"]
    assert "group-eating" in {
        g["linkId"] for g in tailored_questionnaire(static, plan, drop_closed=False)["item"]
    }


def test_a_scale_closed_by_the_moving_average_re_opens_within_the_administration() -> None:
    """Issue 13, item 1: General functioning full scores 1.67, 1.0, 6.33 (mean 3.0 < 4.49), latest
    trigger 6. Under 2.2.0 (the published rule) the scale is closed: the pages and the tailored form ask
    its trigger first and its other items only when the trigger is above 4.5 in that same
    administration. Under 2.1.0 it stays open and is asked in full whatever the trigger."""
    history = [
        {"genFunc": Measured(1, 1.67)},
        {"genFunc": Measured(1, 1.0)},
        {"genFunc": Measured(6, 6.33)},
    ]
    m22 = load_mapping(ROOT / "mappings" / "nf21-2.2.0.yaml")
    plan22 = AdministrationPlan(m22, scale_states(m22, history))
    plan21 = AdministrationPlan(nf21(), scale_states(nf21(), history))
    items = {i["linkId"]: i for i in canonical("adaptive-2.2.0")["item"]}
    # genFunc-1 is reverse keyed: the triggers are in the problem direction.
    low, high = {"genFunc-1": 2.0}, {"genFunc-1": 6.0}
    assert "genFunc" not in plan22.in_full_regardless()
    assert next_page(plan22, items, ["page-triggers"], low)["linkId"] == "page-closing"  # type: ignore[index]
    page = next_page(plan22, items, ["page-triggers"], high)
    assert page is not None and [i["linkId"] for i in page["item"]] == ["genFunc-2", "genFunc-3"]
    assert plan21.in_full(low) == ["genFunc"]  # 2.1.0: kept open by the high last trigger
    # The tailored form: under 2.2.0 the group keeps its enableWhen on the trigger, under 2.1.0 not.
    static22 = canonical("static-2.2.0")
    tailored22 = {g["linkId"]: g for g in tailored_questionnaire(static22, plan22)["item"]}
    assert (
        tailored22["group-genFunc"]["enableWhen"]
        == {g["linkId"]: g for g in static22["item"]}["group-genFunc"]["enableWhen"]
    )
    tailored21 = {g["linkId"]: g for g in tailored_questionnaire(canonical("static"), plan21)["item"]}
    assert "enableWhen" not in tailored21["group-genFunc"]


def _scale_obs(scale: str, value: float, response: str, when: str, **extra: Any) -> dict[str, Any]:
    base = "http://fhir-norse.org/fhir/CodeSystem"
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "status": extra.pop("status", "final"),
        "code": {"coding": [{"system": f"{base}/nf21-scales", "code": scale}]},
        "valueQuantity": {"value": value},
        "effectiveDateTime": when,
        "derivedFrom": [{"reference": f"QuestionnaireResponse/{response}/_history/1"}],
        "component": [
            {
                "code": {"coding": [{"system": f"{base}/rom-components", "code": "trigger-score"}]},
                "valueQuantity": {"value": extra.pop("trigger", value)},
            }
        ],
    }
    if extra.pop("trigger_only", False):
        obs["interpretation"] = [
            {"coding": [{"system": f"{base}/rom-interpretation", "code": "trigger-only"}]}
        ]
    obs.update(extra)
    return obs


def test_history_is_read_back_from_the_scale_observations() -> None:
    observations = [
        _scale_obs("sad", 5.0, "b", "2026-03-09", trigger=6.0),
        _scale_obs("sad", 2.0, "a", "2026-03-02", trigger_only=True),
        _scale_obs("sad", 7.0, "c", "2026-03-16", status="entered-in-error"),
        _scale_obs("unknown", 7.0, "b", "2026-03-09"),
    ]
    got = administrations(observations, ["sad"])
    assert [a.response for a in got] == ["a", "b"]  # oldest first; the withdrawn one does not count
    assert got[0].measured["sad"] == Measured(2.0, None)  # trigger only: no full score
    assert got[1].measured["sad"] == Measured(6.0, 5.0)
    assert got[1].scales == {"sad": 5.0}
