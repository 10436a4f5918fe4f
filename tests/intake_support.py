"""Builders for intake and scoring tests: published Questionnaires, patients and valid responses.

Responses are built from the published Questionnaire itself (groups, answer Codings with their
displays, as an SDC form filler sends them), so a test states only *what* the patient answered.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from fastapi.testclient import TestClient

from fhir_norse.instruments.schema import InstrumentMapping, load_mapping, load_sum_score_mapping
from fhir_norse.server.content import content_files, stored_id
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.published import PUBLISHED_TAG
from fhir_norse.server.resources import now_ms, stamp_meta

ROOT = Path(__file__).resolve().parents[1]
FHIR = {"Content-Type": "application/fhir+json"}
BASE = "http://fhir-norse.org/fhir"
NF21_STATIC = f"{BASE}/Questionnaire/nf21-static|2.1.0"
NF21_ADAPTIVE = f"{BASE}/Questionnaire/nf21-adaptive|2.1.0"
# The newest content version (issue 13): what a bare canonical and the operations' default resolve to.
NF21_STATIC_NEWEST = f"{BASE}/Questionnaire/nf21-static|2.2.0"
PHQ9 = f"{BASE}/Questionnaire/phq9|1.0.0"
GAD7 = f"{BASE}/Questionnaire/gad7|1.0.0"
NF21_ANSWERS = f"{BASE}/CodeSystem/nf21-answers"
# The nine scored PHQ-9 items (LOINC codes), as the mapping lists them.
PHQ9_ITEMS: tuple[str, ...] = tuple(load_sum_score_mapping(ROOT / "mappings" / "phq9-1.0.0.yaml").total.items)


@cache
def _content() -> tuple[dict[str, Any], ...]:
    out = []
    for path in content_files(ROOT):
        resource = orjson.loads(path.read_bytes())
        if isinstance(resource, dict) and resource.get("resourceType") == "Questionnaire":
            out.append(resource)
    return tuple(out)


def publish_questionnaires(service: FhirService) -> None:
    """Store the pack's Questionnaires as publishing does, without its (slow, separately tested)
    validation of each file: see tests/api/test_content_publish.py for the real path."""
    with service.storage.write() as uow:
        for resource in _content():
            body = orjson.loads(orjson.dumps(resource))
            body["id"] = stored_id(body)
            body.setdefault("meta", {})["tag"] = [PUBLISHED_TAG]
            moment = now_ms()
            stamped = stamp_meta(body, body["id"], 1, moment)
            uow.save(
                res_type="Questionnaire",
                res_id=body["id"],
                body=stamped,
                version=1,
                last_updated=moment,
                method="create",
                previous=None,
                index_rows=service.kernel.extractor.extract(stamped),
            )


@cache
def questionnaire(canonical: str) -> dict[str, Any]:
    url, _, version = canonical.partition("|")
    for resource in _content():
        if resource["url"] == url and resource["version"] == version:
            return resource
    raise KeyError(canonical)


@cache
def nf21(version: str = "2.1.0") -> InstrumentMapping:
    """The Norse Feedback mapping of ``version`` (2.1.0 unless a test names the newer content, 2.2.0)."""
    return load_mapping(ROOT / "mappings" / f"nf21-{version}.yaml")


def _answer(item: dict[str, Any], value: Any) -> dict[str, Any]:
    if item["type"] in ("choice", "open-choice"):
        for option in item.get("answerOption", []):
            coding = option.get("valueCoding") or {}
            if coding.get("code") == value:
                return {"valueCoding": {k: coding[k] for k in ("system", "code", "display") if k in coding}}
        raise KeyError(f"{item['linkId']}: no answer option {value!r}")
    if item["type"] == "integer":
        return {"valueInteger": int(value)}
    if item["type"] == "decimal":
        return {"valueDecimal": value}
    if item["type"] == "boolean":
        return {"valueBoolean": bool(value)}
    return {"valueString": str(value)}


def _items(items: list[dict[str, Any]], answers: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "group":
            children = _items(item.get("item", []), answers)
            if children:
                out.append({"linkId": item["linkId"], "item": children})
        elif item["linkId"] in answers:
            out.append({"linkId": item["linkId"], "answer": [_answer(item, answers[item["linkId"]])]})
    return out


def answers_to(form: Mapping[str, Any], answers: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The items of a response to ``form``, any Questionnaire (one an operation returned), as
    :func:`response` builds them for a published one."""
    return _items(form["item"], answers)


def response(
    canonical: str,
    answers: Mapping[str, Any],
    *,
    patient: str,
    authored: str = "2026-03-02T09:00:00+01:00",
    status: str = "completed",
    identifier: str | None = None,
) -> dict[str, Any]:
    """A QuestionnaireResponse to ``canonical`` with ``answers`` (linkId -> answer code or value)."""
    body: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": canonical,
        "status": status,
        "subject": {"reference": f"Patient/{patient}"},
        "authored": authored,
        "item": _items(questionnaire(canonical)["item"], answers),
    }
    if identifier is not None:
        body["identifier"] = {"system": "urn:ietf:rfc:3986", "value": identifier}
    return body


def nf21_answers(
    levels: Mapping[str, int] | None = None,
    *,
    default: int = 2,
    alliance: int | Mapping[str, int] = 6,
    preferences: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
    version: str = "2.1.0",
) -> dict[str, str]:
    """Answers a patient gives when each scale sits at ``levels[scale]`` (1-7, problem direction).

    Every trigger is answered; the other items of a scale only when its trigger opens it, as the static
    form's enableWhen asks them (reverse-keyed items are answered ``8 - level``). Alliance items take
    ``alliance`` (one value, or per linkId); ``overrides`` replace single answers last. ``version`` names
    the mapping (and so the items) of the form answered.
    """
    m = nf21(version)
    levels = dict(levels or {})
    answers: dict[str, str] = {}
    for scale in m.scales:
        if scale.trigger is None:
            continue
        level = levels.get(scale.code, default)
        reverse = scale.trigger in scale.reverse_keyed
        answers[scale.trigger] = str(8 - level if reverse else level)
    for scale in m.scales:
        trigger = m.trigger_of(scale)
        owner = scale if scale.trigger is not None else m.scale_of_item(trigger)
        raw = int(answers[trigger])
        problem = 8 - raw if trigger in owner.reverse_keyed else raw
        if problem <= scale.open_if_trigger_gt:
            continue
        level = levels.get(scale.code, default)
        for link_id in scale.items:
            if link_id != scale.trigger:
                answers[link_id] = str(8 - level if link_id in scale.reverse_keyed else level)
    for link_id in m.alliance.items:
        answers[link_id] = str(alliance if isinstance(alliance, int) else alliance.get(link_id, 6))
    for link_id, value in (preferences or {}).items():
        answers[link_id] = value
    answers.update(overrides or {})
    return answers


def create_patient(client: TestClient, family: str = "Nordmann", **extra: Any) -> str:
    body = {"resourceType": "Patient", "name": [{"family": family}], **extra}
    answer = client.post("/fhir/Patient", json=body, headers=FHIR)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def post_response(client: TestClient, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/fhir/QuestionnaireResponse", content=orjson.dumps(body), headers={**FHIR, **headers})


def search(client: TestClient, query: str) -> list[dict[str, Any]]:
    """Every resource of a search (following next links)."""
    out: list[dict[str, Any]] = []
    url: str | None = f"/fhir/{query}"
    while url:
        page = client.get(url)
        assert page.status_code == 200, page.text
        bundle = page.json()
        out += [
            e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") != "outcome"
        ]
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return out
