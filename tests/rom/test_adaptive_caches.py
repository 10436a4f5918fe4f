"""What the adaptive operations keep between calls (issue 14) never answers with stale content: the
canonical forms' item definitions are kept per ``url|version`` and per resolved object, and a patient's
administrations only while the stored versions found are the same ones."""

from __future__ import annotations

import copy
from typing import Any

import orjson
from fastapi.testclient import TestClient

from fhir_norse.adaptive.forms import FormItems
from fhir_norse.rom.adaptive import _FormCache
from tests.intake_support import FHIR, create_patient, post_response
from tests.rom.test_adaptive_http import NF21_STATIC_URL, _week, levels_to_answers, session

URL = "http://example.org/Questionnaire/cached"


def _form(version: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "Questionnaire",
        "url": URL,
        "version": version,
        "item": [
            {
                "linkId": "g",
                "type": "group",
                "item": [{"linkId": "a", "type": "string", "text": text}],
            }
        ],
    }


def test_form_items_are_copied_fresh_every_time() -> None:
    definitions: dict[str, dict[str, Any]] = {
        "a": {"linkId": "a", "text": "A", "answerOption": [{"valueString": "x"}]},
        "b": {"linkId": "b"},
    }
    form = FormItems(definitions)
    first = form.copies(["b", "missing", "a"])
    assert first == [definitions["b"], definitions["a"]]
    first[1]["answerOption"][0]["valueString"] = "changed"
    first[1]["text"] = "changed"
    # Neither the definitions nor later copies see what a caller did to a copy.
    assert definitions["a"] == {"linkId": "a", "text": "A", "answerOption": [{"valueString": "x"}]}
    assert form.copies(["a"]) == [definitions["a"]]
    assert form.get("a") == definitions["a"] and form.get("missing") is None
    assert form.copies([]) == []


def test_form_cache_is_per_version_and_per_resolved_object() -> None:
    cache = _FormCache()
    v1 = _form("1", "one")
    first = cache.items(v1)
    assert cache.items(v1) is first  # the same resolved (published, immutable) object: built once
    assert first.copies(["a"])[0]["text"] == "one"
    # A new version has a key of its own.
    v2 = _form("2", "two")
    assert cache.items(v2).copies(["a"])[0]["text"] == "two"
    assert cache.items(v1).copies(["a"])[0]["text"] == "one"
    # The same url|version read afresh (another object, other content): never the stale entry.
    again = copy.deepcopy(v1)
    again["item"][0]["item"][0]["text"] = "re-read"
    assert cache.items(again).copies(["a"])[0]["text"] == "re-read"


def _state(client: TestClient, patient: str) -> dict[str, Any]:
    got = client.get(
        f"/fhir/Patient/{patient}/$adaptive-state", params={"questionnaire": f"{NF21_STATIC_URL}|2.1.0"}
    )
    assert got.status_code == 200, got.text
    params = got.json()["parameter"]
    scales = {
        part["part"][0]["valueCoding"]["code"]: {p["name"]: p for p in part["part"]}
        for part in params
        if part["name"] == "scale"
    }
    administrations = next(p["valueInteger"] for p in params if p["name"] == "administrations")
    return {"administrations": administrations, "sad": scales["sad"]["fullScoresCounted"]["valueInteger"]}


def _administer(client: TestClient, patient: str, week: int) -> dict[str, Any]:
    _, done = session(client, patient, levels_to_answers({"sad": 6}), authored=_week(week))
    stored = post_response(client, done)
    assert stored.status_code == 201, stored.text
    return dict(stored.json())


def test_a_patients_history_follows_every_new_and_changed_stored_version(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    assert _state(system_client, patient) == {"administrations": 0, "sad": 0}
    _administer(system_client, patient, 0)
    assert _state(system_client, patient) == {"administrations": 1, "sad": 1}
    assert _state(system_client, patient) == {"administrations": 1, "sad": 1}  # kept: the same versions
    second = _administer(system_client, patient, 1)
    assert _state(system_client, patient) == {"administrations": 2, "sad": 2}
    # Withdrawn: its Observations get new versions (entered-in-error), the same rows.
    withdrawn = {**second, "status": "entered-in-error"}
    got = system_client.put(
        f"/fhir/QuestionnaireResponse/{second['id']}", content=orjson.dumps(withdrawn), headers=FHIR
    )
    assert got.status_code == 200, got.text
    assert _state(system_client, patient) == {"administrations": 1, "sad": 1}
    # A third administration after the withdrawal counts again.
    _administer(system_client, patient, 2)
    assert _state(system_client, patient) == {"administrations": 2, "sad": 2}
