"""Search over HTTP, end to end through indexing: https://hl7.org/fhir/R4/search.html."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

FHIR = {"Content-Type": "application/fhir+json"}
LOINC = "http://loinc.org"


def post(system_client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = system_client.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def obs(patient_id: str, code: str, when: str, value: float, **extra: Any) -> dict[str, Any]:
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
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": value,
            "unit": "{score}",
            "system": "http://unitsofmeasure.org",
            "code": "{score}",
        },
        **extra,
    }


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


@pytest.fixture
def cohort(system_client: TestClient) -> dict[str, Any]:
    kari = post(
        system_client,
        {
            "resourceType": "Patient",
            "name": [{"family": "Ødegård", "given": ["Kari"]}],
            "identifier": [{"system": "http://hospital.example/mrn", "value": "K1"}],
            "birthDate": "1980-05-17",
            "gender": "female",
        },
    )
    ola = post(
        system_client,
        {
            "resourceType": "Patient",
            "name": [{"family": "Nordmann", "given": ["Ola"]}],
            "identifier": [{"system": "http://hospital.example/mrn", "value": "O1"}],
            "birthDate": "1975-01-02",
            "gender": "male",
        },
    )
    observations = [
        post(system_client, obs(kari["id"], "44261-6", f"2024-0{month}-01T10:00:00Z", float(month)))
        for month in range(1, 6)
    ]
    post(system_client, obs(kari["id"], "70274-6", "2024-03-01T10:00:00Z", 9.0))
    post(system_client, obs(ola["id"], "44261-6", "2024-02-01T10:00:00Z", 20.0))
    return {"kari": kari, "ola": ola, "observations": observations}


def test_hot_query_patient_code_sorted_by_date(system_client: TestClient, cohort: dict[str, Any]) -> None:
    kari = cohort["kari"]["id"]
    bundle = system_client.get(
        f"/fhir/Observation?patient={kari}&code={LOINC}|44261-6&_sort=-date&_count=20"
    ).json()
    assert bundle["type"] == "searchset"
    found = ids(bundle)
    expected = [o["id"] for o in reversed(cohort["observations"])]
    assert found == expected
    assert "total" not in bundle  # _total is not computed unless asked


def test_paging_follows_next_and_previous_links(system_client: TestClient, cohort: dict[str, Any]) -> None:
    kari = cohort["kari"]["id"]
    url: str | None = f"/fhir/Observation?subject=Patient/{kari}&_sort=date&_count=2"
    pages: list[list[str]] = []
    bundle: dict[str, Any] = {}
    while url:
        bundle = system_client.get(url.replace("http://testserver", "")).json()
        pages.append(ids(bundle))
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    assert [len(p) for p in pages] == [2, 2, 2]
    flat = [i for p in pages for i in p]
    assert len(set(flat)) == 6
    previous = next(link["url"] for link in bundle["link"] if link["relation"] == "previous")
    back = system_client.get(previous.replace("http://testserver", "")).json()
    assert ids(back) == pages[1]


def test_total_and_summary_count(system_client: TestClient, cohort: dict[str, Any]) -> None:
    assert system_client.get("/fhir/Observation?_total=accurate").json()["total"] == 7
    counted = system_client.get(f"/fhir/Observation?code={LOINC}|44261-6&_summary=count").json()
    assert counted["total"] == 6
    assert "entry" not in counted


def test_elements_and_summary_subset_resources(system_client: TestClient, cohort: dict[str, Any]) -> None:
    bundle = system_client.get("/fhir/Patient?_elements=birthDate").json()
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert "birthDate" in resource and "name" not in resource
        assert any(t["code"] == "SUBSETTED" for t in resource["meta"]["tag"])
    summary = system_client.get("/fhir/Observation?_summary=true&_count=1").json()
    assert "valueQuantity" in summary["entry"][0]["resource"]
    assert "category" not in summary["entry"][0]["resource"]


def test_include_and_revinclude(system_client: TestClient, cohort: dict[str, Any]) -> None:
    ola = cohort["ola"]["id"]
    bundle = system_client.get(f"/fhir/Observation?subject=Patient/{ola}&_include=Observation:subject").json()
    assert ids(bundle, "include") == [ola]
    rev = system_client.get(f"/fhir/Patient?_id={ola}&_revinclude=Observation:subject").json()
    assert ids(rev) == [ola]
    assert len(ids(rev, "include")) == 1


def test_string_search_is_accent_and_case_insensitive(
    system_client: TestClient, cohort: dict[str, Any]
) -> None:
    assert ids(system_client.get("/fhir/Patient?family=odeg").json()) == [cohort["kari"]["id"]]
    assert ids(system_client.get("/fhir/Patient?family:exact=Ødegård").json()) == [cohort["kari"]["id"]]
    assert ids(system_client.get("/fhir/Patient?family:exact=ødegård").json()) == []
    assert ids(system_client.get("/fhir/Patient?name:contains=RDMA").json()) == [cohort["ola"]["id"]]


def test_chained_and_has(system_client: TestClient, cohort: dict[str, Any]) -> None:
    chained = system_client.get("/fhir/Observation?patient.identifier=http://hospital.example/mrn|O1").json()
    assert len(ids(chained)) == 1
    has = system_client.get(f"/fhir/Patient?_has:Observation:patient:code={LOINC}|70274-6").json()
    assert ids(has) == [cohort["kari"]["id"]]


def test_quantity_date_and_composite(system_client: TestClient, cohort: dict[str, Any]) -> None:
    assert len(ids(system_client.get("/fhir/Observation?value-quantity=gt4.5").json())) == 3
    assert len(ids(system_client.get("/fhir/Observation?date=ge2024-04&date=lt2024-06").json())) == 2
    composite = system_client.get(f"/fhir/Observation?code-value-quantity={LOINC}|44261-6$gt4.5").json()
    assert len(ids(composite)) == 2  # Kari's 5.0 and Ola's 20.0


def test_unknown_parameter_lenient_and_strict(system_client: TestClient, cohort: dict[str, Any]) -> None:
    lenient = system_client.get("/fhir/Patient?nonsense=1").json()
    assert len(ids(lenient)) == 2
    outcome = [e for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome and outcome[0]["resource"]["issue"][0]["severity"] == "warning"
    self_link = next(link["url"] for link in lenient["link"] if link["relation"] == "self")
    assert "nonsense" not in self_link
    strict = system_client.get("/fhir/Patient?nonsense=1", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400
    assert strict.json()["resourceType"] == "OperationOutcome"


def test_post_search(system_client: TestClient, cohort: dict[str, Any]) -> None:
    response = system_client.post(
        "/fhir/Patient/_search",
        content=b"gender=male",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert ids(response.json()) == [cohort["ola"]["id"]]


def test_bad_search_values_are_400(system_client: TestClient) -> None:
    for query in (
        "birthdate=not-a-date",
        "_count=-1",
        "birthdate=xx2020",
        "_sort=nonsense",
        "_cursor=garbage",
    ):
        response = system_client.get(f"/fhir/Patient?{query}")
        assert response.status_code == 400, query
        assert response.json()["resourceType"] == "OperationOutcome"


def test_deleted_resources_are_not_found_by_search(system_client: TestClient, cohort: dict[str, Any]) -> None:
    system_client.delete(f"/fhir/Patient/{cohort['ola']['id']}")
    assert ids(system_client.get("/fhir/Patient").json()) == [cohort["kari"]["id"]]


def test_questionnaire_response_by_canonical(system_client: TestClient, cohort: dict[str, Any]) -> None:
    kari = cohort["kari"]["id"]
    # A site's own Questionnaire (no scoring mapping): stored, searchable, validated against itself.
    post(
        system_client,
        {
            "resourceType": "Questionnaire",
            "url": "http://example.org/Questionnaire/phq9",
            "version": "1.0.0",
            "status": "active",
        },
    )
    qr = post(
        system_client,
        {
            "resourceType": "QuestionnaireResponse",
            "status": "completed",
            "questionnaire": "http://example.org/Questionnaire/phq9|1.0.0",
            "subject": {"reference": f"Patient/{kari}"},
            "authored": "2024-05-01T10:00:00Z",
        },
    )
    by_version = system_client.get(
        "/fhir/QuestionnaireResponse?questionnaire=http://example.org/Questionnaire/phq9|1.0.0"
    )
    assert ids(by_version.json()) == [qr["id"]]
    bare = system_client.get(
        "/fhir/QuestionnaireResponse?questionnaire=http://example.org/Questionnaire/phq9"
    )
    assert ids(bare.json()) == [qr["id"]]
    other = system_client.get(
        "/fhir/QuestionnaireResponse?questionnaire=http://example.org/Questionnaire/phq9|2.0.0"
    )
    assert ids(other.json()) == []


def test_reference_identifier_modifier(system_client: TestClient) -> None:
    """``:identifier`` finds logical references (https://hl7.org/fhir/R4/search.html#modifiers)."""
    flag = post(
        system_client,
        {
            "resourceType": "Flag",
            "status": "active",
            "code": {"text": "risk"},
            "subject": {"identifier": {"system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": "01017012345"}},
        },
    )
    found = system_client.get(
        "/fhir/Flag?subject:identifier=urn:oid:2.16.578.1.12.4.1.4.1|01017012345"
    ).json()
    assert ids(found) == [flag["id"]]
    assert (
        ids(system_client.get("/fhir/Flag?subject:identifier=urn:oid:2.16.578.1.12.4.1.4.1|0").json()) == []
    )
