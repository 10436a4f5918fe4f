"""The demo clinic (``fhir-norse demo``, ``FHIR_NORSE_DEMO_ON_EMPTY``) on SQLite and PostgreSQL.

Loaded once per database (module fixture): first the start-up hook is asked on the empty database in
production mode and with the setting off (it must do nothing), then it loads the clinic; the tests read
what the server made of it, and the command run last must find everything as it was.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from fhir_norse.auth.caller import Caller
from fhir_norse.cli import main
from fhir_norse.compose import build_service, load_demo_if_empty
from fhir_norse.config import Settings
from fhir_norse.outcomes import NotFound
from fhir_norse.rom.demo.clinic import HPR_SYSTEM, NATIONAL_ID_SYSTEM
from fhir_norse.rom.demo.scenarios import case_study, load_scenarios
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.repository import loads
from fhir_norse.server.search.typed import Where
from fhir_norse.store.tables import METADATA
from tests.intake_support import publish_questionnaires

BASE = "http://fhir-norse.org/fhir"
SITE = "http://127.0.0.1:8080"  # the default FHIR base (host, port) without /fhir
CS_ROM = f"{BASE}/CodeSystem/rom-codes"
SDC_TASK_CODES = "http://hl7.org/fhir/uv/sdc/CodeSystem/temp"
ALERT_KEY = f"{BASE}/alert-key"
TEST_DATA = ("http://terminology.hl7.org/CodeSystem/v3-ActReason", "HTEST")
PASSPHRASE = "demo-test-passphrase-not-a-default"  # production settings need a real-looking one
KEYS = "auth_signing_key"


@dataclass
class Loaded:
    url: str
    service: FhirService
    refused: dict[str, bool]  # the hook's answer on the empty database, by reason
    patients_after_refusals: int
    loaded: bool
    log: list[str]


class _Lines(logging.Handler):
    """The messages logged to it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _emptied_postgres(url: str) -> None:
    """The session's PostgreSQL schema without rows (the signing key restored), as tests/conftest.py
    empties it between tests."""
    tables = ", ".join(t.name for t in METADATA.sorted_tables if t.name != KEYS)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {tables}, {KEYS} RESTART IDENTITY CASCADE")
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
        conn.exec_driver_sql(f'INSERT INTO {KEYS} SELECT * FROM "{schema}_keys".{KEYS}')
    engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path_factory.mktemp("demo") / "demo.sqlite3"
        shutil.copy(template, path)
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("pg_schema_url")
        _emptied_postgres(url)
    settings = Settings(database_url=url, mode="development", publish_content=False, demo_on_empty=True)
    service = build_service(settings)
    publish_questionnaires(service)
    production = Settings(
        database_url=url,
        mode="production",
        key_passphrase=SecretStr(PASSPHRASE),
        publish_content=False,
        demo_on_empty=True,
    )
    refused = {
        "production": load_demo_if_empty(production, service),
        "setting off": load_demo_if_empty(settings.model_copy(update={"demo_on_empty": False}), service),
    }
    patients_after_refusals = len(_find(service, "Patient"))
    handler = _Lines()
    logger = logging.getLogger("fhir_norse.compose")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        loaded = load_demo_if_empty(settings, service)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    yield Loaded(url, service, refused, patients_after_refusals, loaded, handler.lines)
    service.storage.engine.dispose()


# ---------------------------------------------------------------------- reading back


def _operator() -> RequestContext:
    return RequestContext(caller=Caller.operator(), base_url=f"{SITE}/fhir")


def _find(
    service: FhirService, res_type: str, caller: Caller | None = None, **params: Any
) -> list[dict[str, Any]]:
    """Current resources of ``res_type`` with ``references``/``tokens`` (Where) the caller reaches."""
    ctx = _operator() if caller is None else RequestContext(caller=caller, base_url=f"{SITE}/fhir")
    with service.session(ctx, read_only=True) as repo:
        found = repo.find(Where(res_type, **params), 1000)
    return [{**loads(s.body_text), "id": s.res_id} for s in found]


def _patient_id(service: FhirService, national_id: str) -> str:
    (patient,) = _find(service, "Patient", tokens={"identifier": (NATIONAL_ID_SYSTEM, national_id)})
    return str(patient["id"])


def _practitioner_id(service: FhirService, hpr: str) -> str:
    (practitioner,) = _find(service, "Practitioner", tokens={"identifier": (HPR_SYSTEM, hpr)})
    return str(practitioner["id"])


def _stored(service: FhirService) -> dict[str, int]:
    """Versions stored per resource type (any write adds one)."""
    with service.storage.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT res_type, COUNT(*) FROM resource_history GROUP BY res_type"))
        return {str(t): int(n) for t, n in rows}


def _has_code(concept: dict[str, Any], system: str, code: str) -> bool:
    return any(c.get("system") == system and c.get("code") == code for c in concept.get("coding", []))


# ---------------------------------------------------------------------- the start-up hook


def test_the_hook_loads_only_an_empty_development_database(demo: Loaded) -> None:
    assert demo.refused == {"production": False, "setting off": False}
    assert demo.patients_after_refusals == 0
    assert demo.loaded is True
    assert len(_find(demo.service, "Patient")) == 5
    # A database with a Patient is left alone, even with the setting on in development mode.
    before = _stored(demo.service)
    settings = Settings(database_url=demo.url, mode="development", publish_content=False, demo_on_empty=True)
    assert load_demo_if_empty(settings, demo.service) is False
    assert _stored(demo.service) == before


def test_the_load_says_what_it_loaded_and_where_to_look(demo: Loaded) -> None:
    sonja = _patient_id(demo.service, case_study("sonja").national_id)
    harald = _patient_id(demo.service, case_study("harald").national_id)
    text = "\n".join(demo.log)
    assert "Demo clinic loaded: " in text
    assert "5 Patient" in text and "71 QuestionnaireResponse" in text
    assert f"{SITE}/caseload" in demo.log[-3]
    assert demo.log[-2].endswith(f"{SITE}/report/Patient/{sonja}")
    assert demo.log[-1].endswith(f"{SITE}/report/Patient/{harald}")
    assert f"Patient/{harald}: 33 reports" in text
    assert "Kari Berg: Practitioner/" in text and "HPR 999900001" in text
    # Never a national identity number.
    for story in (*load_scenarios("case-studies.yaml"), *load_scenarios("clinic.yaml")):
        assert story.national_id not in text


# ---------------------------------------------------------------------- what the server made of it


@pytest.mark.parametrize(("key", "reports", "span"), [("sonja", 13, 238), ("harald", 33, 574)])
def test_the_case_study_patients_answered_their_reports(
    demo: Loaded, key: str, reports: int, span: int
) -> None:
    story = case_study(key)
    patient = _patient_id(demo.service, story.national_id)
    (body,) = _find(demo.service, "Patient", tokens={"identifier": (NATIONAL_ID_SYSTEM, story.national_id)})
    assert body["name"][0] == {"use": "official", "family": story.family, "given": [story.given]}
    assert body["birthDate"] == story.birth_date.isoformat()
    assert any(_has_code({"coding": [label]}, *TEST_DATA) for label in body["meta"]["security"])
    ref = f"Patient/{patient}"
    diagnostic = _find(demo.service, "DiagnosticReport", references={"subject": ref})
    responses = _find(demo.service, "QuestionnaireResponse", references={"subject": ref})
    assert len(diagnostic) == len(responses) == reports
    # Spread as the story's days, ending a few days before the load (the caseload's "last response").
    days = sorted(date.fromisoformat(str(r["authored"])[:10]) for r in responses)
    assert (days[-1] - days[0]).days == span
    assert timedelta(days=1) <= datetime.now(UTC).date() - days[-1] <= timedelta(days=story.ends_days_ago + 1)
    # Scored as the story goes: Harald's rupture is active at the end, Sonja's deterioration alerts too.
    active = {
        str(i["value"])
        for flag in _find(demo.service, "Flag", references={"subject": ref}, tokens={"status": "active"})
        for i in flag["identifier"]
        if i["system"] == ALERT_KEY
    }
    wanted = {"sonja": {"deterioration/sad", "deterioration/hopeless"}, "harald": {"alliance-rupture"}}
    assert active == wanted[key]


def test_kari_bergs_care_teams_reach_the_demo_patients_and_the_other_clinician_none(demo: Loaded) -> None:
    kari = _practitioner_id(demo.service, "999900001")
    jonas = _practitioner_id(demo.service, "999900002")
    patients = {str(p["id"]) for p in _find(demo.service, "Patient")}
    teams = _find(demo.service, "CareTeam", references={"participant": f"Practitioner/{kari}"})
    subjects = {str(t["subject"]["reference"]).removeprefix("Patient/") for t in teams}
    sonja = _patient_id(demo.service, case_study("sonja").national_id)
    harald = _patient_id(demo.service, case_study("harald").national_id)
    assert subjects == patients and {sonja, harald} <= subjects
    episodes = _find(demo.service, "EpisodeOfCare", references={"care-manager": f"Practitioner/{kari}"})
    assert {str(e["patient"]["reference"]).removeprefix("Patient/") for e in episodes} == patients
    # What a clinician's user/ access reaches through them: Kari every demo patient, Jonas none.
    scopes = frozenset({"user/*.rs"})
    as_kari = Caller(client_id="demo-test", scopes=scopes, practitioner=kari, user=f"Practitioner/{kari}")
    as_jonas = Caller(client_id="demo-test", scopes=scopes, practitioner=jonas, user=f"Practitioner/{jonas}")
    assert {str(p["id"]) for p in _find(demo.service, "Patient", as_kari)} == patients
    assert (
        len(_find(demo.service, "DiagnosticReport", as_kari, references={"subject": f"Patient/{sonja}"}))
        == 13
    )
    assert _find(demo.service, "Patient", as_jonas) == []
    ctx = RequestContext(caller=as_jonas, base_url=f"{SITE}/fhir")
    with pytest.raises(NotFound):
        demo.service.read(ctx, "Patient", harald)


def test_the_cohort_group_lists_the_patients_in_treatment(demo: Loaded) -> None:
    """The Group a registry's Bulk Data export starts from: every demo patient, managed by the clinic."""
    (group,) = _find(demo.service, "Group")
    patients = {str(p["id"]) for p in _find(demo.service, "Patient")}
    assert {str(m["entity"]["reference"]).removeprefix("Patient/") for m in group["member"]} == patients
    assert group["actual"] is True and group["type"] == "person" and group["quantity"] == len(patients)
    (organization,) = _find(demo.service, "Organization")
    assert group["managingEntity"] == {"reference": f"Organization/{organization['id']}"}
    assert f"cohort: Group/{group['id']} (Bulk Data: {SITE}/fhir/Group/{group['id']}/$export)" in "\n".join(
        demo.log
    )


def test_open_tasks_an_overdue_questionnaire_and_an_alert_to_review(demo: Loaded) -> None:
    kari = _practitioner_id(demo.service, "999900001")
    per = _patient_id(demo.service, "30918515158")
    eva = _patient_id(demo.service, "19866342264")
    now = datetime.now(UTC)
    # Per Dahl was asked to answer four days ago and has not: open, its window open, a day past its start.
    (asked,) = _find(demo.service, "Task", references={"patient": f"Patient/{per}"})
    assert asked["status"] == "requested"
    assert _has_code(asked["code"], SDC_TASK_CODES, "complete-questionnaire")
    assert asked["input"][0]["valueCanonical"] == f"{BASE}/Questionnaire/nf21-adaptive|2.1.0"
    assert asked["requester"] == {"reference": f"Practitioner/{kari}"}
    window = asked["restriction"]["period"]
    start = datetime.fromisoformat(window["start"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(window["end"].replace("Z", "+00:00"))
    assert start < now - timedelta(days=1) and now < end
    # ... and at his last report he preferred not to answer on suicidality: an alert, no Task.
    flags = _find(demo.service, "Flag", references={"subject": f"Patient/{per}"}, tokens={"status": "active"})
    assert [i["value"] for f in flags for i in f["identifier"] if i["system"] == ALERT_KEY] == [
        "prefer-not-suicide/suicide"
    ]
    # Eva Holm's last report opened the suicidality scale: an urgent Flag and Kari Berg's Task to review it.
    (review,) = _find(demo.service, "Task", references={"patient": f"Patient/{eva}"})
    assert review["status"] == "requested" and review["priority"] == "urgent"
    assert _has_code(review["code"], CS_ROM, "alert-review")
    assert review["owner"] == {"reference": f"Practitioner/{kari}"}
    flag_id = str(review["focus"]["reference"]).removeprefix("Flag/")
    (flag,) = [
        f for f in _find(demo.service, "Flag", references={"subject": f"Patient/{eva}"}) if f["id"] == flag_id
    ]
    assert flag["status"] == "active"
    assert any(i["value"] == "suicide-risk/suicide" for i in flag["identifier"] if i["system"] == ALERT_KEY)


# ---------------------------------------------------------------------- the command


def test_the_command_again_changes_nothing_and_says_so(demo: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_NORSE_MODE", "development")
    monkeypatch.setenv("FHIR_NORSE_PUBLISH_CONTENT", "false")
    monkeypatch.delenv("FHIR_NORSE_BASE_URL", raising=False)
    before = _stored(demo.service)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--database-url", demo.url])
    assert code == 0, out.getvalue()
    assert _stored(demo.service) == before
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("The demo clinic is already loaded: nothing changed (")
    sonja = _patient_id(demo.service, case_study("sonja").national_id)
    assert f"  Sonja Nilsen: {SITE}/report/Patient/{sonja}" in lines
    assert f"  caseload: {SITE}/caseload" in lines


def test_the_command_refuses_a_production_database(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FHIR_NORSE_MODE", "production")
    monkeypatch.setenv("FHIR_NORSE_KEY_PASSPHRASE", PASSPHRASE)
    assert main(["demo", "--database-url", "sqlite:////nonexistent/never-opened.sqlite3"]) == 2
    assert "development database only" in capsys.readouterr().err
