"""Norse Feedback content 2.2.0 (issue 13, items 2, 3 and 7) over HTTP, on both databases.

2.2.0 asks "focus on thoughts" as a preference of its own (2.1.0's "feelings rather than thoughts" could
not say "more feelings and more thoughts"), the four alliance items of the published constructs, and
carries the norms at the published precision. 2.1.0 stays published: a response to it is accepted and
scored by ``mappings/nf21-2.1.0.yaml``, a response to 2.2.0 (bokmål or English) by
``mappings/nf21-2.2.0.yaml``. The expected values are written out here from the case study and the
norm table, not read from the server's code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from tests.intake_support import create_patient, post_response, publish_questionnaires, response, search
from tests.tokens import bearer

Json = dict[str, Any]

BASE = "http://fhir-norse.org/fhir"
STATIC_21 = f"{BASE}/Questionnaire/nf21-static|2.1.0"
STATIC_22 = f"{BASE}/Questionnaire/nf21-static|2.2.0"
STATIC_22_EN = f"{BASE}/Questionnaire/nf21-static-en|2.2.0"
CS_ITEMS = f"{BASE}/CodeSystem/nf21-items"
CS_ALLIANCE = f"{BASE}/CodeSystem/nf21-alliance"
CS_SCALES = f"{BASE}/CodeSystem/nf21-scales"
CS_PREFERENCE = f"{BASE}/CodeSystem/preference-values"
CS_COMPONENTS = f"{BASE}/CodeSystem/rom-components"
PREFERENCE_PROFILE = f"{BASE}/StructureDefinition/rom-preference"

# The 19 triggers, each answered 2 (no scale opens); worry-1 is the worry trigger.
TRIGGERS = tuple(
    f"{scale}-1"
    for scale in [
        "sad",
        "somAnx",
        "eating",
        "suicide",
        "subUse",
        "trauma",
        "irritable",
        "hopeless",
        "worry",
        "avoidSit",
        "avoidSoc",
        "internal",
        "selfCrit",
        "control",
        "socialSafety",
        "ready",
        "recovEnv",
        "genFunc",
        "cog",
    ]
)
REVERSED_TRIGGERS = {"socialSafety-1", "ready-1", "recovEnv-1", "genFunc-1"}
ALLIANCE_21 = ("alliance-goal", "alliance-bond-1", "alliance-bond-2", "alliance-task")
ALLIANCE_22 = ("alliance-goal-understand", "alliance-bond-1", "alliance-bond-accepted", "alliance-task-know")

# Harald's first preferences, at report 18 of the case study: "more techniques, and focus on feelings,
# thoughts and relationships, and less humour".
REPORT_18 = {
    "pref-techniques": "more",
    "pref-style": "less",
    "pref-feelings": "more",
    "pref-thoughts": "more",
    "pref-relationship": "more",
}
# Report 18's alliance (goal, bond-1, bond-2, task) in the case-study tests.
ALLIANCE_18 = (6, 6, 6, 5)

# Worry norms: 2.1.0 publishes them rounded, 2.2.0 as the NorseResearch 2019 norm table has them.
WORRY_NORMS = {"2.1.0": (5.06, 1.62), "2.2.0": (5.059663360384731, 1.6237779035302427)}


@pytest.fixture
def server(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    publish_questionnaires(app.state.service)
    try:
        with TestClient(app, headers=bearer(app)) as client:
            yield client
    finally:
        app.state.service.storage.engine.dispose()


def _answers(alliance: Mapping[str, int], preferences: Mapping[str, str], worry: int = 2) -> dict[str, str]:
    """Every trigger at level 2 in the problem direction (worry at ``worry``, at most 5: no scale
    opens), the alliance and preference answers."""
    assert worry <= 5
    answers = {t: ("6" if t in REVERSED_TRIGGERS else "2") for t in TRIGGERS}
    answers["worry-1"] = str(worry)
    answers |= {link_id: str(value) for link_id, value in alliance.items()}
    answers |= dict(preferences)
    return answers


def _post(client: TestClient, canonical: str, answers: Mapping[str, str], patient: str) -> Json:
    answer = post_response(client, response(canonical, answers, patient=patient))
    assert answer.status_code == 201, answer.text
    body: Json = answer.json()
    return body


def _code(concept: Json) -> tuple[str, str]:
    coding = concept["coding"][0]
    return coding["system"], coding["code"]


def _observations(client: TestClient, patient: str) -> list[Json]:
    return search(client, f"Observation?subject=Patient/{patient}")


def _preferences(observations: list[Json]) -> dict[str, str]:
    out = {}
    for obs in observations:
        if PREFERENCE_PROFILE in obs.get("meta", {}).get("profile", []):
            system, code = _code(obs["code"])
            assert system == CS_ITEMS
            value_system, value = _code(obs["valueCodeableConcept"])
            assert value_system == CS_PREFERENCE
            out[code] = value
    return out


def _z(observations: list[Json], scale: str) -> float:
    (obs,) = [o for o in observations if _code(o["code"]) == (CS_SCALES, scale)]
    (z,) = [c for c in obs.get("component", []) if _code(c["code"]) == (CS_COMPONENTS, "z-score")]
    return float(z["valueQuantity"]["value"])


def _alliance(observations: list[Json]) -> dict[str, float]:
    return {
        _code(o["code"])[1]: o["valueQuantity"]["value"]
        for o in observations
        if _code(o["code"])[0] == CS_ALLIANCE
    }


def test_report_18_preference_arrows_from_a_2_2_0_response(server: TestClient) -> None:
    """The case study's report 18 (Harald): more techniques, feelings, thoughts and relationship, less
    humour: five rom-preference Observations, one per construct, "more" on feelings AND on thoughts."""
    patient = create_patient(server, "Harald")
    alliance = dict(zip(ALLIANCE_22, ALLIANCE_18, strict=True))
    qr = _post(server, STATIC_22, _answers(alliance, REPORT_18), patient)
    observations = _observations(server, patient)
    assert _preferences(observations) == REPORT_18
    arrows = {"more": "↑", "less": "↓", "as-now": "-"}
    assert {k: arrows[v] for k, v in _preferences(observations).items()} == {
        "pref-techniques": "↑",
        "pref-style": "↓",
        "pref-feelings": "↑",
        "pref-thoughts": "↑",
        "pref-relationship": "↑",
    }
    for obs in observations:
        (source,) = obs["derivedFrom"]
        assert source["reference"].startswith(f"QuestionnaireResponse/{qr['id']}")
    # The alliance of the published constructs: goal, bond (understood, accepted), task.
    assert _alliance(observations) == {"goal": 6, "bond": 6, "task": 5, "total": 5.75}
    # The report of the administration carries the five preferences.
    (report,) = search(server, f"DiagnosticReport?subject=Patient/{patient}")
    results = {r["reference"] for r in report.get("result", [])}
    preference_ids = {
        f"Observation/{o['id']}"
        for o in observations
        if PREFERENCE_PROFILE in o.get("meta", {}).get("profile", [])
    }
    assert len(preference_ids) == 5
    assert preference_ids <= results


def test_the_english_2_2_0_form_is_scored_by_the_2_2_0_mapping(server: TestClient) -> None:
    patient = create_patient(server, "Harald")
    alliance = dict(zip(ALLIANCE_22, (7, 7, 7, 7), strict=True))
    _post(
        server, STATIC_22_EN, _answers(alliance, {"pref-thoughts": "less", "pref-feelings": "more"}), patient
    )
    observations = _observations(server, patient)
    assert _preferences(observations) == {"pref-thoughts": "less", "pref-feelings": "more"}
    assert _alliance(observations) == {"goal": 7, "bond": 7, "task": 7, "total": 7}


def test_2_1_0_and_2_2_0_responses_are_each_scored_by_their_own_mapping(server: TestClient) -> None:
    """2.1.0 stays published and scored by its mapping (its items, its rounded norms); 2.2.0 by its own
    (the new items, the norms at full precision)."""
    old_patient, new_patient = create_patient(server, "Sonja"), create_patient(server, "Harald")
    old_answers = _answers(
        dict(zip(ALLIANCE_21, (4, 5, 6, 3), strict=True)),
        {"pref-feelings": "more", "pref-feelings-thoughts": "more"},
    )
    new_answers = _answers(
        dict(zip(ALLIANCE_22, (4, 5, 6, 3), strict=True)),
        {"pref-feelings": "more", "pref-thoughts": "more"},
    )
    _post(server, STATIC_21, old_answers, old_patient)
    _post(server, STATIC_22, new_answers, new_patient)
    old, new = _observations(server, old_patient), _observations(server, new_patient)

    assert _preferences(old) == {"pref-feelings": "more", "pref-feelings-thoughts": "more"}
    assert _preferences(new) == {"pref-feelings": "more", "pref-thoughts": "more"}
    expected_alliance = {"goal": 4, "bond": 5.5, "task": 3, "total": 4.5}
    assert _alliance(old) == _alliance(new) == expected_alliance

    # Worry 2 (trigger only): z with the norms of each version; the two differ by about 0.0046.
    for observations, version in ((old, "2.1.0"), (new, "2.2.0")):
        mean, sd = WORRY_NORMS[version]
        assert _z(observations, "worry") == pytest.approx((2 - mean) / sd, abs=1e-9), version
    assert abs(_z(old, "worry") - _z(new, "worry")) > 0.004


@pytest.mark.parametrize(
    ("canonical", "link_id", "value"),
    [
        (STATIC_22, "pref-feelings-thoughts", "more"),
        (STATIC_22, "alliance-task", "5"),
        (STATIC_21, "pref-thoughts", "more"),
        (STATIC_21, "alliance-bond-accepted", "5"),
    ],
)
def test_an_item_of_the_other_version_is_refused(
    server: TestClient, canonical: str, link_id: str, value: str
) -> None:
    """Each version asks its own items: a response to 2.2.0 cannot carry a retired 2.1.0 item, nor a
    response to 2.1.0 a 2.2.0 one."""
    patient = create_patient(server)
    alliance_items = ALLIANCE_22 if canonical == STATIC_22 else ALLIANCE_21
    body = response(canonical, _answers(dict.fromkeys(alliance_items, 6), {}), patient=patient)
    group = next(
        g for g in body["item"] if g["linkId"] == "group-preferences" or g["linkId"] == "group-alliance"
    )
    group["item"].append({"linkId": link_id, "answer": [{"valueCoding": {"code": value}}]})
    answer = post_response(server, body)
    assert answer.status_code in (400, 422), answer.text
    assert link_id in answer.text
    assert _observations(server, patient) == []
