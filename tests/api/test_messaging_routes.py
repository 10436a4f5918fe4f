"""The Twilio status webhook (SQLite and PostgreSQL): a message sent through the local Twilio stand-in,
its signed delivery report settles the Communication; bad signatures are refused; reports repeat."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.api.messaging_routes import install_messaging_routes
from fhir_norse.compose import Journey, build_journey
from fhir_norse.messaging.twilio import TwilioSms, twilio_signature
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.repository import loads
from fhir_norse.server.search.typed import Where
from tests.rom.journey_support import MONDAY_0800, OPERATOR, Clock, patient, settings_for, weekly_plan
from tests.support.fake_twilio import FakeTwilio


@dataclass
class Webhook:
    client: TestClient
    gateway: FakeTwilio
    service: FhirService
    journey: Journey
    clock: Clock
    auth_token: str

    def communications(self, pid: str) -> list[dict[str, Any]]:
        with self.service.session(OPERATOR) as repo:
            found = repo.find(Where("Communication", references={"subject": f"Patient/{pid}"}), 100)
            return [loads(s.body_text) for s in found]

    def send_one(self) -> tuple[str, dict[str, Any]]:
        """A patient invited through the gateway: (patient id, the Communication)."""
        with self.service.session(OPERATOR) as repo:
            pid = repo.create("Patient", patient()).stored.res_id
            repo.create("ServiceRequest", weekly_plan(pid, authored=MONDAY_0800 - timedelta(hours=1)))
        self.clock.set(MONDAY_0800 + timedelta(minutes=1))
        self.journey.scheduler.tick()
        (comm,) = self.communications(pid)
        return pid, comm


@pytest.fixture
def webhook(database_url: str) -> Iterator[Webhook]:
    with FakeTwilio() as gateway:
        settings = settings_for(database_url, twilio_auth_token=gateway.auth_token)
        app = create_app(settings)
        service = app.state.service
        clock = Clock(MONDAY_0800)
        sms = TwilioSms(
            gateway.account_sid, gateway.auth_token, sender="+4759000000", api_base=gateway.base_url
        )
        journey = build_journey(settings, service, transports={"sms": sms}, now=clock)
        install_messaging_routes(app, service, settings, journey.dispatcher)
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Webhook(client, gateway, service, journey, clock, gateway.auth_token)
        sms.close()
        service.storage.engine.dispose()


def test_a_delivery_report_completes_the_communication(webhook: Webhook) -> None:
    pid, comm = webhook.send_one()
    assert comm["status"] == "in-progress"
    (message,) = webhook.gateway.messages
    assert message["status_callback"] == f"https://survey.example.no/messaging/twilio/status/{comm['id']}"
    assert webhook.gateway.deliver(str(message["sid"]), "sent", client=webhook.client) == 204
    assert webhook.communications(pid)[0]["status"] == "in-progress"
    assert webhook.gateway.deliver(str(message["sid"]), "delivered", client=webhook.client) == 204
    (done,) = webhook.communications(pid)
    assert done["status"] == "completed" and done["received"]
    version = done["meta"]["versionId"]
    # Twilio repeats reports: the same one again changes nothing.
    assert webhook.gateway.deliver(str(message["sid"]), "delivered", client=webhook.client) == 204
    assert webhook.communications(pid)[0]["meta"]["versionId"] == version


def test_an_undelivered_report_marks_the_attempt_not_done(webhook: Webhook) -> None:
    pid, _ = webhook.send_one()
    (message,) = webhook.gateway.messages
    assert webhook.gateway.deliver(str(message["sid"]), "undelivered", client=webhook.client) == 204
    (comm,) = webhook.communications(pid)
    assert comm["status"] == "not-done" and "30003" in comm["statusReason"]["text"]


def test_a_bad_signature_is_refused(webhook: Webhook) -> None:
    pid, comm = webhook.send_one()
    url = f"https://survey.example.no/messaging/twilio/status/{comm['id']}"
    params = {
        "MessageSid": "SM" + "1" * 32,
        "MessageStatus": "delivered",
        "AccountSid": webhook.gateway.account_sid,
    }
    path = f"/messaging/twilio/status/{comm['id']}"
    forged = twilio_signature(url, params, "not-the-auth-token")
    assert webhook.client.post(path, data=params, headers={"X-Twilio-Signature": forged}).status_code == 403
    assert webhook.client.post(path, data=params).status_code == 403
    # Signed for another URL (the request's own Host, not the public origin): refused as well.
    other = twilio_signature(f"http://testserver{path}", params, webhook.auth_token)
    assert webhook.client.post(path, data=params, headers={"X-Twilio-Signature": other}).status_code == 403
    assert webhook.communications(pid)[0]["status"] == "in-progress"
    good = twilio_signature(url, params, webhook.auth_token)
    assert webhook.client.post(path, data=params, headers={"X-Twilio-Signature": good}).status_code == 204
    assert webhook.communications(pid)[0]["status"] == "completed"


def test_an_unknown_communication_is_404(webhook: Webhook) -> None:
    path = "/messaging/twilio/status/no-such-communication"
    params = {"MessageSid": "SM" + "2" * 32, "MessageStatus": "delivered"}
    signed = twilio_signature(f"https://survey.example.no{path}", params, webhook.auth_token)
    assert webhook.client.post(path, data=params, headers={"X-Twilio-Signature": signed}).status_code == 404


def test_a_report_settles_an_attempt_left_unknown_by_a_crash(
    webhook: Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fhir_norse.rom.invitations import Dispatcher

    def crash(self: Dispatcher, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the process died here")

    monkeypatch.setattr(Dispatcher, "_record_receipt", crash)
    pid, _ = webhook.send_one()
    monkeypatch.undo()
    webhook.clock.advance(hours=1)
    webhook.journey.scheduler.tick()
    assert webhook.communications(pid)[0]["status"] == "unknown"
    (message,) = webhook.gateway.messages
    assert webhook.gateway.deliver(str(message["sid"]), "delivered", client=webhook.client) == 204
    (settled,) = webhook.communications(pid)
    assert settled["status"] == "completed"
    assert len(webhook.gateway.requests) == 1
