"""Invitations, reminders and sending, on SQLite and PostgreSQL with a controllable clock: channel and
language choice, opt-out, quiet hours, reminders, retries with backoff, permanent failures, and a crash
between handing a message to the gateway and recording it (never sent twice)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fhir_norse.auth.links import LinkState
from fhir_norse.canonicals import EXT_MESSAGING_OPT_OUT
from fhir_norse.messaging.base import OUTCOME_UNKNOWN, SendError
from fhir_norse.messaging.twilio import TwilioSms
from fhir_norse.rom.invitations import (
    Dispatcher,
    QuietHours,
    choose_channel,
    patient_language,
    request_id,
)
from fhir_norse.store.scheduling_tables import MESSAGE_ATTEMPT
from tests.rom.journey_support import (
    MONDAY_0800,
    OPERATOR,
    Env,
    EnvFactory,
    RecordingTransport,
    env_factory,
    patient,
    weekly_plan,
)
from tests.support.fake_twilio import FakeTwilio


@pytest.fixture
def make_env(database_url: str) -> Iterator[EnvFactory]:
    yield from env_factory(database_url)


def _scheduled(env: Env, body: dict[str, Any] | None = None, **plan: Any) -> tuple[str, str]:
    """A patient with a weekly plan, ticked at Monday 08:01: (patient id, Task id)."""
    env.clock.set(MONDAY_0800 - timedelta(hours=1))
    pid = env.create("Patient", body or patient())
    env.create("ServiceRequest", weekly_plan(pid, authored=env.clock.now, **plan))
    env.clock.set(MONDAY_0800 + timedelta(minutes=1))
    (task_id,) = env.journey.scheduler.tick().tasks_created
    return pid, task_id


def _sms(env: Env) -> RecordingTransport:
    transport = env.transports["sms"]
    assert isinstance(transport, RecordingTransport)
    return transport


def _communications(env: Env, pid: str) -> list[dict[str, Any]]:
    found = env.bodies("Communication", subject=f"Patient/{pid}")
    return sorted(found, key=lambda c: str(c["meta"]["lastUpdated"]))


def test_an_invitation_is_requested_sent_and_recorded_without_the_link(make_env: EnvFactory) -> None:
    env = make_env()
    pid, task_id = _scheduled(env)
    (request,) = env.bodies("CommunicationRequest", subject=f"Patient/{pid}")
    assert request["id"] == request_id(task_id, "invitation")
    assert request["status"] == "completed"
    assert request["about"] == [{"reference": f"Task/{task_id}"}]
    assert request["category"][0]["coding"][0]["code"] == "notification"
    assert request["medium"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode",
        "code": "SMSWRIT",
    }
    assert request["payload"] == [{"contentString": "invitation"}]
    (message,) = _sms(env).sent
    assert message.to == "+4791234567"
    assert "Testklinikken" in message.body and "https://survey.example.no/p/" in message.body
    assert message.status_callback is not None
    (comm,) = _communications(env, pid)
    assert message.reference == comm["id"]
    assert message.status_callback == f"https://survey.example.no/messaging/twilio/status/{comm['id']}"
    assert comm["status"] == "in-progress"
    assert comm["basedOn"] == [{"reference": f"CommunicationRequest/{request['id']}"}]
    assert comm["identifier"] == [
        {"system": "http://fhir-norse.org/fhir/message-id/fake-sms", "value": "fake-sms-1"}
    ]
    assert comm["sent"] and comm["payload"] == [{"contentString": "invitation"}]
    # The link opens this Task for this patient, and is stored nowhere in FHIR.
    token = message.body.split("/p/")[1].split()[0]
    state, link = env.journey.links.lookup(token)
    assert state == LinkState.VALID and link is not None
    assert (link.task_id, link.patient_id) == (task_id, pid)
    assert link.expires_at == MONDAY_0800 + timedelta(hours=72)
    for res_type in ("CommunicationRequest", "Communication", "Task"):
        for body in (
            env.bodies(res_type, subject=f"Patient/{pid}")
            if res_type != "Task"
            else [env.read("Task", task_id)]
        ):
            assert token not in str(body)


def test_a_task_an_ehr_creates_is_invited_on_the_next_tick(make_env: EnvFactory) -> None:
    from fhir_norse.rom.administrations import questionnaire_task
    from tests.rom.journey_support import PHQ9

    env = make_env()
    pid = env.create("Patient", patient(email="kari@example.no", mobile=None))
    task = questionnaire_task(
        task_id="ehr-task-1",
        patient_id=pid,
        questionnaire=PHQ9,
        start=env.clock.now,
        end=env.clock.now + timedelta(days=2),
        authored=env.clock.now,
        requester={"reference": "Practitioner/dr-1"},
    )
    with env.service.session(OPERATOR) as repo:
        repo.update("Task", "ehr-task-1", task)
    report = env.journey.scheduler.tick()
    assert report.requests_created == [request_id("ehr-task-1", "invitation")]
    email = env.transports["email"]
    assert isinstance(email, RecordingTransport)
    (message,) = email.sent
    assert message.to == "kari@example.no" and message.subject
    assert message.status_callback is None


def test_channel_choice_rank_period_and_opt_out() -> None:
    now = datetime(2026, 3, 2, tzinfo=UTC)
    both = patient(mobile="+4791111111", email="kari@example.no")
    assert choose_channel(both, {"sms", "email"}, now) == ("sms", "+4791111111")
    assert choose_channel(both, {"email"}, now) == ("email", "kari@example.no")
    assert choose_channel(both, {"sms", "email"}, now, "email") == ("email", "kari@example.no")
    ranked = patient(
        mobile=None,
        telecom=[
            {"system": "phone", "use": "home", "value": "+4722222222", "rank": 1},
            {"system": "phone", "use": "mobile", "value": "+4793333333", "rank": 3},
            {
                "system": "phone",
                "use": "mobile",
                "value": "+4794444444",
                "rank": 2,
                "period": {"end": "2025-01-01"},
            },
            {"system": "email", "value": "old@example.no", "rank": 2},
        ],
    )
    # The landline is no SMS channel; the rank-2 mobile has ended; e-mail (rank 2) beats mobile (rank 3).
    assert choose_channel(ranked, {"sms", "email"}, now) == ("email", "old@example.no")
    assert choose_channel(ranked, {"sms"}, now) == ("sms", "+4793333333")
    assert choose_channel(patient(email="k@example.no", opt_out="sms"), {"sms", "email"}, now) == (
        "email",
        "k@example.no",
    )
    assert choose_channel(patient(email="k@example.no", opt_out="all"), {"sms", "email"}, now) is None
    assert choose_channel(patient(mobile=None), {"sms", "email"}, now) is None


def test_language_from_patient_communication() -> None:
    assert patient_language(patient()) == "nb"
    assert patient_language(patient(language="en-GB")) == "en"
    assert patient_language(patient(language="nn")) == "nb"
    two = {
        "communication": [
            {"language": {"coding": [{"code": "nb"}]}},
            {"language": {"coding": [{"code": "en"}]}, "preferred": True},
        ]
    }
    assert patient_language(two) == "en"


def test_english_patients_get_english_messages(make_env: EnvFactory) -> None:
    env = make_env()
    _scheduled(env, patient(language="en"))
    _scheduled_second(env)
    english, bokmal = (re.sub(r"https://\S+", "<link>", m.body) for m in _sms(env).sent)
    # The same message but for the language (the links differ too, hence replaced).
    assert english != bokmal


def test_an_opted_out_patient_gets_no_message(make_env: EnvFactory) -> None:
    env = make_env()
    pid, _ = _scheduled(env, patient(opt_out="sms"))
    assert env.bodies("CommunicationRequest", subject=f"Patient/{pid}") == []
    assert _sms(env).sent == []


def test_no_message_in_quiet_hours(make_env: EnvFactory) -> None:
    env = make_env(messaging_quiet_hours="21:00-08:00")
    env.clock.set(MONDAY_0800 - timedelta(hours=1))
    pid = env.create("Patient", patient())
    plan = weekly_plan(pid, authored=env.clock.now)
    plan["occurrenceTiming"]["repeat"]["timeOfDay"] = ["22:30:00"]
    env.create("ServiceRequest", plan)
    evening = datetime(2026, 3, 2, 21, 31, tzinfo=UTC)  # 22:31 in Oslo
    env.clock.set(evening)
    report = env.journey.scheduler.tick()
    assert len(report.tasks_created) == 1 and len(report.requests_created) == 1
    (result,) = report.messages
    assert result.outcome == "deferred"
    assert result.due_at == datetime(2026, 3, 3, 7, 0, tzinfo=UTC)  # 08:00 in Oslo
    assert _sms(env).sent == []
    env.clock.set(datetime(2026, 3, 3, 6, 59, tzinfo=UTC))
    env.journey.scheduler.tick()
    assert _sms(env).sent == []
    env.clock.set(datetime(2026, 3, 3, 7, 0, tzinfo=UTC))
    env.journey.scheduler.tick()
    assert len(_sms(env).sent) == 1


def test_quiet_hours_spans() -> None:
    quiet = QuietHours("21:00-08:00", "Europe/Oslo")
    assert quiet.until(datetime(2026, 3, 2, 12, 0, tzinfo=UTC)) is None
    assert quiet.until(datetime(2026, 3, 2, 20, 0, tzinfo=UTC)) == datetime(2026, 3, 3, 7, 0, tzinfo=UTC)
    assert quiet.until(datetime(2026, 3, 3, 5, 0, tzinfo=UTC)) == datetime(2026, 3, 3, 7, 0, tzinfo=UTC)
    lunch = QuietHours("11:30-12:30", "UTC")
    assert lunch.until(datetime(2026, 3, 3, 12, 0, tzinfo=UTC)) == datetime(2026, 3, 3, 12, 30, tzinfo=UTC)
    assert QuietHours("", "UTC").until(datetime(2026, 3, 3, 3, 0, tzinfo=UTC)) is None


def test_a_reminder_after_the_delay_and_none_once_answered(make_env: EnvFactory) -> None:
    env = make_env(reminder_after_hours=24)
    _, task_id = _scheduled(env)
    answered_pid, answered_task = _scheduled_second(env)
    assert len(_sms(env).sent) == 2
    env.clock.advance(hours=23)
    assert env.journey.scheduler.tick().requests_created == []
    # The second patient answers.
    with env.service.session(OPERATOR) as repo:
        env.journey.administrations.complete(repo, answered_task, "QuestionnaireResponse/qr-1")
    env.clock.advance(hours=1, minutes=1)
    report = env.journey.scheduler.tick()
    assert report.requests_created == [request_id(task_id, "reminder")]
    assert len(_sms(env).sent) == 3
    reminder = env.read("CommunicationRequest", request_id(task_id, "reminder"))
    assert reminder["category"][0]["coding"][0]["code"] == "reminder"
    assert reminder["payload"] == [{"contentString": "reminder"}]
    env.clock.advance(hours=30)
    assert env.journey.scheduler.tick().requests_created == []
    assert len(_sms(env).sent) == 3
    assert env.bodies("CommunicationRequest", subject=f"Patient/{answered_pid}")[0]["status"] == "completed"
    assert len(env.bodies("CommunicationRequest", subject=f"Patient/{answered_pid}")) == 1


def _scheduled_second(env: Env) -> tuple[str, str]:
    pid = env.create("Patient", patient(mobile="+4798765432"))
    env.create("ServiceRequest", weekly_plan(pid, authored=MONDAY_0800 - timedelta(hours=1)))
    (task_id,) = env.journey.scheduler.tick().tasks_created
    return pid, task_id


def test_a_retryable_failure_is_retried_after_backoff(make_env: EnvFactory) -> None:
    env = make_env(message_retry_base_s=60)
    _sms_transport = RecordingTransport(
        "fake-sms", failures=[SendError("gateway busy", code="20429", retryable=True, retry_after=90)]
    )
    env.transports["sms"] = _sms_transport
    env.journey = env.new_journey()
    pid, _ = _scheduled(env)
    assert _sms_transport.calls == 1 and _sms_transport.sent == []
    (failed,) = _communications(env, pid)
    assert failed["status"] == "not-done" and "gateway busy" in failed["statusReason"]["text"]
    env.clock.advance(seconds=61)  # the base delay has passed, but the gateway asked for 90 s
    env.journey.scheduler.tick()
    assert _sms_transport.calls == 1
    env.clock.advance(seconds=30)
    env.journey.scheduler.tick()
    assert _sms_transport.calls == 2 and len(_sms_transport.sent) == 1
    statuses = [c["status"] for c in _communications(env, pid)]
    assert statuses == ["not-done", "in-progress"]
    (request,) = env.bodies("CommunicationRequest", subject=f"Patient/{pid}")
    assert request["status"] == "completed"


def test_a_permanent_failure_revokes_the_request(make_env: EnvFactory) -> None:
    env = make_env()
    env.transports["sms"] = RecordingTransport(
        "fake-sms", failures=[SendError("Invalid 'To' Phone Number", code="21211", retryable=False)]
    )
    env.journey = env.new_journey()
    pid, _ = _scheduled(env)
    (request,) = env.bodies("CommunicationRequest", subject=f"Patient/{pid}")
    assert request["status"] == "revoked"
    assert "21211" in request["statusReason"]["text"]
    env.clock.advance(hours=2)
    env.journey.scheduler.tick()
    assert len(_communications(env, pid)) == 1


def test_a_lost_gateway_answer_is_never_sent_again(make_env: EnvFactory) -> None:
    """The request reached the gateway but its answer was lost (a read timeout): the patient may have
    the message, so it is not retried; the Communication says ``unknown`` until a delivery report."""
    env = make_env(message_retry_base_s=10)
    lost = RecordingTransport(
        "fake-sms", failures=[SendError("Twilio's answer was lost", code=OUTCOME_UNKNOWN, retryable=False)]
    )
    env.transports["sms"] = lost
    env.journey = env.new_journey()
    pid, _ = _scheduled(env)
    (comm,) = _communications(env, pid)
    assert comm["status"] == "unknown" and "not sent again" in comm["note"][-1]["text"]
    (request,) = env.bodies("CommunicationRequest", subject=f"Patient/{pid}")
    assert request["status"] == "completed"
    env.clock.advance(hours=2)
    env.journey.scheduler.tick()
    assert lost.calls == 1 and len(_communications(env, pid)) == 1


def test_attempts_stop_at_the_maximum(make_env: EnvFactory) -> None:
    env = make_env(message_max_attempts=3, message_retry_base_s=10)
    failing = RecordingTransport("fake-sms", failures=[SendError("down", retryable=True) for _ in range(5)])
    env.transports["sms"] = failing
    env.journey = env.new_journey()
    pid, _ = _scheduled(env)
    for _ in range(5):
        env.clock.advance(minutes=5)
        env.journey.scheduler.tick()
    assert failing.calls == 3
    (request,) = env.bodies("CommunicationRequest", subject=f"Patient/{pid}")
    assert request["status"] == "revoked" and "after 3 attempts" in request["statusReason"]["text"]


def test_an_unsubscribed_recipient_is_recorded_as_opted_out(make_env: EnvFactory) -> None:
    env = make_env()
    env.transports["sms"] = RecordingTransport(
        "fake-sms",
        failures=[
            SendError(
                "Attempt to send to unsubscribed recipient", code="21610", retryable=False, opted_out=True
            )
        ],
    )
    env.journey = env.new_journey()
    pid, _ = _scheduled(env)
    body = env.read("Patient", pid)
    assert {"url": EXT_MESSAGING_OPT_OUT, "valueCode": "sms"} in body["extension"]
    (request,) = env.bodies("CommunicationRequest", subject=f"Patient/{pid}")
    assert request["status"] == "revoked" and "opted out" in request["statusReason"]["text"]


class _Crash(RuntimeError):
    pass


def test_a_crash_between_sending_and_recording_never_sends_twice(
    make_env: EnvFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env()
    original = Dispatcher._record_receipt

    def crash(self: Dispatcher, *args: Any, **kwargs: Any) -> Any:
        raise _Crash("the process died here")

    monkeypatch.setattr(Dispatcher, "_record_receipt", crash)
    pid, _ = _scheduled(env)
    transport = _sms(env)
    assert transport.calls == 1
    (comm,) = _communications(env, pid)
    assert comm["status"] == "preparation"
    monkeypatch.setattr(Dispatcher, "_record_receipt", original)
    # A restarted server, soon and much later: the attempt is never repeated.
    restarted = env.new_journey()
    env.clock.advance(seconds=30)
    restarted.scheduler.tick()
    assert transport.calls == 1
    env.clock.advance(hours=1)
    restarted.scheduler.tick()
    env.clock.advance(hours=1)
    restarted.scheduler.tick()
    assert transport.calls == 1
    (comm,) = _communications(env, pid)
    assert comm["status"] == "unknown"
    assert "not sent again" in comm["note"][0]["text"]
    assert [r.state for r in env.rows(MESSAGE_ATTEMPT)] == ["unknown"]


def test_twilio_answering_500_then_201_delivers_one_message_after_one_retry(make_env: EnvFactory) -> None:
    with FakeTwilio() as gateway:
        sms = TwilioSms(
            gateway.account_sid, gateway.auth_token, sender="+4759000000", api_base=gateway.base_url
        )
        env = make_env(transports={"sms": sms}, message_retry_base_s=60)
        gateway.fail_next(500, 20500)
        pid, _ = _scheduled(env)
        assert len(gateway.requests) == 1 and gateway.messages == []
        env.clock.advance(seconds=61)
        env.journey.scheduler.tick()
        env.clock.advance(hours=1)
        env.journey.scheduler.tick()
        sms.close()
    assert len(gateway.requests) == 2
    (message,) = gateway.messages
    assert message["to"] == "+4791234567"
    comms = _communications(env, pid)
    assert [c["status"] for c in comms] == ["not-done", "in-progress"]
    assert comms[1]["identifier"][0] == {
        "system": "http://fhir-norse.org/fhir/message-id/twilio",
        "value": message["sid"],
    }
