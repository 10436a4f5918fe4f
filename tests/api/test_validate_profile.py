"""``$validate`` with profiles over HTTP: https://hl7.org/fhir/R4/resource-operation-validate.html.

The ``profile`` parameter in the query string or in a Parameters body, the profiles a resource
claims in ``meta.profile``, and profiles the server does not know.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi.testclient import TestClient

FHIR = {"Content-Type": "application/fhir+json"}
SD = "http://fhir-norse.org/fhir/StructureDefinition/"
CS = "http://fhir-norse.org/fhir/CodeSystem/"
SCALE_SCORE = SD + "rom-scale-score"
ALERT_FLAG = SD + "rom-alert-flag"
UNKNOWN = "http://example.org/StructureDefinition/elsewhere"

JsonDict = dict[str, Any]


def scale_score() -> JsonDict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}
                ]
            }
        ],
        "code": {"coding": [{"system": CS + "nf21-scales", "code": "worry"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2026-03-04T10:15:00+01:00",
        "performer": [{"reference": "Patient/p1"}],
        "valueQuantity": {
            "value": 3.25,
            "unit": "score",
            "system": "http://unitsofmeasure.org",
            "code": "{score}",
        },
        "derivedFrom": [{"reference": "QuestionnaireResponse/qr1/_history/1"}],
    }


def alert_flag() -> JsonDict:
    return {
        "resourceType": "Flag",
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/flag-detail",
                "valueReference": {"reference": "Observation/o1"},
            }
        ],
        "status": "inactive",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/flag-category", "code": "clinical"}
                ]
            }
        ],
        "code": {"coding": [{"system": CS + "rom-alerts", "code": "deterioration"}]},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2026-03-04T10:16:00+01:00", "end": "2026-04-01T09:00:00+02:00"},
    }


def parameters(resource: JsonDict, *profiles: JsonDict) -> JsonDict:
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resource", "resource": resource},
            *({"name": "profile", **p} for p in profiles),
        ],
    }


def issues(response: Any) -> list[tuple[str, str, list[str]]]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return [(i["severity"], i["code"], i.get("expression", [])) for i in body["issue"]]


def test_profile_in_the_query_string(system_client: TestClient) -> None:
    good = system_client.post(
        f"/fhir/Observation/$validate?profile={SCALE_SCORE}", json=scale_score(), headers=FHIR
    )
    assert issues(good) == [("information", "informational", [])]
    broken = scale_score()
    broken["valueQuantity"]["code"] = "{points}"
    broken["subject"] = {"reference": "Group/g1"}
    bad = system_client.post(f"/fhir/Observation/$validate?profile={SCALE_SCORE}", json=broken, headers=FHIR)
    assert issues(bad) == [
        ("error", "structure", ["Observation.subject"]),
        ("error", "value", ["Observation.valueQuantity.code"]),
    ]
    assert "rom-scale-score" in bad.json()["issue"][0]["diagnostics"]
    # Without a profile the same resource is plain valid R4.
    plain = system_client.post("/fhir/Observation/$validate", json=broken, headers=FHIR)
    assert issues(plain) == [("information", "informational", [])]
    # Nothing was stored.
    assert system_client.get("/fhir/Observation?_total=accurate").json()["total"] == 0


def test_versioned_profile_and_instance_level(system_client: TestClient) -> None:
    created = system_client.put("/fhir/Observation/o1", json={**scale_score(), "id": "o1"}, headers=FHIR)
    assert created.status_code in (200, 201), created.text
    broken = {**scale_score(), "id": "o1", "status": "preliminary"}
    response = system_client.post(
        f"/fhir/Observation/o1/$validate?profile={SCALE_SCORE}|0.4.0", json=broken, headers=FHIR
    )
    found = issues(response)
    assert found == [("error", "invariant", ["Observation"])]
    assert "rom-status-1" in response.json()["issue"][0]["diagnostics"]


def test_profile_as_a_parameter(system_client: TestClient) -> None:
    flag = alert_flag()
    ok = system_client.post(
        "/fhir/Flag/$validate", json=parameters(flag, {"valueUri": ALERT_FLAG}), headers=FHIR
    )
    assert issues(ok) == [("information", "informational", [])]
    del flag["period"]["end"]
    flag["code"]["coding"][0]["code"] = "bad-weather"
    bad = system_client.post(
        "/fhir/Flag/$validate", json=parameters(flag, {"valueCanonical": ALERT_FLAG}), headers=FHIR
    )
    assert issues(bad) == [
        ("error", "invariant", ["Flag"]),
        ("error", "code-invalid", ["Flag.code"]),
    ]
    assert "rom-flag-1" in bad.json()["issue"][0]["diagnostics"]
    # A profile parameter without a value is a malformed request.
    empty = system_client.post(
        "/fhir/Flag/$validate", json=parameters(flag, {"valueString": ""}), headers=FHIR
    )
    assert empty.status_code == 400


def test_meta_profile_is_validated(system_client: TestClient) -> None:
    obs = scale_score()
    obs["meta"] = {"profile": [SCALE_SCORE]}
    assert issues(system_client.post("/fhir/Observation/$validate", json=obs, headers=FHIR)) == [
        ("information", "informational", [])
    ]
    obs["hasMember"] = [{"reference": "Observation/o2"}]
    found = issues(system_client.post("/fhir/Observation/$validate", json=obs, headers=FHIR))
    assert found == [("error", "structure", ["Observation.hasMember"])]
    # Named twice (meta and parameter, with and without version), checked once.
    twice = system_client.post(
        f"/fhir/Observation/$validate?profile={SCALE_SCORE}|0.4.0", json=obs, headers=FHIR
    )
    assert issues(twice) == found


def test_unknown_profiles(system_client: TestClient) -> None:
    obs = scale_score()
    obs["meta"] = {"profile": [UNKNOWN]}
    claimed = system_client.post("/fhir/Observation/$validate", json=obs, headers=FHIR)
    assert issues(claimed) == [("information", "not-supported", ["Observation.meta.profile[0]"])]
    asked = system_client.post(
        f"/fhir/Observation/$validate?profile={UNKNOWN}", json=scale_score(), headers=FHIR
    )
    assert issues(asked) == [("error", "not-supported", ["Observation"])]
    assert asked.json()["issue"][0]["diagnostics"] == f"profile {UNKNOWN} is not known to this server"
    in_body = system_client.post(
        "/fhir/Observation/$validate", json=parameters(scale_score(), {"valueUri": UNKNOWN}), headers=FHIR
    )
    assert issues(in_body) == [("error", "not-supported", ["Observation"])]


def test_a_profile_for_another_type(system_client: TestClient) -> None:
    response = system_client.post(
        f"/fhir/Observation/$validate?profile={ALERT_FLAG}", json=scale_score(), headers=FHIR
    )
    assert issues(response) == [("error", "structure", ["Observation"])]
    assert "constrains Flag, not Observation" in response.json()["issue"][0]["diagnostics"]


def test_structural_errors_come_first(system_client: TestClient) -> None:
    broken = copy.deepcopy(scale_score())
    broken["status"] = "done"  # not an R4 observation-status
    del broken["valueQuantity"]  # would break the profile too
    response = system_client.post(
        f"/fhir/Observation/$validate?profile={SCALE_SCORE}", json=broken, headers=FHIR
    )
    found = issues(response)
    assert [severity for severity, _, _ in found] == ["error"]
    assert found[0][2] == ["Observation.status"]
