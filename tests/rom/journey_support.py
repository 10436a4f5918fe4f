"""Builders for the scheduler, invitation and messaging tests: a controllable clock, a recording
transport, the journey on a test database, patients and monitoring plans."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from fhir_norse.auth.caller import Caller
from fhir_norse.canonicals import CS_CONTEXT, EXT_ANSWER_WINDOW, EXT_BEFORE_APPOINTMENT, questionnaire
from fhir_norse.compose import Journey, build_journey, build_service
from fhir_norse.config import Settings
from fhir_norse.messaging.base import OutgoingMessage, SendError, SendReceipt, Transport
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.repository import loads
from fhir_norse.server.search.typed import Where

OPERATOR = RequestContext(caller=Caller.operator(), base_url="urn:test")
PHQ9 = questionnaire("phq9") + "|1.0.0"
# Monday 2 March 2026, 08:00 in Oslo (UTC+1 in winter).
MONDAY_0800 = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def set(self, moment: datetime) -> datetime:
        with self._lock:
            self.now = moment
        return moment

    def advance(self, **delta: float) -> datetime:
        return self.set(self.now + timedelta(**delta))


@dataclass
class RecordingTransport:
    """A Transport double: records every message; ``failures`` are raised first, one per call."""

    name: str = "fake"
    sent: list[OutgoingMessage] = field(default_factory=list)
    calls: int = 0
    failures: list[SendError] = field(default_factory=list)

    def send(self, message: OutgoingMessage) -> SendReceipt:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(message)
        return SendReceipt(provider=self.name, message_id=f"{self.name}-{self.calls}", status="queued")


@dataclass
class Env:
    service: FhirService
    journey: Journey
    settings: Settings
    clock: Clock
    transports: dict[str, Transport]

    def new_journey(self, **overrides: Any) -> Journey:
        """A second journey on the same database (another worker, or the server after a restart)."""
        return build_journey(
            self.settings,
            self.service,
            transports=overrides.get("transports", self.transports),
            now=self.clock,
        )

    def bodies(self, res_type: str, **references: str) -> list[dict[str, Any]]:
        with self.service.session(OPERATOR) as repo:
            return [loads(s.body_text) for s in repo.find(Where(res_type, references=references), 10_000)]

    def read(self, res_type: str, res_id: str) -> dict[str, Any]:
        with self.service.session(OPERATOR) as repo:
            stored = repo.get(res_type, res_id)
            assert stored is not None, f"{res_type}/{res_id}"
            return loads(stored.body_text)

    def create(self, res_type: str, body: dict[str, Any]) -> str:
        with self.service.session(OPERATOR) as repo:
            return repo.create(res_type, body).stored.res_id

    def update(self, res_type: str, res_id: str, changes: Mapping[str, Any]) -> None:
        body = {k: v for k, v in self.read(res_type, res_id).items() if k != "meta"} | dict(changes)
        with self.service.session(OPERATOR) as repo:
            repo.update(res_type, res_id, body)

    def delete(self, res_type: str, res_id: str) -> None:
        with self.service.session(OPERATOR) as repo:
            repo.delete(res_type, res_id)

    def rows(self, table: sa.Table) -> list[Any]:
        with self.service.storage.engine.connect() as conn:
            return list(conn.execute(sa.select(table)))


def settings_for(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "base_url": "http://testserver/fhir",
        "patient_base_url": "https://survey.example.no",
        "mode": "development",
        "publish_content": False,
        "messaging_quiet_hours": "",
        "scheduler_interval_s": 0,
        "db_statistics_interval_s": 0,
        "clinic_name": "Testklinikken",
    }
    return Settings(**(values | overrides))


@dataclass
class EnvFactory:
    database_url: str
    made: list[Env] = field(default_factory=list)

    def __call__(
        self,
        *,
        start: datetime = MONDAY_0800,
        transports: dict[str, Transport] | None = None,
        **overrides: Any,
    ) -> Env:
        settings = settings_for(self.database_url, **overrides)
        service = build_service(settings)
        clock = Clock(start)
        chosen: dict[str, Transport] = (
            transports
            if transports is not None
            else {"sms": RecordingTransport("fake-sms"), "email": RecordingTransport("fake-email")}
        )
        env = Env(
            service, build_journey(settings, service, transports=chosen, now=clock), settings, clock, chosen
        )
        self.made.append(env)
        return env

    def close(self) -> None:
        for env in self.made:
            env.journey.scheduler.stop()
            env.service.storage.engine.dispose()


def env_factory(database_url: str) -> Iterator[EnvFactory]:
    factory = EnvFactory(database_url)
    try:
        yield factory
    finally:
        factory.close()


def patient(
    *,
    mobile: str | None = "+4791234567",
    email: str | None = None,
    language: str | None = None,
    opt_out: str | None = None,
    telecom: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Patient", "name": [{"family": "Nordmann", "given": ["Kari"]}]}
    points = list(telecom or [])
    if mobile:
        points.append({"system": "phone", "use": "mobile", "value": mobile, "rank": 1})
    if email:
        points.append({"system": "email", "value": email, "rank": 2})
    if points:
        body["telecom"] = points
    if language:
        body["communication"] = [
            {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": language}]}, "preferred": True}
        ]
    if opt_out:
        body["extension"] = [
            {"url": "http://fhir-norse.org/fhir/StructureDefinition/messaging-opt-out", "valueCode": opt_out}
        ]
    return body


def weekly_plan(
    patient_id: str, *, authored: datetime, window_hours: float | None = None, context: str = "weekly"
) -> dict[str, Any]:
    """A plan ServiceRequest: PHQ-9 every Monday 08:00 (Oslo)."""
    body: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "plan",
        "instantiatesCanonical": [PHQ9],
        "code": {"coding": [{"system": CS_CONTEXT, "code": context}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": authored.isoformat(),
        "occurrenceTiming": {
            "repeat": {
                "dayOfWeek": ["mon"],
                "timeOfDay": ["08:00:00"],
                "frequency": 1,
                "period": 1,
                "periodUnit": "wk",
            }
        },
    }
    if window_hours is not None:
        body["extension"] = [
            {
                "url": EXT_ANSWER_WINDOW,
                "valueDuration": {
                    "value": window_hours,
                    "unit": "h",
                    "system": "http://unitsofmeasure.org",
                    "code": "h",
                },
            }
        ]
    return body


def appointment_plan(patient_id: str, *, authored: datetime, hours_before: float = 48) -> dict[str, Any]:
    """A plan ServiceRequest: PHQ-9 before each appointment."""
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "plan",
        "instantiatesCanonical": [PHQ9],
        "code": {"coding": [{"system": CS_CONTEXT, "code": "weekly"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": authored.isoformat(),
        "extension": [
            {
                "url": EXT_BEFORE_APPOINTMENT,
                "valueDuration": {
                    "value": hours_before,
                    "unit": "h",
                    "system": "http://unitsofmeasure.org",
                    "code": "h",
                },
            }
        ],
    }


def _hours(url: str, value: float) -> dict[str, Any]:
    return {
        "url": url,
        "valueDuration": {"value": value, "unit": "h", "system": "http://unitsofmeasure.org", "code": "h"},
    }


def care_plan(
    patient_id: str,
    *activities: dict[str, Any],
    start: datetime,
    end: datetime | None = None,
    status: str = "active",
    episode: str | None = None,
) -> dict[str, Any]:
    """A monitoring CarePlan (fhir_norse/rom/scheduler.py) with ``activities`` (see :func:`weekly_activity`,
    :func:`before_appointment_activity`)."""
    body: dict[str, Any] = {
        "resourceType": "CarePlan",
        "status": status,
        "intent": "plan",
        "category": [{"text": "Routine outcome monitoring"}],
        "title": "Monitoring plan",
        "subject": {"reference": f"Patient/{patient_id}"},
        "period": {"start": start.isoformat(), **({"end": end.isoformat()} if end else {})},
        "activity": [{"detail": detail} for detail in activities],
    }
    if episode is not None:
        body["extension"] = [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/workflow-episodeOfCare",
                "valueReference": {"reference": episode},
            }
        ]
    return body


def weekly_activity(
    questionnaire: str = PHQ9, *, window_hours: float | None = None, context: str = "weekly"
) -> dict[str, Any]:
    """CarePlan.activity.detail: ``questionnaire`` every Monday 08:00 (Oslo)."""
    detail: dict[str, Any] = {
        "kind": "Task",
        "instantiatesCanonical": [questionnaire],
        "code": {"coding": [{"system": CS_CONTEXT, "code": context}]},
        "status": "scheduled",
        "scheduledTiming": {
            "repeat": {"dayOfWeek": ["mon"], "timeOfDay": ["08:00:00"], "period": 1, "periodUnit": "wk"}
        },
    }
    if window_hours is not None:
        detail["extension"] = [_hours(EXT_ANSWER_WINDOW, window_hours)]
    return detail


def before_appointment_activity(
    questionnaire: str = PHQ9, *, hours_before: float = 48, context: str = "weekly"
) -> dict[str, Any]:
    """CarePlan.activity.detail: ``questionnaire`` in the ``hours_before`` hours before each Appointment."""
    return {
        "extension": [_hours(EXT_BEFORE_APPOINTMENT, hours_before)],
        "kind": "Task",
        "instantiatesCanonical": [questionnaire],
        "code": {"coding": [{"system": CS_CONTEXT, "code": context}]},
        "status": "scheduled",
    }


def appointment(
    patient_id: str,
    start: datetime,
    *,
    status: str = "booked",
    minutes: int = 45,
    patient_status: str = "accepted",
) -> dict[str, Any]:
    """An Appointment of the patient with a practitioner (R4: participant.actor, start, end)."""
    return {
        "resourceType": "Appointment",
        "status": status,
        "start": start.isoformat(),
        "end": (start + timedelta(minutes=minutes)).isoformat(),
        "participant": [
            {"actor": {"reference": f"Patient/{patient_id}"}, "status": patient_status},
            {"actor": {"display": "Behandler"}, "status": "accepted"},
        ],
    }
