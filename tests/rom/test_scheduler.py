"""The scheduler with a controllable clock, on SQLite and PostgreSQL: Tasks from monitoring plans (CarePlan,
and the plan ServiceRequest) once per occurrence (over ticks, after a restart, with two schedulers at
once), Tasks before each booked Appointment (and what a cancelled or moved one does), window expiry and
ended plans, and the lease."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fhir_norse.auth.links import LinkState
from fhir_norse.canonicals import CS_CONTEXT
from fhir_norse.rom.administrations import (
    APPOINTMENT_CANCELLED,
    APPOINTMENT_MOVED,
    PLAN_ENDED,
    WINDOW_CLOSED,
    task_window,
)
from fhir_norse.rom.scheduler import occurrences, read_plan
from fhir_norse.server.repository import loads
from fhir_norse.store.scheduling_tables import MESSAGE_ATTEMPT
from tests.rom.journey_support import (
    MONDAY_0800,
    OPERATOR,
    PHQ9,
    Env,
    EnvFactory,
    RecordingTransport,
    appointment,
    appointment_plan,
    before_appointment_activity,
    care_plan,
    env_factory,
    patient,
    weekly_activity,
    weekly_plan,
)


@pytest.fixture
def make_env(database_url: str) -> Iterator[EnvFactory]:
    yield from env_factory(database_url)


def _tasks(env: Env, patient_id: str) -> list[dict[str, Any]]:
    return env.bodies("Task", patient=f"Patient/{patient_id}")


def test_weekly_plan_makes_one_task_per_monday_over_many_ticks_and_a_restart(make_env: EnvFactory) -> None:
    env = make_env(start=MONDAY_0800 - timedelta(days=2))
    pid = env.create("Patient", patient())
    plan = env.create("ServiceRequest", weekly_plan(pid, authored=env.clock.now))
    scheduler = env.journey.scheduler
    assert scheduler.tick().tasks_created == []  # Saturday: nothing due
    env.clock.set(MONDAY_0800 + timedelta(minutes=1))
    first = scheduler.tick()
    assert len(first.tasks_created) == 1
    for _ in range(3):
        env.clock.advance(minutes=30)
        assert scheduler.tick().tasks_created == []
    # A restart: a new scheduler (and everything else) on the same database, nothing in memory.
    restarted = env.new_journey().scheduler
    assert restarted.tick().tasks_created == []
    tasks = _tasks(env, pid)
    assert len(tasks) == 1
    task = tasks[0]
    assert task["status"] == "requested" and task["intent"] == "order"
    assert task["meta"]["profile"] == ["http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-task"]
    assert task["basedOn"] == [{"reference": f"ServiceRequest/{plan}"}]
    assert task["for"] == task["owner"] == {"reference": f"Patient/{pid}"}
    assert task["requester"] == {"display": "Testklinikken"}
    assert task["input"][0]["valueCanonical"] == PHQ9
    assert task_window(task) == (MONDAY_0800, MONDAY_0800 + timedelta(hours=72))
    assert task["extension"][0]["valueCoding"]["code"] == "weekly"
    # The next Monday, the next Task (the first one failed meanwhile: its window closed).
    env.clock.set(MONDAY_0800 + timedelta(days=7, minutes=5))
    second = restarted.tick()
    assert len(second.tasks_created) == 1 and second.tasks_created != first.tasks_created
    assert second.tasks_failed == first.tasks_created


def test_a_new_plan_makes_no_task_for_an_occurrence_before_it(make_env: EnvFactory) -> None:
    env = make_env(start=MONDAY_0800 + timedelta(hours=3))
    pid = env.create("Patient", patient())
    env.create("ServiceRequest", weekly_plan(pid, authored=env.clock.now))
    assert env.journey.scheduler.tick().tasks_created == []


def test_two_schedulers_at_once_make_no_duplicates(make_env: EnvFactory) -> None:
    env = make_env(start=MONDAY_0800 - timedelta(hours=1))
    patients = [env.create("Patient", patient(mobile=f"+47912345{n:02d}")) for n in range(3)]
    for pid in patients:
        env.create("ServiceRequest", weekly_plan(pid, authored=env.clock.now))
    env.clock.set(MONDAY_0800 + timedelta(minutes=1))
    workers = [env.journey.scheduler, env.new_journey().scheduler, env.new_journey().scheduler]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(workers))

    def run(scheduler: Any) -> None:
        try:
            barrier.wait()
            # The steps without the lease: the ids and locks alone must prevent duplicates.
            scheduler.work(env.clock())
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    for pid in patients:
        assert len(_tasks(env, pid)) == 1
        assert len(env.bodies("CommunicationRequest", subject=f"Patient/{pid}")) == 1
        assert len(env.bodies("Communication", subject=f"Patient/{pid}")) == 1
    sent = sum(len(t.sent) for t in env.transports.values() if isinstance(t, RecordingTransport))
    assert sent == len(patients)
    assert len(env.rows(MESSAGE_ATTEMPT)) == len(patients)


def test_only_one_worker_holds_the_lease(make_env: EnvFactory) -> None:
    env = make_env()
    first, second = env.journey.scheduler, env.new_journey().scheduler
    assert first.tick().ran
    assert not second.tick().ran
    env.clock.advance(seconds=30)
    assert first.tick().ran  # the holder renews
    assert not second.tick().ran
    env.clock.advance(hours=1)  # the holder stopped renewing: the lease expired
    assert second.tick().ran
    assert not first.tick().ran
    second.release()
    assert first.tick().ran


def test_a_plan_service_request_before_each_appointment(make_env: EnvFactory) -> None:
    """The ServiceRequest form of the plan counts booked Appointments too (and nothing else)."""
    env = make_env(start=MONDAY_0800)
    pid = env.create("Patient", patient())
    plan = env.create("ServiceRequest", appointment_plan(pid, authored=env.clock.now, hours_before=48))
    visit_start = MONDAY_0800 + timedelta(days=3)
    visit = env.create("Appointment", appointment(pid, visit_start))
    scheduler = env.journey.scheduler
    assert scheduler.tick().tasks_created == []  # 72 h before: not yet
    env.clock.set(visit_start - timedelta(hours=47))
    created = scheduler.tick().tasks_created
    assert len(created) == 1
    assert scheduler.tick().tasks_created == []
    task = env.read("Task", created[0])
    assert task_window(task) == (visit_start - timedelta(hours=48), visit_start)
    assert task["basedOn"] == [{"reference": f"ServiceRequest/{plan}"}]
    assert task["reasonReference"] == {"reference": f"Appointment/{visit}"}
    # A visit still pending (not agreed by every participant) makes none.
    env.create("Appointment", appointment(pid, visit_start + timedelta(hours=2), status="pending"))
    assert scheduler.tick().tasks_created == []


def _weekly_care_plan_env(make_env: EnvFactory, **activity: Any) -> tuple[Env, str, str]:
    env = make_env(start=MONDAY_0800 - timedelta(days=2))
    pid = env.create("Patient", patient())
    episode = env.create(
        "EpisodeOfCare",
        {"resourceType": "EpisodeOfCare", "status": "active", "patient": {"reference": f"Patient/{pid}"}},
    )
    body = care_plan(
        pid, weekly_activity(**activity), start=env.clock.now, episode=f"EpisodeOfCare/{episode}"
    )
    return env, pid, env.create("CarePlan", body)


def test_a_weekly_care_plan_makes_one_task_per_monday(make_env: EnvFactory) -> None:
    env, pid, plan = _weekly_care_plan_env(make_env, window_hours=24, context="weekly")
    scheduler = env.journey.scheduler
    assert scheduler.tick().tasks_created == []  # Saturday
    env.clock.set(MONDAY_0800 + timedelta(minutes=1))
    (first,) = scheduler.tick().tasks_created
    assert env.new_journey().scheduler.work(env.clock()).tasks_created == []  # a restart: nothing new
    task = env.read("Task", first)
    assert task["basedOn"] == [{"reference": f"CarePlan/{plan}"}]
    assert task["for"] == task["owner"] == {"reference": f"Patient/{pid}"}
    assert task["input"][0]["valueCanonical"] == PHQ9
    assert task_window(task) == (MONDAY_0800, MONDAY_0800 + timedelta(hours=24))
    extensions = {e["url"]: e for e in task["extension"]}
    assert (
        extensions["http://fhir-norse.org/fhir/StructureDefinition/administration-context"]["valueCoding"][
            "code"
        ]
        == "weekly"
    )
    episode = extensions["http://hl7.org/fhir/StructureDefinition/workflow-episodeOfCare"]
    assert episode["valueReference"]["reference"].startswith("EpisodeOfCare/")
    assert "reasonReference" not in task
    # The next Monday: the first failed (24 h window), a second one is made.
    env.clock.set(MONDAY_0800 + timedelta(days=7, minutes=1))
    report = scheduler.tick()
    assert report.tasks_failed == [first] and len(report.tasks_created) == 1
    assert len(_tasks(env, pid)) == 2


def test_a_care_plan_ends_with_its_period_and_on_hold_activities_make_nothing(make_env: EnvFactory) -> None:
    env = make_env(start=MONDAY_0800 - timedelta(days=2))
    pid = env.create("Patient", patient())
    held = weekly_activity() | {"status": "on-hold"}
    body = care_plan(pid, weekly_activity(), held, start=env.clock.now, end=MONDAY_0800 + timedelta(days=3))
    env.create("CarePlan", body)
    env.clock.set(MONDAY_0800 + timedelta(minutes=1))
    assert len(env.journey.scheduler.tick().tasks_created) == 1  # the held activity made none
    env.clock.set(MONDAY_0800 + timedelta(days=7, minutes=1))
    assert env.journey.scheduler.tick().tasks_created == []  # after period.end
    # A draft (not yet active) plan makes nothing either.
    other = env.create("Patient", patient(mobile="+4799999999"))
    env.create("CarePlan", care_plan(other, weekly_activity(), start=env.clock.now, status="draft"))
    env.clock.set(MONDAY_0800 + timedelta(days=14, minutes=1))
    assert _tasks(env, other) == []


@pytest.mark.parametrize("ending", ["revoked", "completed", "deleted"])
def test_an_ended_care_plan_cancels_its_open_tasks(make_env: EnvFactory, ending: str) -> None:
    env, _, plan = _weekly_care_plan_env(make_env)
    env.clock.set(MONDAY_0800 + timedelta(minutes=1))
    (task_id,) = env.journey.scheduler.tick().tasks_created
    sms = env.transports["sms"]
    assert isinstance(sms, RecordingTransport) and len(sms.sent) == 1
    token = sms.sent[0].body.split("/p/")[1].split()[0]
    if ending == "deleted":
        env.delete("CarePlan", plan)
    else:
        env.update("CarePlan", plan, {"status": ending})
    env.clock.advance(minutes=5)
    assert env.journey.scheduler.tick().tasks_cancelled == [task_id]
    task = env.read("Task", task_id)
    assert task["status"] == "cancelled" and task["statusReason"]["text"] == PLAN_ENDED
    assert env.journey.links.lookup(token)[0] == LinkState.REVOKED
    env.clock.set(MONDAY_0800 + timedelta(days=7, minutes=1))
    assert env.journey.scheduler.tick().tasks_created == []


def _appointment_env(make_env: EnvFactory) -> tuple[Env, str, str]:
    env = make_env(start=MONDAY_0800)
    pid = env.create("Patient", patient())
    plan = env.create(
        "CarePlan", care_plan(pid, before_appointment_activity(hours_before=48), start=env.clock.now)
    )
    return env, pid, plan


def test_a_care_plan_before_each_appointment(make_env: EnvFactory) -> None:
    env, pid, plan = _appointment_env(make_env)
    other = env.create("Patient", patient(mobile="+4799999999"))
    first_start = MONDAY_0800 + timedelta(days=3, hours=2)
    second_start = first_start + timedelta(days=7)
    first = env.create("Appointment", appointment(pid, first_start))
    second = env.create("Appointment", appointment(pid, second_start))
    env.create("Appointment", appointment(other, first_start))  # another patient's visit: not this plan's
    env.create("Appointment", appointment(pid, first_start + timedelta(hours=4), patient_status="declined"))
    env.create("Appointment", appointment(pid, first_start + timedelta(hours=5), status="proposed"))
    scheduler = env.journey.scheduler
    assert scheduler.tick().tasks_created == []
    env.clock.set(first_start - timedelta(hours=48))  # the window opens
    (task_id,) = scheduler.tick().tasks_created
    task = env.read("Task", task_id)
    assert task["basedOn"] == [{"reference": f"CarePlan/{plan}"}]
    assert task["reasonReference"] == {"reference": f"Appointment/{first}"}
    assert task_window(task) == (first_start - timedelta(hours=48), first_start)
    assert _tasks(env, other) == []
    # Until the visit starts nothing more; then the Task fails if unanswered.
    env.clock.set(first_start - timedelta(minutes=1))
    assert scheduler.tick().tasks_created == []
    env.clock.set(first_start + timedelta(minutes=1))
    env.update("Appointment", first, {"status": "arrived"})
    assert scheduler.tick().tasks_failed == [task_id]
    env.clock.set(second_start - timedelta(hours=47))
    (next_id,) = scheduler.tick().tasks_created
    assert env.read("Task", next_id)["reasonReference"] == {"reference": f"Appointment/{second}"}
    assert len(_tasks(env, pid)) == 2


@pytest.mark.parametrize("change", ["cancelled", "noshow", "deleted", "declined"])
def test_a_cancelled_appointment_cancels_its_open_task(make_env: EnvFactory, change: str) -> None:
    env, pid, _ = _appointment_env(make_env)
    start = MONDAY_0800 + timedelta(days=1)
    visit = env.create("Appointment", appointment(pid, start))
    (task_id,) = env.journey.scheduler.tick().tasks_created
    sms = env.transports["sms"]
    assert isinstance(sms, RecordingTransport) and len(sms.sent) == 1
    token = sms.sent[0].body.split("/p/")[1].split()[0]
    if change == "deleted":
        env.delete("Appointment", visit)
    elif change == "declined":
        env.update(
            "Appointment",
            visit,
            {"participant": appointment(pid, start, patient_status="declined")["participant"]},
        )
    else:
        env.update("Appointment", visit, {"status": change})
    env.clock.advance(minutes=5)
    report = env.journey.scheduler.tick()
    assert report.tasks_cancelled == [task_id] and report.tasks_created == []
    task = env.read("Task", task_id)
    assert task["status"] == "cancelled" and task["statusReason"]["text"] == APPOINTMENT_CANCELLED
    assert env.journey.links.lookup(token)[0] == LinkState.REVOKED
    assert env.journey.scheduler.tick().tasks_cancelled == []


def test_a_moved_appointment_gets_a_task_for_its_new_time(make_env: EnvFactory) -> None:
    env, pid, _ = _appointment_env(make_env)
    start = MONDAY_0800 + timedelta(days=1)
    visit = env.create("Appointment", appointment(pid, start))
    (old,) = env.journey.scheduler.tick().tasks_created
    moved = start + timedelta(days=1)
    env.update(
        "Appointment", visit, {"start": moved.isoformat(), "end": (moved + timedelta(minutes=45)).isoformat()}
    )
    env.clock.advance(minutes=5)
    report = env.journey.scheduler.tick()
    assert report.tasks_cancelled == [old]
    assert env.read("Task", old)["statusReason"]["text"] == APPOINTMENT_MOVED
    (new,) = report.tasks_created
    task = env.read("Task", new)
    assert task["status"] == "requested" and task["reasonReference"] == {"reference": f"Appointment/{visit}"}
    assert task_window(task) == (moved - timedelta(hours=48), moved)
    env.clock.advance(minutes=5)
    later = env.journey.scheduler.tick()
    assert later.tasks_created == later.tasks_cancelled == []


def test_an_appointment_of_a_task_made_by_the_clinic_is_left_alone(make_env: EnvFactory) -> None:
    """A Task an EHR made for a visit (no plan in basedOn) is the EHR's to cancel."""
    env = make_env(start=MONDAY_0800)
    pid = env.create("Patient", patient())
    start = MONDAY_0800 + timedelta(days=1)
    visit = env.create("Appointment", appointment(pid, start))
    from fhir_norse.rom.administrations import questionnaire_task

    body = questionnaire_task(
        task_id="ehr-1",
        patient_id=pid,
        questionnaire=PHQ9,
        start=env.clock.now,
        end=start,
        authored=env.clock.now,
    )
    body["reasonReference"] = {"reference": f"Appointment/{visit}"}
    task_id = env.create("Task", body)
    env.update("Appointment", visit, {"status": "cancelled"})
    env.clock.advance(minutes=5)
    assert env.journey.scheduler.tick().tasks_cancelled == []
    assert env.read("Task", task_id)["status"] == "requested"


def test_window_expiry_fails_the_task_and_revokes_its_links(make_env: EnvFactory) -> None:
    env = make_env(start=MONDAY_0800 - timedelta(hours=1))
    pid = env.create("Patient", patient())
    env.create("ServiceRequest", weekly_plan(pid, authored=env.clock.now, window_hours=24))
    env.clock.set(MONDAY_0800 + timedelta(minutes=1))
    report = env.journey.scheduler.tick()
    (task_id,) = report.tasks_created
    sms = env.transports["sms"]
    assert isinstance(sms, RecordingTransport) and len(sms.sent) == 1
    token = sms.sent[0].body.split("/p/")[1].split()[0]
    assert env.journey.links.lookup(token)[0] == LinkState.VALID
    env.clock.set(MONDAY_0800 + timedelta(hours=24, minutes=1))
    report = env.journey.scheduler.tick()
    assert report.tasks_failed == [task_id]
    task = env.read("Task", task_id)
    assert task["status"] == "failed"
    assert task["statusReason"]["text"] == WINDOW_CLOSED
    assert env.journey.links.lookup(token)[0] == LinkState.REVOKED


def test_an_ended_or_deleted_plan_cancels_its_open_tasks(make_env: EnvFactory) -> None:
    env = make_env(start=MONDAY_0800 - timedelta(hours=1))
    first, second = env.create("Patient", patient()), env.create("Patient", patient(mobile="+4799999999"))
    plan_a = env.create("ServiceRequest", weekly_plan(first, authored=env.clock.now))
    plan_b = env.create("ServiceRequest", weekly_plan(second, authored=env.clock.now))
    env.clock.set(MONDAY_0800 + timedelta(minutes=1))
    assert len(env.journey.scheduler.tick().tasks_created) == 2
    env.update("ServiceRequest", plan_a, {"status": "revoked"})
    env.delete("ServiceRequest", plan_b)
    env.clock.advance(minutes=5)
    report = env.journey.scheduler.tick()
    assert len(report.tasks_cancelled) == 2
    for pid in (first, second):
        (task,) = _tasks(env, pid)
        assert task["status"] == "cancelled"
        assert task["statusReason"]["text"] == PLAN_ENDED
    env.clock.set(MONDAY_0800 + timedelta(days=7, minutes=1))
    assert env.journey.scheduler.tick().tasks_created == []


def test_scheduler_writes_are_audited_as_the_scheduler(make_env: EnvFactory) -> None:
    env = make_env(start=MONDAY_0800 - timedelta(hours=1))
    pid = env.create("Patient", patient())
    env.create("ServiceRequest", weekly_plan(pid, authored=env.clock.now))
    env.clock.set(MONDAY_0800 + timedelta(minutes=1))
    (task_id,) = env.journey.scheduler.tick().tasks_created
    from fhir_norse.server.search.parse import parse_search

    with env.service.session(OPERATOR) as repo:
        request = parse_search("AuditEvent", [("entity", f"Task/{task_id}")], registry=repo.kernel.registry)
        events = [loads(row.body_text) for row in repo.search(request).matches]
    creators = {
        who.get("display") or who.get("identifier", {}).get("value")
        for event in events
        if event["action"] == "C"
        for agent in event["agent"]
        for who in [agent.get("who") or {}]
    }
    assert any("fhir-norse-scheduler" in str(c) for c in creators), events


# ---------------------------------------------------------------------- pure functions


def test_occurrences_of_a_weekly_timing_in_oslo_time() -> None:
    from zoneinfo import ZoneInfo

    timing = {
        "repeat": {"dayOfWeek": ["mon", "thu"], "timeOfDay": ["08:00:00"], "period": 1, "periodUnit": "wk"}
    }
    zone = ZoneInfo("Europe/Oslo")
    found = list(
        occurrences(timing, zone, datetime(2026, 3, 23, tzinfo=UTC), datetime(2026, 4, 3, tzinfo=UTC))
    )
    # Summer time starts on 29 March: 08:00 in Oslo is 07:00 UTC before and 06:00 UTC after.
    assert found == [
        datetime(2026, 3, 23, 7, 0, tzinfo=UTC),
        datetime(2026, 3, 26, 7, 0, tzinfo=UTC),
        datetime(2026, 3, 30, 6, 0, tzinfo=UTC),
        datetime(2026, 4, 2, 6, 0, tzinfo=UTC),
    ]
    fortnightly = {
        "repeat": {
            "dayOfWeek": ["mon"],
            "timeOfDay": ["09:30:00"],
            "period": 2,
            "periodUnit": "wk",
            "boundsPeriod": {"start": "2026-03-02"},
        }
    }
    every_other = list(
        occurrences(fortnightly, zone, datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC))
    )
    assert [o.day for o in every_other] == [2, 16, 30]


def test_a_care_plan_reads_as_the_same_plan() -> None:
    care_plan = {
        "resourceType": "CarePlan",
        "id": "cp1",
        "status": "active",
        "intent": "plan",
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2026-03-01T00:00:00Z"},
        "activity": [
            {
                "detail": {
                    "kind": "Task",
                    "instantiatesCanonical": [PHQ9],
                    "code": {"coding": [{"system": CS_CONTEXT, "code": "intake"}]},
                    "status": "scheduled",
                    "scheduledTiming": {"repeat": {"dayOfWeek": ["mon"], "timeOfDay": ["08:00:00"]}},
                }
            },
            {"detail": {"kind": "Appointment", "status": "scheduled"}},
        ],
    }
    plan = read_plan("CarePlan", care_plan)
    assert plan is not None
    assert plan.ref == "CarePlan/cp1" and plan.patient_id == "p1"
    (activity,) = plan.activities
    assert activity.questionnaire == PHQ9 and activity.context == "intake"
    assert activity.window == timedelta(hours=72)
    assert read_plan("CarePlan", {**care_plan, "intent": "proposal"}) is None


def test_start_runs_ticks_in_a_background_thread_until_stopped(make_env: EnvFactory) -> None:
    env = make_env(start=MONDAY_0800 - timedelta(hours=1), scheduler_interval_s=0.05)
    pid = env.create("Patient", patient())
    env.create("ServiceRequest", weekly_plan(pid, authored=env.clock.now))
    env.clock.set(MONDAY_0800 + timedelta(minutes=1))
    scheduler = env.journey.scheduler
    scheduler.start()
    try:
        done = threading.Event()
        for _ in range(400):  # polls until the thread has ticked; no assertion on how long it took
            if _tasks(env, pid) and len(env.bodies("Communication", subject=f"Patient/{pid}")) == 1:
                done.set()
                break
            done.wait(0.05)
        assert done.is_set()
    finally:
        scheduler.stop()
    # Stopped: the lease is released, so another worker takes over at once.
    assert env.new_journey().scheduler.tick().ran
    assert len(_tasks(env, pid)) == 1
