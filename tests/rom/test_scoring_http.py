"""Scoring at intake (issue 5, items 2, 4, 5 and 6) over HTTP, on SQLite and PostgreSQL.

A completed response becomes Observations, a panel, a DiagnosticReport and a Provenance in the same
transaction; amendments re-score the same resources; withdrawals mark them entered-in-error; retries
create nothing; ``$extract`` shows the same without storing it.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.rom.intake import ALERT_KEY_SYSTEM, derived_id
from fhir_norse.scoring import answers_from_response, score_nf21
from fhir_norse.server.validation import validate_resource
from tests.intake_support import (
    FHIR,
    NF21_STATIC,
    PHQ9,
    PHQ9_ITEMS,
    create_patient,
    nf21,
    nf21_answers,
    post_response,
    response,
    search,
)
from tests.tokens import bearer

SCALES = "http://fhir-norse.org/fhir/CodeSystem/nf21-scales"


def derived(system_client: TestClient, patient: str) -> dict[str, list[dict[str, Any]]]:
    return {
        "Observation": search(system_client, f"Observation?subject=Patient/{patient}&_count=200"),
        "DiagnosticReport": search(system_client, f"DiagnosticReport?subject=Patient/{patient}"),
        "Flag": search(system_client, f"Flag?subject=Patient/{patient}"),
        "Task": search(system_client, f"Task?patient=Patient/{patient}"),
    }


def assert_conforms(app: FastAPI, resource: dict[str, Any]) -> None:
    """R4 structure, and every profile the resource claims (errors only; extensible misses warn)."""
    validate_resource(resource, expected_type=resource["resourceType"])
    for profile in resource.get("meta", {}).get("profile", []):
        errors = [
            i for i in app.state.service.kernel.profiles.validate(resource, profile) if i.severity == "error"
        ]
        assert errors == [], (resource["resourceType"], profile, errors)


def code_of(obs: dict[str, Any]) -> str:
    return str(obs["code"]["coding"][0]["code"])


def flags(system_client: TestClient, patient: str) -> dict[str, list[str]]:
    """alert key -> statuses of its Flags (oldest first)."""
    out: dict[str, list[str]] = {}
    for flag in sorted(
        search(system_client, f"Flag?subject=Patient/{patient}"), key=lambda f: f["meta"]["lastUpdated"]
    ):
        key = next(i["value"] for i in flag["identifier"] if i["system"] == ALERT_KEY_SYSTEM)
        out.setdefault(key, []).append(flag["status"])
    return out


def put(system_client: TestClient, body: dict[str, Any]) -> Any:
    return system_client.put(
        f"/fhir/QuestionnaireResponse/{body['id']}", content=orjson.dumps(body), headers=FHIR
    )


# --- what one administration writes ------------------------------------------------------------------


def test_a_completed_response_is_scored_in_full(app: FastAPI, system_client: TestClient) -> None:
    patient = create_patient(system_client)
    answers = nf21_answers({"sad": 6, "worry": 5}, preferences={"pref-feelings": "more"})
    answers |= {"single-sleep": "5", "medication-helps": "6"}
    posted = post_response(system_client, response(NF21_STATIC, answers, patient=patient))
    assert posted.status_code == 201, posted.text
    qr = posted.json()
    out = derived(system_client, patient)

    expected = score_nf21(answers_from_response(qr), nf21())
    by_profile: dict[str, list[dict[str, Any]]] = {}
    for obs in out["Observation"]:
        by_profile.setdefault(obs["meta"]["profile"][0].rsplit("/", 1)[-1], []).append(obs)
        assert_conforms(app, obs)
        assert obs["status"] == "final"
        assert obs["subject"] == {"reference": f"Patient/{patient}"}
        assert obs["effectiveDateTime"] == qr["authored"]
        assert obs["derivedFrom"] == [{"reference": f"QuestionnaireResponse/{qr['id']}/_history/1"}]
        assert obs["category"][0]["coding"][0]["code"] == "survey"
    scales = {
        code_of(o): o for o in by_profile["rom-scale-score"] if o["code"]["coding"][0]["system"] == SCALES
    }
    assert set(scales) == {c for c, s in expected.scales.items() if s.score is not None}
    for code, obs in scales.items():
        assert obs["valueQuantity"]["value"] == pytest.approx(expected.scales[code].score)
        assert obs["valueQuantity"]["code"] == "{score}"
    assert len(by_profile["rom-alliance"]) == 4
    assert [o["valueCodeableConcept"]["coding"][0]["code"] for o in by_profile["rom-preference"]] == ["more"]
    singles = {
        code_of(o): o
        for o in by_profile["rom-scale-score"]
        if code_of(o) in ("single-sleep", "medication-helps")
    }
    assert singles["single-sleep"]["valueQuantity"]["value"] == 5
    helps = {c["code"]["coding"][0]["code"]: c for c in singles["medication-helps"]["component"]}
    assert (
        helps["scale-score"]["valueQuantity"]["value"] == 2
    )  # a resource item, 8 - 6 in the problem direction

    (panel,) = by_profile["rom-panel"]
    members = {m["reference"] for m in panel["hasMember"]}
    assert members == {f"Observation/{o['id']}" for o in out["Observation"] if o is not panel}
    (report,) = out["DiagnosticReport"]
    assert_conforms(app, report)
    assert {r["reference"] for r in report["result"]} == members | {f"Observation/{panel['id']}"}
    assert "Sad Affect" in report["conclusion"]
    assert report["id"] == derived_id(qr["id"], "report")

    (prov,) = search(system_client, "Provenance")
    assert_conforms(app, prov)
    targets = {t["reference"] for t in prov["target"]}
    assert targets == {f"Observation/{o['id']}/_history/1" for o in out["Observation"]} | {
        f"DiagnosticReport/{report['id']}/_history/1"
    }
    entities = [e["what"] for e in prov["entity"]]
    assert {"reference": f"QuestionnaireResponse/{qr['id']}/_history/1"} in entities
    assert any(w.get("identifier", {}).get("value") == "nf21|2.1.0" for w in entities)
    assert prov["activity"]["coding"][0]["code"] == "CREATE"


def test_an_ehr_reads_the_scores_by_standard_search(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    for week, level in enumerate((6, 5, 3)):
        body = response(
            NF21_STATIC,
            nf21_answers({"sad": level}),
            patient=patient,
            authored=f"2026-03-0{week + 2}T09:00:00Z",
        )
        assert post_response(system_client, body).status_code == 201
    sad = search(
        system_client, f"Observation?patient=Patient/{patient}&category=survey&code={SCALES}|sad&_sort=-date"
    )
    assert [o["valueQuantity"]["value"] for o in sad] == [3, 5, 6]
    reports = search(
        system_client,
        f"DiagnosticReport?patient=Patient/{patient}&_sort=-date&_include=DiagnosticReport:result",
    )
    assert len([r for r in reports if r["resourceType"] == "DiagnosticReport"]) == 3


def test_a_questionnaire_without_mapping_is_stored_but_not_scored(system_client: TestClient) -> None:
    system_client.post(
        "/fhir/Questionnaire",
        json={
            "resourceType": "Questionnaire",
            "url": "http://example.org/Questionnaire/mood",
            "version": "1",
            "status": "active",
            "item": [{"linkId": "mood", "type": "string", "required": True}],
        },
        headers=FHIR,
    )
    patient = create_patient(system_client)
    body = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": "http://example.org/Questionnaire/mood|1",
        "status": "completed",
        "subject": {"reference": f"Patient/{patient}"},
        "authored": "2026-03-02T09:00:00Z",
        "item": [{"linkId": "mood", "answer": [{"valueString": "fine"}]}],
    }
    assert post_response(system_client, body).status_code == 201
    assert search(system_client, "Observation") == [] and search(system_client, "Provenance") == []
    del body["item"]
    assert post_response(system_client, body).status_code == 422  # its required item still counts


# --- change against the history -----------------------------------------------------------------------


def test_change_uses_the_earlier_administrations_only(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    scale = nf21().scale("sad")
    for authored, level in (("2026-03-02T09:00:00Z", 6), ("2026-03-16T09:00:00Z", 2)):
        post_response(
            system_client,
            response(NF21_STATIC, nf21_answers({"sad": level}), patient=patient, authored=authored),
        )
    # A response answered in between arrives last: its "previous" is the first, not the later one.
    late = post_response(
        system_client,
        response(NF21_STATIC, nf21_answers({"sad": 7}), patient=patient, authored="2026-03-09T09:00:00Z"),
    ).json()
    obs = next(
        o
        for o in search(system_client, f"Observation?subject=Patient/{patient}&code={SCALES}|sad")
        if o["derivedFrom"][0]["reference"].startswith(f"QuestionnaireResponse/{late['id']}/")
    )
    comps = {c["code"]["coding"][0]["code"]: c for c in obs["component"]}
    s_diff = 2**0.5 * scale.norms.sd * (1 - scale.reliability.value) ** 0.5
    assert comps["rc-previous"]["valueQuantity"]["value"] == pytest.approx((7 - 6) / s_diff)
    assert comps["rc-first"]["valueQuantity"]["value"] == pytest.approx((7 - 6) / s_diff)


# --- alerts -------------------------------------------------------------------------------------------


def test_suicide_risk_raises_a_flag_and_an_urgent_task_for_the_care_manager(
    app: FastAPI, system_client: TestClient
) -> None:
    patient = create_patient(system_client)
    practitioner = system_client.post(
        "/fhir/Practitioner", json={"resourceType": "Practitioner"}, headers=FHIR
    ).json()["id"]
    episode = {
        "resourceType": "EpisodeOfCare",
        "status": "active",
        "patient": {"reference": f"Patient/{patient}"},
        "careManager": {"reference": f"Practitioner/{practitioner}"},
    }
    assert system_client.post("/fhir/EpisodeOfCare", json=episode, headers=FHIR).status_code == 201
    post_response(system_client, response(NF21_STATIC, nf21_answers({"suicide": 6}), patient=patient))
    out = derived(system_client, patient)
    (flag,) = [f for f in out["Flag"] if f["identifier"][0]["value"] == "suicide-risk/suicide"]
    assert flag["status"] == "active"
    assert flag["meta"]["profile"] == ["http://fhir-norse.org/fhir/StructureDefinition/rom-alert-flag"]
    assert_conforms(app, flag)
    assert flag["code"]["coding"][0]["code"] == "suicide-risk"
    priority = next(e for e in flag["extension"] if e["url"].endswith("flag-priority"))
    assert priority["valueCodeableConcept"]["coding"][0]["code"] == "PH"
    detail = next(e for e in flag["extension"] if e["url"].endswith("flag-detail"))
    evidence = detail["valueReference"]["reference"]
    suicide_obs = next(o for o in out["Observation"] if code_of(o) == "suicide")
    assert evidence == f"Observation/{suicide_obs['id']}"
    (task,) = out["Task"]
    assert_conforms(app, task)
    assert task["priority"] == "urgent" and task["status"] == "requested"
    assert task["focus"] == {"reference": f"Flag/{flag['id']}"}
    assert task["owner"] == {"reference": f"Practitioner/{practitioner}"}
    assert "URGENT" in out["DiagnosticReport"][0]["conclusion"]


def test_a_flag_clears_later_and_is_never_duplicated(app: FastAPI, system_client: TestClient) -> None:
    patient = create_patient(system_client)
    weeks = [("2026-03-02T09:00:00Z", 6), ("2026-03-09T09:00:00Z", 6), ("2026-03-16T09:00:00Z", 1)]
    states = []
    for authored, level in weeks:
        post_response(
            system_client,
            response(NF21_STATIC, nf21_answers({"suicide": level}), patient=patient, authored=authored),
        )
        states.append(flags(system_client, patient).get("suicide-risk/suicide"))
    assert states == [["active"], ["active"], ["inactive"]]
    (flag,) = search(system_client, f"Flag?subject=Patient/{patient}")
    assert flag["period"] == {"start": weeks[0][0], "end": weeks[2][0]}
    assert_conforms(app, flag)  # rom-flag-1: an inactive alert says when it cleared
    assert len(search(system_client, f"Task?patient=Patient/{patient}")) == 1  # raised once


def test_alliance_rupture_and_prefer_not_on_suicidality(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    answers = nf21_answers(alliance=3, overrides={"suicide-1": "prefer-not"})
    post_response(system_client, response(NF21_STATIC, answers, patient=patient))
    assert flags(system_client, patient) == {
        "alliance-rupture": ["active"],
        "prefer-not-suicide/suicide": ["active"],
    }
    assert search(system_client, f"Task?patient=Patient/{patient}") == []  # neither is urgent by default


# --- amendments and withdrawals -----------------------------------------------------------------------


def test_an_amendment_rescores_the_same_resources(app: FastAPI, system_client: TestClient) -> None:
    patient = create_patient(system_client)
    first = response(
        NF21_STATIC, nf21_answers({"sad": 6}, preferences={"pref-style": "less"}), patient=patient
    )
    qr = post_response(system_client, first).json()
    before = {o["id"]: o for o in derived(system_client, patient)["Observation"]}

    amended = response(NF21_STATIC, nf21_answers({"sad": 3}), patient=patient)  # no preference any more
    amended |= {"id": qr["id"], "status": "amended"}
    answer = put(system_client, amended)
    assert answer.status_code == 200, answer.text
    after = {o["id"]: o for o in derived(system_client, patient)["Observation"]}
    assert set(after) == set(before)  # same ids: nothing new, nothing deleted
    for obs in after.values():
        assert_conforms(app, obs)
    sad_id = derived_id(qr["id"], "scale:sad")
    assert after[sad_id]["status"] == "amended"
    assert after[sad_id]["valueQuantity"]["value"] == 3
    assert after[sad_id]["derivedFrom"] == [{"reference": f"QuestionnaireResponse/{qr['id']}/_history/2"}]
    pref = after[derived_id(qr["id"], "preference:pref-style")]
    assert pref["status"] == "entered-in-error"
    history = system_client.get(f"/fhir/Observation/{sad_id}/_history").json()
    assert [e["resource"]["status"] for e in history["entry"]] == ["amended", "final"]
    report = system_client.get(f"/fhir/DiagnosticReport/{derived_id(qr['id'], 'report')}").json()
    assert report["status"] == "amended" and report["meta"]["versionId"] == "2"
    provenances = search(system_client, "Provenance")
    assert sorted(p["activity"]["coding"][0]["code"] for p in provenances) == ["CREATE", "UPDATE"]

    # The same amendment again changes nothing.
    again = put(system_client, amended)
    assert again.status_code == 200
    assert system_client.get(f"/fhir/Observation/{sad_id}").json()["meta"]["versionId"] == "2"
    assert len(search(system_client, "Provenance")) == 2


@pytest.mark.parametrize("how", ["entered-in-error", "delete"])
def test_a_withdrawn_response_withdraws_its_scores_and_alerts(
    app: FastAPI, system_client: TestClient, how: str
) -> None:
    patient = create_patient(system_client)
    qr = post_response(
        system_client, response(NF21_STATIC, nf21_answers({"suicide": 7}), patient=patient)
    ).json()
    if how == "delete":
        assert system_client.delete(f"/fhir/QuestionnaireResponse/{qr['id']}").status_code == 204
    else:
        assert put(system_client, {**qr, "status": "entered-in-error"}).status_code == 200
    out = derived(system_client, patient)
    assert out["Observation"] and {o["status"] for o in out["Observation"]} == {"entered-in-error"}
    for resource in [*out["Observation"], *out["DiagnosticReport"], *out["Flag"]]:
        assert_conforms(app, resource)
    assert [r["status"] for r in out["DiagnosticReport"]] == ["entered-in-error"]
    assert {f["status"] for f in out["Flag"]} == {"entered-in-error"}
    (withdrawal,) = [
        p for p in search(system_client, "Provenance") if p["activity"]["coding"][0]["code"] == "DELETE"
    ]
    assert len(withdrawal["target"]) == len(out["Observation"]) + 1 + len(out["Flag"])
    # A withdrawn administration is no longer history for the next one.
    nxt = post_response(
        system_client, response(NF21_STATIC, nf21_answers(), patient=patient, authored="2026-04-01T09:00:00Z")
    )
    sad = system_client.get(f"/fhir/Observation/{derived_id(nxt.json()['id'], 'scale:sad')}").json()
    assert not any(c["code"]["coding"][0]["code"].startswith("rc-") for c in sad["component"])


# --- retries ------------------------------------------------------------------------------------------


def test_posting_the_same_response_again_creates_nothing(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    body = response(NF21_STATIC, nf21_answers({"suicide": 7}), patient=patient, identifier="urn:uuid:6f0d")
    first = post_response(system_client, body)
    counts = {k: len(v) for k, v in derived(system_client, patient).items()}
    second = post_response(system_client, body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"]
    assert {k: len(v) for k, v in derived(system_client, patient).items()} == counts
    conditional = post_response(
        system_client, body, **{"If-None-Exist": "identifier=urn:ietf:rfc:3986|urn:uuid:6f0d"}
    )
    assert conditional.status_code == 200
    assert len(search(system_client, "QuestionnaireResponse")) == 1
    changed = copy.deepcopy(body)
    changed["authored"] = "2026-03-03T09:00:00Z"
    conflict = post_response(system_client, changed)
    assert conflict.status_code == 409
    assert first.json()["id"] in conflict.json()["issue"][0]["diagnostics"]


# --- PHQ-9 --------------------------------------------------------------------------------------------


def test_phq9_total_is_computed_and_a_wrong_submitted_total_is_a_warning(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    answers: dict[str, Any] = {i: "LA6570-1" for i in PHQ9_ITEMS[:8]} | {"44260-8": "LA6568-5", "44261-6": 3}
    answer = post_response(
        system_client, response(PHQ9, answers, patient=patient), Prefer="return=OperationOutcome"
    )
    assert answer.status_code == 201
    issues = answer.json()["issue"]
    assert [i["severity"] for i in issues] == ["information", "warning"]
    assert "submitted total 3" in issues[1]["diagnostics"]
    (total,) = [o for o in search(system_client, "Observation?code=http://loinc.org|44261-6")]
    assert total["valueQuantity"]["value"] == 16
    assert total["interpretation"][0]["text"] == "Moderately severe depression"
    assert flags(system_client, patient) == {}


def test_phq9_item_9_raises_an_urgent_suicide_flag(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    answers = {i: "LA6568-5" for i in PHQ9_ITEMS[:8]} | {"44260-8": "LA6569-3"}
    post_response(system_client, response(PHQ9, answers, patient=patient))
    assert flags(system_client, patient) == {"suicide-risk/phq9": ["active"]}
    (task,) = search(system_client, f"Task?patient=Patient/{patient}")
    assert task["priority"] == "urgent"
    later = {i: "LA6568-5" for i in PHQ9_ITEMS}
    post_response(system_client, response(PHQ9, later, patient=patient, authored="2026-04-02T09:00:00Z"))
    assert flags(system_client, patient) == {"suicide-risk/phq9": ["inactive"]}


# --- $extract -----------------------------------------------------------------------------------------


def test_extract_shows_what_scoring_writes_without_storing(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    body = response(NF21_STATIC, nf21_answers({"suicide": 6}), patient=patient)
    extracted = system_client.post(
        "/fhir/QuestionnaireResponse/$extract", content=orjson.dumps(body), headers=FHIR
    )
    assert extracted.status_code == 200, extracted.text
    bundle = extracted.json()
    assert bundle["type"] == "transaction"
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("DiagnosticReport") == 1 and "Flag" in kinds and "Task" in kinds
    assert kinds[-1] == "Provenance"
    assert search(system_client, "Observation") == [] and search(system_client, "Flag") == []
    # Posting the Bundle stores what the server would have written.
    stored = system_client.post("/fhir", content=orjson.dumps(bundle), headers=FHIR)
    assert stored.status_code == 200, stored.text
    assert len(search(system_client, "Observation")) == kinds.count("Observation")


def test_extract_at_instance_level_and_its_refusals(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    qr = post_response(system_client, response(NF21_STATIC, nf21_answers(), patient=patient)).json()
    bundle = system_client.get(f"/fhir/QuestionnaireResponse/{qr['id']}/$extract").json()
    ids = {e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"}
    assert ids == {o["id"] for o in search(system_client, "Observation")}
    assert system_client.get("/fhir/QuestionnaireResponse/nope/$extract").status_code == 404
    partial = response(NF21_STATIC, nf21_answers(), patient=patient, status="in-progress")
    assert (
        system_client.post(
            "/fhir/QuestionnaireResponse/$extract", content=orjson.dumps(partial), headers=FHIR
        ).status_code
        == 422
    )
    # A subject that does not exist answers as one out of reach does: 404 (tests/api/test_reach.py).
    bad = response(NF21_STATIC, nf21_answers(), patient="missing")
    assert (
        system_client.post(
            "/fhir/QuestionnaireResponse/$extract", content=orjson.dumps(bad), headers=FHIR
        ).status_code
        == 404
    )
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "questionnaire-response",
                "resource": response(
                    PHQ9, {i: "LA6568-5" for i in PHQ9_ITEMS} | {"44261-6": 5}, patient=patient
                ),
            }
        ],
    }
    with_issues = system_client.post(
        "/fhir/QuestionnaireResponse/$extract", content=orjson.dumps(params), headers=FHIR
    )
    assert with_issues.status_code == 200
    out = with_issues.json()
    assert out["resourceType"] == "Parameters"
    assert [p["name"] for p in out["parameter"]] == ["return", "issues"]


def test_capability_statement_lists_extract(system_client: TestClient) -> None:
    statement = system_client.get("/fhir/metadata").json()
    qr = next(r for r in statement["rest"][0]["resource"] if r["type"] == "QuestionnaireResponse")
    assert "extract" in [op["name"] for op in qr["operation"]]


# --- a patient app ------------------------------------------------------------------------------------


def test_a_patient_app_submits_its_own_answers(app: FastAPI, system_client: TestClient) -> None:
    patient = create_patient(system_client)
    other = create_patient(system_client, "Hansen")
    with TestClient(app) as phone:
        phone.headers.update(bearer(app, "patient/QuestionnaireResponse.cr", patient=patient))
        own = post_response(phone, response(NF21_STATIC, nf21_answers(), patient=patient))
        assert own.status_code == 201, own.text
        foreign = post_response(phone, response(NF21_STATIC, nf21_answers(), patient=other))
        assert foreign.status_code == 403
    assert len(search(system_client, f"DiagnosticReport?subject=Patient/{patient}")) == 1
    assert search(system_client, f"DiagnosticReport?subject=Patient/{other}") == []


def test_capability_statement_lists_the_profiles_written(system_client: TestClient) -> None:
    statement = system_client.get("/fhir/metadata").json()
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    base = "http://fhir-norse.org/fhir/StructureDefinition"
    assert f"{base}/rom-scale-score" in by_type["Observation"]["supportedProfile"]
    assert by_type["Flag"]["supportedProfile"] == [f"{base}/rom-alert-flag"]
    assert "supportedProfile" not in by_type["Patient"]


def test_alerts_follow_the_newest_administration(system_client: TestClient) -> None:
    """Amending (or receiving late) an older response re-scores it but does not revive its alerts."""
    patient = create_patient(system_client)
    first = post_response(
        system_client,
        response(NF21_STATIC, nf21_answers({"suicide": 7}), patient=patient, authored="2026-03-02T09:00:00Z"),
    ).json()
    post_response(
        system_client, response(NF21_STATIC, nf21_answers(), patient=patient, authored="2026-03-09T09:00:00Z")
    )
    assert flags(system_client, patient) == {"suicide-risk/suicide": ["inactive"]}
    amended = {**first, "status": "amended"}
    assert put(system_client, amended).status_code == 200
    late = response(
        NF21_STATIC, nf21_answers({"suicide": 6}), patient=patient, authored="2026-03-05T09:00:00Z"
    )
    assert post_response(system_client, late).status_code == 201
    assert flags(system_client, patient) == {"suicide-risk/suicide": ["inactive"]}
    assert len(search(system_client, f"DiagnosticReport?subject=Patient/{patient}")) == 3
