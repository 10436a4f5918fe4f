"""``fhir-norse invite`` (SQLite and PostgreSQL): the Task, its invitation sent at once (or at the end of
quiet hours), the short names of the published forms, and the refusals."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from fhir_norse.cli import main
from fhir_norse.cli.invite import InviteError, invite, resolve_questionnaire
from fhir_norse.rom.administrations import task_questionnaire, task_window
from tests.intake_support import publish_questionnaires
from tests.rom.journey_support import OPERATOR, EnvFactory, RecordingTransport, env_factory, patient

BASE = "http://fhir-norse.org/fhir/Questionnaire"


@pytest.fixture
def make_env(database_url: str) -> Iterator[EnvFactory]:
    yield from env_factory(database_url)


def test_invite_command_sends_the_link_now(
    database_url: str,
    make_env: EnvFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = make_env()
    publish_questionnaires(env.service)
    pid = env.create("Patient", patient())
    for name, value in {
        "FHIR_NORSE_MODE": "development",
        "FHIR_NORSE_PUBLISH_CONTENT": "false",
        "FHIR_NORSE_MESSAGING_QUIET_HOURS": "",
        "FHIR_NORSE_DB_STATISTICS_INTERVAL_S": "0",
        "FHIR_NORSE_PATIENT_BASE_URL": "https://survey.example.no",
    }.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO, logger="fhir_norse.messages"):
        code = main(
            [
                "invite",
                "--database-url",
                database_url,
                "--patient",
                pid,
                "--questionnaire",
                "phq9",
                "--hours",
                "24",
            ]
        )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "channel: sms" in out
    task_line = out.splitlines()[0]
    task_id = task_line.split()[0].removeprefix("Task/")
    task = env.read("Task", task_id)
    assert task_questionnaire(task) == f"{BASE}/phq9|1.0.0"
    start, end = task_window(task)
    assert start is not None and end is not None and end - start == timedelta(hours=24)
    (comm,) = env.bodies("Communication", subject=f"Patient/{pid}")
    assert f"Communication/{comm['id']}: in-progress" in out
    # The development transport wrote the message, with its link, to the log (and only there).
    assert any("https://survey.example.no/p/" in r.getMessage() for r in caplog.records)


def test_short_names_resolve_to_the_newest_published_form(make_env: EnvFactory) -> None:
    env = make_env()
    publish_questionnaires(env.service)
    with env.service.session(OPERATOR) as repo:
        assert resolve_questionnaire(repo, "nf21") == f"{BASE}/nf21-adaptive|2.2.0"
        assert resolve_questionnaire(repo, "gad7") == f"{BASE}/gad7|1.0.0"
        assert resolve_questionnaire(repo, f"{BASE}/nf21-static|2.1.0") == f"{BASE}/nf21-static|2.1.0"
        with pytest.raises(InviteError):
            resolve_questionnaire(repo, f"{BASE}/nf21-static|9.9.9")
        with pytest.raises(InviteError):
            resolve_questionnaire(repo, "no-such-form")


def test_inside_quiet_hours_the_command_says_when_it_goes(make_env: EnvFactory) -> None:
    env = make_env(messaging_quiet_hours="21:00-08:00")
    publish_questionnaires(env.service)
    pid = env.create("Patient", patient(email="kari@example.no"))
    night = datetime(2026, 3, 2, 22, 0, tzinfo=UTC)  # 23:00 in Oslo
    done = invite(
        env.service,
        env.journey,
        env.settings,
        patient_id=pid,
        questionnaire="nf21",
        hours=72,
        channel="email",
        now=night,
    )
    assert done["channel"] == "email"
    (result,) = done["results"]
    assert result.outcome == "deferred" and result.due_at == datetime(2026, 3, 3, 7, 0, tzinfo=UTC)
    email = env.transports["email"]
    assert isinstance(email, RecordingTransport) and email.sent == []
    # The server's scheduler sends it when the quiet hours end.
    env.clock.set(datetime(2026, 3, 3, 7, 0, tzinfo=UTC))
    env.journey.scheduler.tick()
    assert len(email.sent) == 1


def test_refusals(make_env: EnvFactory) -> None:
    env = make_env()
    publish_questionnaires(env.service)
    reachable = env.create("Patient", patient())
    unreachable = env.create("Patient", patient(mobile=None))
    now = env.clock.now
    with pytest.raises(InviteError, match="not known") as unknown:
        invite(
            env.service,
            env.journey,
            env.settings,
            patient_id="nobody",
            questionnaire="phq9",
            hours=72,
            channel=None,
            now=now,
        )
    assert unknown.value.code == 2
    with pytest.raises(InviteError, match="no active email contact") as no_email:
        invite(
            env.service,
            env.journey,
            env.settings,
            patient_id=reachable,
            questionnaire="phq9",
            hours=72,
            channel="email",
            now=now,
        )
    assert no_email.value.code == 1
    with pytest.raises(InviteError):
        invite(
            env.service,
            env.journey,
            env.settings,
            patient_id=unreachable,
            questionnaire="phq9",
            hours=72,
            channel=None,
            now=now,
        )
    assert env.bodies("Task", patient=f"Patient/{reachable}") == []
