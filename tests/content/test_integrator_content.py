"""Issue 12, items 21, 23 and 25: what the content pack gives integrators and patient apps.

* **21** Custom SearchParameters (``Flag?status=``, ``Flag?category=``), published with the pack, indexed,
  listed in the CapabilityStatement with their ``definition``; resources stored before a parameter was
  published are reindexed when it is; an unknown parameter is a 400 with ``Prefer: handling=strict`` and
  is left out of the self link otherwise. ``Task?code=`` is R4's own: the alert-review Task is coded.
* **23** The English forms are Questionnaires of their own (``language`` en, ``derivedFrom`` the bokmål
  ones), scored by the same mapping.
* **25** Every profile carries a snapshot generated at build time from its differential.

The HTTP tests run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.canonicals import BASE, CS_ROM
from fhir_norse.cli import main as cli
from fhir_norse.config import Settings
from fhir_norse.server.content import ContentConflict, publish_content, search_registry
from fhir_norse.server.resources import now_ms, stamp_meta
from fhir_norse.server.search.extract import default_extractor
from tests.intake_support import (
    FHIR,
    NF21_STATIC,
    answers_to,
    create_patient,
    nf21_answers,
    post_response,
    publish_questionnaires,
    response,
    search,
)
from tests.tokens import bearer
from tools.content_check import check_content
from tools.snapshots import SnapshotError, differential_problems, generate_snapshot

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted((ROOT / "profiles").glob("StructureDefinition-*.json"))
FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"
NF21_DIR = ROOT / "questionnaires" / "nf21"
STATIC_EN = f"{BASE}/Questionnaire/nf21-static-en|2.1.0"
ADAPTIVE_EN = f"{BASE}/Questionnaire/nf21-adaptive-en|2.1.0"


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _ids(resources: list[dict[str, Any]]) -> set[str]:
    return {str(r["id"]) for r in resources}


@pytest.fixture
def scoring_client(app: FastAPI) -> Iterator[TestClient]:
    """A system client on a server that has the pack's Questionnaires (bokmål and English) published."""
    publish_questionnaires(app.state.service)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers.update(bearer(app))
        yield client


# --- 21: custom SearchParameters ---------------------------------------------------------------------


def _flag(patient: str, status: str, category: str) -> dict[str, Any]:
    flag: dict[str, Any] = {
        "resourceType": "Flag",
        "status": status,
        "category": [{"coding": [{"system": FLAG_CATEGORY, "code": category}]}],
        "code": {"text": f"{category} alert"},
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": "2026-03-02T09:00:00Z"},
    }
    if status == "inactive":
        flag["period"]["end"] = "2026-03-09T09:00:00Z"
    return flag


def test_flags_are_searched_by_status_and_category(system_client: TestClient) -> None:
    patient = create_patient(system_client)
    made = {}
    for key, status, category in [
        ("active", "active", "clinical"),
        ("resolved", "inactive", "clinical"),
        ("admin", "active", "administrative"),
    ]:
        created = system_client.post("/fhir/Flag", json=_flag(patient, status, category), headers=FHIR)
        assert created.status_code == 201, created.text
        made[key] = created.json()["id"]
    by = f"Flag?patient=Patient/{patient}"
    # Before, status was ignored: an EHR asking for the alerts in force got the resolved one too.
    assert _ids(search(system_client, f"{by}&status=active")) == {made["active"], made["admin"]}
    assert _ids(search(system_client, f"{by}&status=inactive")) == {made["resolved"]}
    clinical = f"{by}&status=active&category={FLAG_CATEGORY}|clinical"
    assert _ids(search(system_client, clinical)) == {made["active"]}
    assert _ids(search(system_client, f"{by}&status:not=active")) == {made["resolved"]}
    strict = system_client.get(f"/fhir/{by}&status=active", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 200, strict.text
    self_link = next(link["url"] for link in strict.json()["link"] if link["relation"] == "self")
    assert "status=active" in self_link


def test_an_unknown_parameter_is_refused_when_strict_and_left_out_of_the_self_link_otherwise(
    system_client: TestClient,
) -> None:
    patient = create_patient(system_client)
    query = f"/fhir/Flag?patient=Patient/{patient}&colour=red"
    strict = system_client.get(query, headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400
    outcome = strict.json()
    assert outcome["resourceType"] == "OperationOutcome" and "colour" in outcome["issue"][0]["diagnostics"]
    lenient = system_client.get(query)
    assert lenient.status_code == 200
    self_link = next(link["url"] for link in lenient.json()["link"] if link["relation"] == "self")
    assert f"patient=Patient/{patient}" in self_link and "colour" not in self_link


def test_the_capability_statement_lists_the_custom_parameters_with_their_definition(
    system_client: TestClient,
) -> None:
    statement = system_client.get("/fhir/metadata").json()
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    flag = {p["name"]: p for p in resources["Flag"]["searchParam"]}
    assert flag["status"]["definition"] == f"{BASE}/SearchParameter/Flag-status"
    assert flag["category"]["definition"] == f"{BASE}/SearchParameter/Flag-category"
    assert flag["status"]["type"] == flag["category"]["type"] == "token"
    task = {p["name"]: p for p in resources["Task"]["searchParam"]}
    assert task["code"]["definition"] == "http://hl7.org/fhir/SearchParameter/Task-code"


def _store_as_before(app: FastAPI, body: dict[str, Any]) -> str:
    """Store a resource as a server without the pack's parameters did: indexed by R4's alone."""
    service = app.state.service
    res_id = "flag-from-before"
    moment = now_ms()
    stamped = stamp_meta(body, res_id, 1, moment)
    with service.storage.write() as uow:
        uow.save(
            res_type="Flag",
            res_id=res_id,
            body=stamped,
            version=1,
            last_updated=moment,
            method="create",
            previous=None,
            index_rows=default_extractor().extract(stamped),
        )
    return res_id


def test_publishing_a_search_parameter_reindexes_what_was_stored_before(
    app: FastAPI, system_client: TestClient, tmp_path: Path
) -> None:
    patient = create_patient(system_client)
    old = _store_as_before(app, _flag(patient, "active", "clinical"))
    by_status = f"Flag?patient=Patient/{patient}&status=active"
    assert search(system_client, by_status) == []  # stored, but not indexed by status
    pack = tmp_path / "pack"
    (pack / "profiles").mkdir(parents=True)
    for name in ("SearchParameter-Flag-status.json", "SearchParameter-Flag-category.json"):
        shutil.copy(ROOT / "profiles" / name, pack / "profiles" / name)

    report = publish_content(app.state.service, pack)
    assert sorted(report.created) == [
        f"{BASE}/SearchParameter/Flag-category|0.4.0",
        f"{BASE}/SearchParameter/Flag-status|0.4.0",
    ]
    assert report.reindexed == {"Flag": 1}
    assert _ids(search(system_client, by_status)) == {old}
    assert _ids(search(system_client, f"Flag?category={FLAG_CATEGORY}|clinical")) == {old}
    (published,) = search(system_client, f"SearchParameter?url={BASE}/SearchParameter/Flag-status")
    assert published["expression"] == "Flag.status"
    assert system_client.get(f"/fhir/Flag/{old}").json()["meta"]["versionId"] == "1"  # no new version
    # Published once: a restart reindexes nothing.
    again = publish_content(app.state.service, pack)
    assert again.reindexed == {} and len(again.unchanged) == 2


def test_the_reindex_command_indexes_what_was_stored_before(
    app: FastAPI,
    system_client: TestClient,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FHIR_NORSE_MODE", "development")
    patient = create_patient(system_client)
    old = _store_as_before(app, _flag(patient, "active", "clinical"))
    by_status = f"Flag?patient=Patient/{patient}&status=active"
    assert search(system_client, by_status) == []
    assert cli(["reindex", "--database-url", database_url]) == 0  # the pack's parameters: Flag
    assert capsys.readouterr().out.splitlines() == ["Flag: 1 reindexed"]
    assert _ids(search(system_client, by_status)) == {old}
    assert cli(["reindex", "--database-url", database_url, "--type", "Colour"]) == 2
    assert "Colour" in capsys.readouterr().err


def test_a_pack_parameter_that_redefines_an_r4_one_is_refused(tmp_path: Path) -> None:
    pack = tmp_path / "pack"
    (pack / "profiles").mkdir(parents=True)
    sp = _load(ROOT / "profiles" / "SearchParameter-Flag-status.json")
    sp |= {"id": "Flag-identifier", "url": f"{BASE}/SearchParameter/Flag-identifier", "code": "identifier"}
    (pack / "profiles" / "SearchParameter-Flag-identifier.json").write_text(json.dumps(sp), encoding="utf-8")
    with pytest.raises(ContentConflict, match=r"Flag\?identifier= is defined by R4 already"):
        search_registry(pack)
    problems = [str(p) for p in check_content(pack)]
    assert any("Flag?identifier= is defined by R4 already" in p for p in problems), problems
    # The server refuses to start on it rather than answer searches ambiguously.
    with pytest.raises(ContentConflict):
        create_app(Settings(database_url="sqlite://", content_dir=pack, mode="development"))


def test_an_urgent_alert_task_is_found_by_its_code(scoring_client: TestClient) -> None:
    patient = create_patient(scoring_client)
    urgent = response(NF21_STATIC, nf21_answers({"suicide": 6}), patient=patient)
    assert post_response(scoring_client, urgent).status_code == 201
    (task,) = search(scoring_client, f"Task?patient=Patient/{patient}&code={CS_ROM}|alert-review")
    assert task["priority"] == "urgent" and task["code"]["text"].startswith("Review alert")


# --- 23: the English forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["static", "adaptive"])
def test_the_english_form_has_the_items_and_codes_of_the_bokmal_one(kind: str) -> None:
    bokmal = _load(NF21_DIR / f"Questionnaire-nf21-{kind}.json")
    english = _load(NF21_DIR / f"Questionnaire-nf21-{kind}-en.json")
    assert english["language"] == "en" and bokmal["language"] == "nb"
    assert english["url"] == bokmal["url"] + "-en" and english["version"] == bokmal["version"]
    assert english["derivedFrom"] == [f"{bokmal['url']}|{bokmal['version']}"]

    def flat(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from flat(item.get("item", []))

    pairs = list(zip(flat(bokmal["item"]), flat(english["item"]), strict=True))
    for nb, en in pairs:
        assert (en["linkId"], en["type"], en.get("code")) == (nb["linkId"], nb["type"], nb.get("code"))
        assert [o["valueCoding"]["code"] for o in en.get("answerOption", [])] == [
            o["valueCoding"]["code"] for o in nb.get("answerOption", [])
        ]
        # What a form filler shows: the English wording itself, not a translation extension.
        translation = nb["_text"]["extension"][0]["extension"][1]["valueString"]
        assert en["text"] == translation and "_text" not in en
    sad = next(en for _, en in pairs if en["linkId"] == "sad-1")
    assert sad["answerOption"][0]["valueCoding"]["display"] == "Not true at all"


def test_content_check_refuses_an_english_form_that_asks_otherwise(tmp_path: Path) -> None:
    """Only the wording may differ: the English static form opening the sadness scale without its
    trigger would be scored by a mapping whose opening rule it does not follow."""
    for folder in ("questionnaires", "profiles", "mappings"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    rel = "questionnaires/nf21/Questionnaire-nf21-static-en.json"
    form = _load(tmp_path / rel)
    group = next(g for g in form["item"] if g["linkId"] == "group-sad")
    del group["enableWhen"], group["enableBehavior"]
    (tmp_path / rel).write_text(json.dumps(form, ensure_ascii=False), encoding="utf-8")
    assert [str(p) for p in check_content(tmp_path)] == [
        f"{rel}: item[group-sad]: differs from item 20 of questionnaires/nf21/Questionnaire-nf21-static.json "
        "(not only in wording)"
    ]


def _scores(client: TestClient, patient: str) -> dict[str, float]:
    return {
        o["code"]["coding"][0]["code"]: o["valueQuantity"]["value"]
        for o in search(client, f"Observation?subject=Patient/{patient}")
        if "valueQuantity" in o
    }


def _english(body: dict[str, Any]) -> dict[str, Any]:
    """The same answers as a filler of the English form sends them (English displays)."""
    english = _load(NF21_DIR / "Questionnaire-nf21-static-en.json")
    options = {
        (i["linkId"], o["valueCoding"]["code"]): o["valueCoding"]
        for g in english["item"]
        for i in g["item"]
        for o in i.get("answerOption", [])
    }
    out: dict[str, Any] = json.loads(json.dumps(body))
    out["questionnaire"] = STATIC_EN
    for group in out["item"]:
        for item in group["item"]:
            answer = item["answer"][0]["valueCoding"]
            item["answer"][0]["valueCoding"] = dict(options[(item["linkId"], answer["code"])])
    return out


def test_a_response_to_the_english_form_is_scored_by_the_same_mapping(scoring_client: TestClient) -> None:
    levels = {"sad": 6, "worry": 5, "suicide": 1}
    nb_patient, en_patient = create_patient(scoring_client), create_patient(scoring_client, family="Smith")
    bokmal = response(NF21_STATIC, nf21_answers(levels), patient=nb_patient)
    english = _english(response(NF21_STATIC, nf21_answers(levels), patient=en_patient))
    assert english["item"][0]["item"][0]["answer"][0]["valueCoding"]["display"] in {
        o["valueCoding"]["display"]
        for o in _load(NF21_DIR / "Questionnaire-nf21-static-en.json")["item"][0]["item"][0]["answerOption"]
    }
    assert post_response(scoring_client, bokmal).status_code == 201
    stored = post_response(scoring_client, english)
    assert stored.status_code == 201, stored.text
    assert not [i for i in stored.json().get("issue", []) if "not scored" in i.get("diagnostics", "")]
    nb_scores, en_scores = _scores(scoring_client, nb_patient), _scores(scoring_client, en_patient)
    assert en_scores == nb_scores and len(en_scores) > 10
    scored = next(
        o for o in search(scoring_client, f"Observation?subject=Patient/{en_patient}") if "valueQuantity" in o
    )
    (provenance,) = search(scoring_client, f"Provenance?target=Observation/{scored['id']}")
    questionnaires = {e["what"].get("display") for e in provenance["entity"]}
    mappings = {e["what"].get("identifier", {}).get("value") for e in provenance["entity"]}
    assert STATIC_EN in questionnaires and "nf21|2.1.0" in mappings


def test_the_english_adaptive_form_pages_in_english(scoring_client: TestClient) -> None:
    patient = create_patient(scoring_client)
    start = {
        "resourceType": "QuestionnaireResponse",
        "status": "in-progress",
        "subject": {"reference": f"Patient/{patient}"},
        "questionnaire": ADAPTIVE_EN,
    }
    got = scoring_client.post("/fhir/Questionnaire/$next-question", json=start, headers=FHIR)
    assert got.status_code == 200, got.text
    contained = got.json()["contained"][0]
    assert contained["language"] == "en" and contained["derivedFrom"] == [ADAPTIVE_EN]
    page = contained["item"][0]
    assert page["text"] == "Opening questions"
    assert page["item"][0]["text"] == "I feel sad and low."


def test_the_tailored_english_form_is_answered_and_scored(scoring_client: TestClient) -> None:
    patient = create_patient(scoring_client)
    got = scoring_client.get(f"/fhir/Patient/{patient}/$tailored-form?questionnaire={STATIC_EN}")
    assert got.status_code == 200, got.text
    form = got.json()
    assert form["language"] == "en" and form["derivedFrom"] == [STATIC_EN]
    answers = nf21_answers({"sad": 6})
    body = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{form['url']}|{form['version']}",
        "status": "completed",
        "subject": {"reference": f"Patient/{patient}"},
        "authored": "2026-03-02T09:00:00Z",
        "item": answers_to(form, answers),
    }
    assert post_response(scoring_client, body).status_code == 201
    assert _scores(scoring_client, patient)["sad"] == 6


# --- 25: snapshots ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_profile_has_a_snapshot_that_carries_its_differential(path: Path) -> None:
    sd = _load(path)
    assert sd["snapshot"]["element"][0]["id"] == sd["type"]
    assert differential_problems(sd) == []


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_the_committed_snapshot_is_a_fresh_generation(path: Path) -> None:
    sd = _load(path)
    assert sd["snapshot"] == generate_snapshot(sd), "run `python -m tools.snapshots`"


def test_a_snapshot_holds_the_whole_base_type_with_the_constraints_merged() -> None:
    sd = _load(ROOT / "profiles" / "StructureDefinition-rom-alliance.json")
    elements = sd["snapshot"]["element"]
    ids = [e["id"] for e in elements]
    by_id = {e["id"]: e for e in elements}
    # Every R4 element of Observation, in the R4 order.
    assert (
        ids.index("Observation.status") < ids.index("Observation.code") < ids.index("Observation.component")
    )
    assert "Observation.bodySite" in by_id and by_id["Observation.bodySite"]["min"] == 0
    # The profile's invariant joins the base ones on the root.
    assert {"dom-2", "rom-status-1"} <= {c["key"] for c in by_id["Observation"]["constraint"]}
    # value[x] restricted to Quantity unfolds Quantity's elements, constrained.
    assert by_id["Observation.value[x].system"]["min"] == 1
    assert by_id["Observation.value[x].comparator"]["base"]["path"] == "Quantity.comparator"
    # A slice: a copy of the unconstrained component after the component's own children.
    assert ids.index("Observation.component.referenceRange") < ids.index("Observation.component:percentOfMax")
    percent = by_id["Observation.component:percentOfMax"]
    assert percent["sliceName"] == "percentOfMax" and "slicing" not in percent
    assert by_id["Observation.component:percentOfMax.value[x].code"]["fixedCode"] == "%"
    assert "slicing" in by_id["Observation.component"]


def test_the_generator_refuses_an_element_the_type_does_not_have() -> None:
    sd = _load(ROOT / "profiles" / "StructureDefinition-rom-alert-flag.json")
    sd["differential"]["element"].append({"id": "Flag.colour", "path": "Flag.colour", "min": 1})
    with pytest.raises(SnapshotError, match=r"Flag\.colour"):
        generate_snapshot(sd)


def test_content_check_finds_a_snapshot_that_drifted_from_its_differential(tmp_path: Path) -> None:
    for folder in ("questionnaires", "profiles", "mappings"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    path = tmp_path / "profiles" / "StructureDefinition-rom-alert-flag.json"
    sd = _load(path)
    period = next(e for e in sd["snapshot"]["element"] if e["id"] == "Flag.period")
    period["min"] = 0
    path.write_text(json.dumps(sd, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    problems = [str(p) for p in check_content(tmp_path)]
    assert problems == [
        "profiles/StructureDefinition-rom-alert-flag.json: snapshot: Flag.period: the snapshot's min differs "
        "from the differential",
        "profiles/StructureDefinition-rom-alert-flag.json: snapshot: is not the generated one: run "
        "`python -m tools.snapshots`",
    ]
