"""The feedback report's facts (fhir_norse/rom/report.py) on Sonja's record, scored for real.

Sonja's 13 reports (tests/rom/test_case_studies.py) are POSTed once per module and database; the report
is then assembled with a practitioner's own repository (a user/ token's reach) and checked against the
story: the alliance bars at report 3 and the previous report, the "more feelings" arrow at report 6,
which administrations are trigger-only, the elevated range against the mapping, stagnation, alerts, and
the caseload's order. Out of reach is NotFound, exactly as absent.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.auth.caller import Caller
from fhir_norse.config import Settings
from fhir_norse.outcomes import NotFound
from fhir_norse.rom.report import PatientReport, assemble_report, caseload
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from tests.intake_support import (
    FHIR,
    NF21_STATIC,
    create_patient,
    nf21,
    nf21_answers,
    post_response,
    response,
)
from tests.rom.test_case_studies import SONJA, Run, run
from tests.tokens import bearer

START = date(2025, 1, 6)
NOW = datetime(2025, 9, 1, 12, 0, tzinfo=UTC)


@dataclass
class Record:
    app: FastAPI
    sonja: Run
    stagnant: str  # a patient whose scales stagnate (no alert)
    quiet: str  # one administration, nothing flagged, a newer answer than the stagnant one
    silent: str  # never answered, an overdue questionnaire Task
    outsider: str  # not in the care team
    practitioner: str
    stranger: str  # a practitioner in no care team

    @property
    def service(self) -> FhirService:
        service: FhirService = self.app.state.service
        return service

    def report(self, caller: Caller, patient: str, **kwargs: object) -> PatientReport:
        ctx = RequestContext(caller=caller, base_url="http://testserver/fhir")
        with self.service.session(ctx, read_only=True) as repo:
            return assemble_report(repo, patient, **kwargs)  # type: ignore[arg-type]

    def clinician(self, practitioner: str | None = None) -> Caller:
        return Caller(
            client_id="report-test",
            scopes=frozenset({"user/*.rs"}),
            practitioner=practitioner or self.practitioner,
        )

    def report_id(self, number: int) -> str:
        """The DiagnosticReport of Sonja's report ``number``."""
        report = self.report(self.clinician(), self.sonja.patient)
        return next(rid for n, rid, _ in report.administrations if n == number)


def _truncate(url: str) -> None:
    """Empty the session's PostgreSQL schema as tests/conftest.py's database_url does."""
    from tests.conftest import _ALL_TABLES

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in _ALL_TABLES)
        conn.exec_driver_sql(f"TRUNCATE {names}, auth_signing_key RESTART IDENTITY CASCADE")
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
        conn.exec_driver_sql(f'INSERT INTO auth_signing_key SELECT * FROM "{schema}_keys".auth_signing_key')
    engine.dispose()


def _post(client: TestClient, patient: str, when: str, levels: dict[str, int], alliance: int) -> None:
    body = response(NF21_STATIC, nf21_answers(levels, alliance=alliance), patient=patient, authored=when)
    answer = post_response(client, body)
    assert answer.status_code == 201, answer.text


def _created(client: TestClient, path: str, body: dict[str, object]) -> str:
    answer = client.post(f"/fhir/{path}", json=body, headers=FHIR)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def record(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Record]:
    """Sonja and four other patients, a practitioner whose care team holds all but one, built once."""
    from tests.intake_support import publish_questionnaires

    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("report") / "fhir.sqlite3"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("pg_schema_url")
        _truncate(url)
    settings = Settings(
        database_url=url, base_url="http://testserver/fhir", mode="development", publish_content=False
    )
    app = create_app(settings)
    publish_questionnaires(app.state.service)
    try:
        with TestClient(app, headers=bearer(app)) as client:
            sonja = run(client, "Sonja", SONJA, START, 18)
            stagnant = create_patient(client, "Stille")
            # Worry asked in full at 6 four times: in its elevated range without change, so it stagnates
            # from the fourth administration. Level 2 elsewhere also leaves eating, suicidality and
            # substance use (elevated from 1.5) "stagnating" on their triggers alone; the caseload leaves
            # such closed scales out. The alliance is high.
            for k in range(4):
                _post(client, stagnant, f"2025-0{k + 2}-03T10:00:00+01:00", {"worry": 6}, 7)
            quiet = create_patient(client, "Rolig")
            _post(client, quiet, "2025-08-20T10:00:00+02:00", {}, 7)
            silent = create_patient(client, "Taus")
            _created(
                client,
                "Task",
                {
                    "resourceType": "Task",
                    "status": "requested",
                    "intent": "order",
                    "for": {"reference": f"Patient/{silent}"},
                    "restriction": {
                        "period": {"start": "2025-08-01T00:00:00Z", "end": "2025-08-08T00:00:00Z"}
                    },
                },
            )
            # An urgent review Task raised two days before NOW and still open: overdue; one raised an
            # hour before: open, not overdue.
            for hours in (48, 1):
                _created(
                    client,
                    "Task",
                    {
                        "resourceType": "Task",
                        "status": "requested",
                        "intent": "order",
                        "priority": "urgent",
                        "for": {"reference": f"Patient/{quiet}"},
                        "authoredOn": (NOW - timedelta(hours=hours)).isoformat(),
                    },
                )
            outsider = create_patient(client, "Utenfor")
            _post(client, outsider, "2025-08-21T10:00:00+02:00", {}, 2)
            practitioner = _created(client, "Practitioner", {"resourceType": "Practitioner"})
            stranger = _created(client, "Practitioner", {"resourceType": "Practitioner"})
            for patient in (sonja.patient, stagnant, quiet, silent):
                _created(
                    client,
                    "CareTeam",
                    {
                        "resourceType": "CareTeam",
                        "status": "active",
                        "subject": {"reference": f"Patient/{patient}"},
                        "participant": [{"member": {"reference": f"Practitioner/{practitioner}"}}],
                    },
                )
        yield Record(app, sonja, stagnant, quiet, silent, outsider, practitioner, stranger)
    finally:
        app.state.service.storage.engine.dispose()


def test_header_alerts_and_summary_at_the_newest(record: Record) -> None:
    report = record.report(record.clinician(), record.sonja.patient)
    h = report.header
    assert (h.number, h.of, h.date) == (13, 13, date(2025, 8, 10))
    assert h.patient_name == "Sonja"
    assert h.questionnaire == NF21_STATIC
    assert h.context == "weekly"
    assert [n for n, _, _ in report.administrations] == list(range(1, 14))
    # Deterioration of sad affect and hopelessness at report 13: active, no Task (not urgent)
    assert {(a.kind, a.scale, a.status, a.since_number, a.task_status) for a in report.alerts} == {
        ("deterioration", "sad", "active", 13, None),
        ("deterioration", "hopeless", "active", 13, None),
    }
    assert report.suicide_prefer_not is False
    first = {(c.code, c.kind) for c in report.change.since_first}
    assert {("sad", "deterioration"), ("hopeless", "deterioration"), ("control", "deterioration")} <= first
    assert {(c.code, c.kind) for c in report.change.since_previous} == {
        ("sad", "deterioration"),
        ("hopeless", "deterioration"),
    }
    # Stagnation named: the three elevated scales of the story and the three at level 2 (issue 13)
    stagnating = {s.en for s in report.change.stagnating}  # type: ignore[union-attr]
    assert stagnating == {
        "Internal Avoidance",
        "Worry",
        "Need for Control",
        "Eating Problems",
        "Suicidality",
        "Substance Use",
    }


def test_alliance_at_report_3_and_the_previous(record: Record) -> None:
    report = record.report(record.clinician(), record.sonja.patient, administration=record.report_id(3))
    assert report.header.number == 3
    bars = {b.code: b for b in report.alliance.bars}
    assert [b.code for b in report.alliance.bars] == ["task", "goal", "bond", "total"]
    assert {c: b.percent for c, b in bars.items()} == pytest.approx(
        {"task": 200 / 7, "goal": 300 / 7, "bond": 50.0, "total": 300 / 7}
    )
    # report 2: goal 5, bond 5 + 6, task 5
    assert {c: b.previous for c, b in bars.items()} == pytest.approx(
        {"task": 500 / 7, "goal": 500 / 7, "bond": 1100 / 14, "total": 75.0}
    )
    assert report.alliance.previous_number == 2
    assert report.alliance.rupture and report.alliance.below_floor and report.alliance.reliable_drop
    # The rupture Flag was in effect at report 3 and has cleared (at 9) since
    (rupture,) = [a for a in report.alerts if a.kind == "alliance-rupture"]
    assert (rupture.since_number, rupture.status) == (3, "inactive")
    # As of report 3 nothing of report 4 on is drawn
    for group in report.domains:
        for trajectory in group.trajectories:
            assert [p.number for p in trajectory.points] == [1, 2, 3]


def test_preferences_arrows_and_last_change(record: Record) -> None:
    at_6 = record.report(record.clinician(), record.sonja.patient, administration=record.report_id(6))
    prefs = {p.link_id: p for p in at_6.preferences}
    assert len(prefs) == 5
    assert (prefs["pref-feelings"].direction, prefs["pref-feelings"].changed_at) == ("more", 6)
    assert prefs["pref-feelings"].changed_on == date(2025, 4, 6)
    for link_id in ("pref-techniques", "pref-style", "pref-feelings-thoughts", "pref-relationship"):
        assert (prefs[link_id].direction, prefs[link_id].changed_at) == ("as-now", 1)
    newest = {p.link_id: p for p in record.report(record.clinician(), record.sonja.patient).preferences}
    assert (newest["pref-feelings"].direction, newest["pref-feelings"].changed_at) == ("as-now", 8)
    assert newest["pref-feelings"].text.en == "Focus on my feelings"


def test_trajectories_trigger_only_elevated_range_and_stagnation(record: Record) -> None:
    report = record.report(record.clinician(), record.sonja.patient)
    mapping = nf21()
    by_code = {t.code: t for g in report.domains for t in g.trajectories}
    trigger_only = {code: [p.number for p in t.points if not p.full] for code, t in by_code.items()}
    assert trigger_only["worry"] == [1]
    assert trigger_only["control"] == [1, 2, 9]
    assert trigger_only["sad"] == list(range(1, 13))
    assert trigger_only["internal"] == []
    for code, trajectory in by_code.items():
        scale = mapping.scale(code)
        assert (trajectory.elevated_low, trajectory.elevated_high) == (scale.elevated_low, 7), code
        assert trajectory.norm_mean == scale.norms.mean
        assert trajectory.domain == scale.domain
    # Asked in full at least once: Sonja's five scales; the other 14 scored ones (by their trigger) only
    # on request (substance recovery has no trigger of its own and was never asked: no score at all)
    assert set(by_code) == {"sad", "hopeless", "worry", "internal", "control"}
    assert [g.code for g in report.domains] == ["symptom-expression", "problem-maintaining"]
    assert report.hidden_scales == 14
    assert {c for c, t in by_code.items() if t.stagnation} == {"internal", "worry", "control"}
    assert by_code["sad"].points[-1].change == "deterioration"
    everything = record.report(record.clinician(), record.sonja.patient, all_scales=True)
    assert sum(len(g.trajectories) for g in everything.domains) == 19
    assert everything.hidden_scales == 0
    # The latest answers of the scales asked in full, item by item, with the form's texts
    open_scales = {o.code: o for o in report.open_scales}
    assert set(open_scales) == {"sad", "hopeless", "worry", "internal", "control"}
    sad = open_scales["sad"]
    assert [(i.link_id, i.code) for i in sad.items] == [("sad-1", "7"), ("sad-2", "7"), ("sad-3", "7")]
    assert sad.items[0].text.en == "I feel sad and low."
    assert sad.items[0].answer is not None and sad.items[0].answer.nb != sad.items[0].answer.en
    assert [s.link_id for s in report.single_items][:1] == ["single-sleep"]


def test_out_of_reach_is_not_found(record: Record) -> None:
    with pytest.raises(NotFound):
        record.report(record.clinician(record.stranger), record.sonja.patient)
    with pytest.raises(NotFound):
        record.report(record.clinician(), record.outsider)
    other_patient = Caller(client_id="app", scopes=frozenset({"patient/*.rs"}), patient=record.quiet)
    with pytest.raises(NotFound):
        record.report(other_patient, record.sonja.patient)
    with pytest.raises(NotFound):
        record.report(record.clinician(), record.silent)  # reachable, but never answered
    with pytest.raises(NotFound):
        record.report(record.clinician(), record.sonja.patient, administration="not-one-of-hers")


def test_caseload_order(record: Record) -> None:
    ctx = RequestContext(caller=record.clinician(), base_url="http://testserver/fhir")
    with record.service.session(ctx, read_only=True) as repo:
        rows = caseload(repo, record.practitioner, NOW)
    assert [r.patient_id for r in rows] == [
        record.sonja.patient,
        record.stagnant,
        record.quiet,
        record.silent,
    ]
    sonja, stagnant, quiet, silent = rows
    assert sonja.open_alerts == ("deterioration",)
    assert {s.en for s in sonja.deteriorating} == {"Sad Affect", "Hopelessness", "Need for Control"}
    assert sonja.last_response == date(2025, 8, 10)
    assert {s.en for s in stagnant.stagnating} == {"Worry"}
    assert stagnant.open_alerts == () and quiet.open_alerts == () and quiet.stagnating == ()
    assert quiet.last_response == date(2025, 8, 20)
    assert (quiet.open_tasks, quiet.overdue_tasks) == (2, 1)
    assert (silent.last_response, silent.open_tasks, silent.overdue_tasks) == (None, 1, 1)
    with record.service.session(
        RequestContext(caller=record.clinician(record.stranger), base_url="http://testserver/fhir"),
        read_only=True,
    ) as repo:
        assert caseload(repo, record.stranger, NOW) == []
