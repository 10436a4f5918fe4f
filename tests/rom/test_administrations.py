"""The SDC questionnaire Task and its lifecycle through the repository (SQLite and PostgreSQL): the
Task's shape, open_status, start and complete (idempotent), and the links used up only after commit."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from fhir_norse.auth.links import LinkState
from fhir_norse.outcomes import Conflict
from fhir_norse.rom.administrations import (
    SDC_TASK_PROFILE,
    TASK_CODE_SYSTEM,
    is_questionnaire_task,
    questionnaire_task,
    task_output,
    task_patient,
    task_questionnaire,
    task_window,
)
from fhir_norse.server.validation import validate_resource
from tests.rom.journey_support import OPERATOR, PHQ9, Env, EnvFactory, env_factory, patient

START = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
END = START + timedelta(hours=72)


@pytest.fixture
def make_env(database_url: str) -> Iterator[EnvFactory]:
    yield from env_factory(database_url)


def _task(task_id: str = "t1", patient_id: str = "p1") -> dict[str, object]:
    return questionnaire_task(
        task_id=task_id,
        patient_id=patient_id,
        questionnaire=PHQ9,
        start=START,
        end=END,
        authored=START - timedelta(minutes=1),
        requester={"display": "Testklinikken"},
        context="intake",
        based_on="ServiceRequest/plan-1",
    )


def test_the_task_is_an_sdc_questionnaire_task() -> None:
    task = _task()
    validate_resource(task, expected_type="Task")
    assert task["meta"] == {"profile": [SDC_TASK_PROFILE]}
    assert task["code"] == {"coding": [{"system": TASK_CODE_SYSTEM, "code": "complete-questionnaire"}]}
    assert task["intent"] == "order" and task["status"] == "requested"
    assert task["for"] == task["owner"] == {"reference": "Patient/p1"}
    assert task["restriction"] == {
        "period": {"start": "2026-03-02T07:00:00.000Z", "end": "2026-03-05T07:00:00.000Z"}
    }
    assert task["basedOn"] == [{"reference": "ServiceRequest/plan-1"}]
    assert task_questionnaire(task) == PHQ9
    assert task_window(task) == (START, END)
    assert task_patient(task) == "p1"
    assert is_questionnaire_task(task)
    assert not is_questionnaire_task({"resourceType": "Task", "code": {"text": "call the patient"}})


def test_open_status(make_env: EnvFactory) -> None:
    env = make_env()
    administrations = env.journey.administrations
    task = _task()
    assert administrations.open_status(task, START - timedelta(seconds=1)) == "not-yet"
    assert administrations.open_status(task, START) is None
    assert administrations.open_status({**task, "status": "in-progress"}, START) is None
    assert administrations.open_status(task, END) == "closed"
    assert administrations.open_status({**task, "status": "completed"}, START) == "completed"
    assert administrations.open_status({**task, "status": "cancelled"}, START) == "cancelled"
    assert administrations.open_status({**task, "status": "failed"}, START) == "failed"


def _stored_task(env: Env) -> tuple[str, str]:
    pid = env.create("Patient", patient())
    with env.service.session(OPERATOR) as repo:
        repo.update("Task", "t1", _task("t1", pid))
    return pid, "t1"


def test_start_then_complete(make_env: EnvFactory) -> None:
    env = make_env(start=START + timedelta(hours=1))
    pid, task_id = _stored_task(env)
    administrations = env.journey.administrations
    token = env.journey.links.issue(task_id, pid, END)
    with env.service.session(OPERATOR) as repo:
        started = administrations.start(repo, task_id, "QuestionnaireResponse/qr-1")
    assert started["status"] == "in-progress" and task_output(started) == "QuestionnaireResponse/qr-1"
    version = env.read("Task", task_id)["meta"]["versionId"]
    with env.service.session(OPERATOR) as repo:
        administrations.start(repo, task_id, "QuestionnaireResponse/qr-1")  # idempotent: no new version
    assert env.read("Task", task_id)["meta"]["versionId"] == version
    assert env.journey.links.lookup(token)[0] == LinkState.VALID
    with env.service.session(OPERATOR) as repo:
        done = administrations.complete(repo, task_id, "QuestionnaireResponse/qr-1")
        assert done["status"] == "completed"
    assert env.journey.links.lookup(token)[0] == LinkState.COMPLETED
    stored = env.read("Task", task_id)
    assert stored["status"] == "completed" and stored["executionPeriod"]["end"]
    assert len(stored["output"]) == 1
    with env.service.session(OPERATOR) as repo:
        administrations.complete(repo, task_id, "QuestionnaireResponse/qr-1")
    with pytest.raises(Conflict), env.service.session(OPERATOR) as repo:
        administrations.complete(repo, task_id, "QuestionnaireResponse/other")
    with pytest.raises(Conflict), env.service.session(OPERATOR) as repo:
        administrations.start(repo, task_id, "QuestionnaireResponse/qr-2")


def test_links_are_used_up_only_when_the_completion_commits(make_env: EnvFactory) -> None:
    env = make_env(start=START + timedelta(hours=1))
    pid, task_id = _stored_task(env)
    token = env.journey.links.issue(task_id, pid, END)
    with pytest.raises(RuntimeError), env.service.session(OPERATOR) as repo:
        env.journey.administrations.complete(repo, task_id, "QuestionnaireResponse/qr-1")
        raise RuntimeError("something later in the same transaction failed")
    assert env.read("Task", task_id)["status"] == "requested"
    assert env.journey.links.lookup(token)[0] == LinkState.VALID
    # The connection that carried the rolled-back work is reused: nothing of it runs later.
    with env.service.session(OPERATOR) as repo:
        repo.get("Task", task_id)
    assert env.journey.links.lookup(token)[0] == LinkState.VALID


def test_a_closed_window_cannot_be_started(make_env: EnvFactory) -> None:
    env = make_env(start=END + timedelta(minutes=1))
    _, task_id = _stored_task(env)
    with pytest.raises(Conflict, match="closed"), env.service.session(OPERATOR) as repo:
        env.journey.administrations.start(repo, task_id, "QuestionnaireResponse/qr-1")
