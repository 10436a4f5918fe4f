"""Scores of one administration -> FHIR resources: validity, references, values and interpretations."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from fhir_norse.canonicals import CS_COMPONENTS, CS_INTERPRETATION, LOINC
from fhir_norse.instruments.schema import (
    InstrumentMapping,
    SumScoreMapping,
    load_mapping,
    load_sum_score_mapping,
)
from fhir_norse.instruments.terminology import Terminology, load_terminology
from fhir_norse.scoring import Nf21Scores, SumScore, score_nf21, score_sum
from fhir_norse.scoring.change import ScaleChange, scale_change_for
from fhir_norse.scoring.resources import AdministrationResources, build_administration
from fhir_norse.server.validation import validate_resource
from tests.fhir_r4_client import parse_r4

ROOT = Path(__file__).resolve().parents[2]
RESPONSE = "QuestionnaireResponse/qr-1/_history/1"
PATIENT = "Patient/p-1"
AUTHORED = "2026-03-04T10:15:00+01:00"


@cache
def nf21() -> InstrumentMapping:
    return load_mapping(ROOT / "mappings" / "nf21-2.1.0.yaml")


@cache
def phq9() -> SumScoreMapping:
    return load_sum_score_mapping(ROOT / "mappings" / "phq9-1.0.0.yaml")


def ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"00000000-0000-4000-8000-{next(counter):012d}"


def full_answers(sad: str = "7") -> dict[str, str]:
    """Every scored linkId answered 4, the Sad Affect items with ``sad``, preferences "more"."""
    m = nf21()
    answers = {link_id: "4" for link_id in m.all_link_ids()}
    for link_id in m.scale("sad").items:
        answers[link_id] = sad
    for p in m.preferences:
        answers[p.link_id] = "more"
    return answers


def scores(sad: str = "7") -> Nf21Scores:
    return score_nf21(full_answers(sad), nf21())


def phq9_total() -> SumScore:
    # Every item "More than half the days" (2): total 18, moderately severe.
    return score_sum({i: "LA6570-1" for i in phq9().total.items}, phq9())


def sad_changes() -> dict[str, ScaleChange]:
    # Sad Affect from 2.0 to 7.0: elevated and reliably deteriorated.
    return {"sad": scale_change_for(nf21().scale("sad"), [2.0, 2.0, 7.0])}


def build(**kw: Any) -> AdministrationResources:
    args: dict[str, Any] = {
        "response_ref": RESPONSE,
        "patient_ref": PATIENT,
        "authored": AUTHORED,
        "scores": scores(),
        "id_factory": ids(),
        "mapping": nf21(),
    }
    args.update(kw)
    return build_administration(**args)


def refs(resources: Any) -> list[str]:
    return [f"{r['resourceType']}/{r['id']}" for r in resources]


def codes(concepts: list[dict[str, Any]], system: str) -> list[str]:
    return [c["code"] for cc in concepts for c in cc.get("coding", []) if c["system"] == system]


def component(obs: dict[str, Any], code: str) -> dict[str, Any] | None:
    for comp in obs.get("component", []):
        if comp["code"]["coding"][0] == {"system": CS_COMPONENTS, "code": code}:
            return comp  # type: ignore[no-any-return]
    return None


def test_every_resource_is_valid_r4() -> None:
    built = build(sums=[phq9_total()], sum_mappings={"phq9": phq9()}, changes=sad_changes(), issued=AUTHORED)
    for resource in built.resources():
        validate_resource(resource)
        parse_r4(resource)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": built.transaction_entries()}
    parse_r4(bundle)  # the server's validator checks resources, not Bundles


def test_counts_and_references() -> None:
    s = scores()
    built = build(sums=[phq9_total()], sum_mappings={"phq9": phq9()})
    assert len(built.scale_scores) == sum(1 for x in s.scales.values() if x.score is not None)
    assert len(built.alliance) == len(s.alliance.dimensions) + 1
    assert len(built.preferences) == len(nf21().preferences)
    assert len(built.sum_scores) == 1
    all_ids = [r["id"] for r in built.resources()]
    assert len(set(all_ids)) == len(all_ids)
    assert [m["reference"] for m in built.panel["hasMember"]] == refs(built.members)
    assert [r["reference"] for r in built.report["result"]] == refs([built.panel, *built.members])
    for obs in [*built.members, built.panel]:
        assert obs["derivedFrom"] == [{"reference": RESPONSE}]
        assert obs["subject"] == {"reference": PATIENT}
        assert obs["performer"] == [{"reference": PATIENT}]
        assert obs["effectiveDateTime"] == AUTHORED
        assert obs["status"] == "final"
    entries = built.transaction_entries()
    assert [e["fullUrl"] for e in entries] == [f"urn:uuid:{i}" for i in all_ids]


def test_values_equal_engine_scores() -> None:
    s = scores()
    built = build()
    by_code = {o["code"]["coding"][0]["code"]: o for o in built.scale_scores}
    assert list(by_code) == [c for c, x in s.scales.items() if x.score is not None]
    for code, obs in by_code.items():
        engine = s.scales[code]
        assert obs["valueQuantity"] == {
            "value": engine.score,
            "unit": "score",
            "system": "http://unitsofmeasure.org",
            "code": "{score}",
        }
        z = component(obs, "z-score")
        assert z is not None and z["valueQuantity"]["value"] == engine.z
        answered = component(obs, "items-answered")
        assert answered is not None and answered["valueInteger"] == engine.items_answered
        assert obs["referenceRange"][0]["low"]["value"] == 1
        assert obs["referenceRange"][0]["high"]["value"] == 7
    total = next(o for o in built.alliance if o["code"]["coding"][0]["code"] == "total")
    assert total["valueQuantity"]["value"] == s.alliance.total.mean
    percent = component(total, "percent-of-max")
    assert percent is not None and percent["valueQuantity"]["value"] == s.alliance.total.percent
    for pref in built.preferences:
        assert pref["valueCodeableConcept"]["coding"][0]["code"] == "more"


def test_elevated_and_within_range_from_the_mapping_cutoff() -> None:
    built = build()
    by_code = {o["code"]["coding"][0]["code"]: o for o in built.scale_scores}
    assert codes(by_code["sad"]["interpretation"], CS_INTERPRETATION) == ["elevated"]
    # A four is below every opening threshold of the mapping.
    assert codes(by_code["worry"]["interpretation"], CS_INTERPRETATION) == ["within-range"]
    assert component(by_code["sad"], "rc-first") is None


def test_change_components_and_interpretations() -> None:
    changes = sad_changes()
    built = build(changes=changes)
    sad = next(o for o in built.scale_scores if o["code"]["coding"][0]["code"] == "sad")
    rc_first = component(sad, "rc-first")
    rc_previous = component(sad, "rc-previous")
    rti = component(sad, "rti")
    assert rc_first is not None and rc_first["valueQuantity"]["value"] == changes["sad"].rc_first
    assert rc_previous is not None and rc_previous["valueQuantity"]["value"] == changes["sad"].rc_previous
    assert rti is not None and rti["valueQuantity"]["value"] == changes["sad"].rti
    assert codes(sad["interpretation"], CS_INTERPRETATION) == [
        "elevated",
        "reliable-deterioration",
        "reliable-deterioration",
    ]
    assert "Sad Affect" in built.report["conclusion"]
    assert "Reliable deterioration" in built.report["conclusion"]
    assert codes(built.report["conclusionCode"], CS_INTERPRETATION) == ["elevated", "reliable-deterioration"]


def test_stagnation_is_interpreted_and_concluded() -> None:
    changes = {"sad": scale_change_for(nf21().scale("sad"), [7.0, 7.0, 7.0, 7.0])}
    built = build(changes=changes)
    sad = next(o for o in built.scale_scores if o["code"]["coding"][0]["code"] == "sad")
    assert "stagnation" in codes(sad["interpretation"], CS_INTERPRETATION)
    assert "no-reliable-change" in codes(sad["interpretation"], CS_INTERPRETATION)
    assert "Stagnation: Sad Affect." in built.report["conclusion"]


def test_conclusion_without_elevation() -> None:
    # "Not relevant to me" scores 1 (no problem) on every clinical item.
    answers = {i: "not-relevant" for scale in nf21().scales for i in scale.items}
    built = build(scores=score_nf21(answers, nf21()))
    assert built.report["conclusion"].startswith("No elevated scale.")
    assert "conclusionCode" not in built.report


def test_sum_score_observation() -> None:
    built = build(sums=[phq9_total()], sum_mappings={"phq9": phq9()})
    (obs,) = built.sum_scores
    assert obs["code"]["coding"][0]["system"] == "http://loinc.org"
    assert obs["code"]["coding"][0]["code"] == "44261-6"
    assert obs["valueQuantity"]["value"] == 18
    assert obs["interpretation"] == [{"text": "Moderately severe depression"}]
    assert "PHQ9 total 18 (Moderately severe depression)." in built.report["conclusion"]


@cache
def terminology() -> Terminology:
    return load_terminology(ROOT)


def test_sum_scores_alone_use_the_loinc_panel() -> None:
    built = build(scores=None, sums=[phq9_total()], sum_mappings={"phq9": phq9()}, terminology=terminology())
    # The code is the mapping's ``panel``; the display is the one ValueSet rom-panels gives it.
    assert built.panel["code"] == {
        "coding": [{"system": LOINC, "code": "44249-1", "display": "PHQ-9 quick depression assessment panel"}]
    }
    assert len(built.members) == 1
    for resource in built.resources():
        validate_resource(resource)
        parse_r4(resource)


def test_a_panel_code_without_terminology_has_no_display() -> None:
    built = build(scores=None, sums=[phq9_total()], sum_mappings={"phq9": phq9()})
    assert built.panel["code"] == {"coding": [{"system": LOINC, "code": "44249-1"}]}


def test_a_sum_score_mapping_without_a_panel_code_is_refused() -> None:
    mapping = phq9().model_copy(update={"panel": None})
    with pytest.raises(ValueError, match="no panel code"):
        build(scores=None, sums=[phq9_total()], sum_mappings={"phq9": mapping})


def test_refusals() -> None:
    with pytest.raises(ValueError, match="versioned"):
        build(response_ref="QuestionnaireResponse/qr-1")
    with pytest.raises(ValueError, match="mapping"):
        build(sums=[phq9_total()])
    with pytest.raises(ValueError, match="nothing was scored"):
        build(scores=score_nf21({}, nf21()))
