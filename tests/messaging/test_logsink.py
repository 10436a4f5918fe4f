"""The development transport writes messages to the log and keeps the last hundred."""

from __future__ import annotations

import logging

import pytest

from fhir_norse.messaging.base import OutgoingMessage
from fhir_norse.messaging.logsink import KEEP_LAST, LogTransport


def test_the_message_is_logged_for_the_developer(caplog: pytest.LogCaptureFixture) -> None:
    transport = LogTransport("email")
    message = OutgoingMessage(
        channel="email",
        to="pasient@example.no",
        subject="Skjema fra Klinikk Nord",
        body="Åpne lenken: http://127.0.0.1:8000/p/abc",
        reference="comm-3",
    )
    with caplog.at_level(logging.INFO, logger="fhir_norse.messages"):
        receipt = transport.send(message)

    [record] = [r for r in caplog.records if r.name == "fhir_norse.messages"]
    assert record.levelno == logging.INFO
    text = record.getMessage()
    for part in (
        "pasient@example.no",
        "email",
        "Skjema fra Klinikk Nord",
        "http://127.0.0.1:8000/p/abc",
        "comm-3",
    ):
        assert part in text
    assert receipt.provider == "log" and receipt.status == "sent"
    assert receipt.message_id.startswith("log-") and receipt.message_id in text
    assert transport.sent == [message]


def test_only_the_last_hundred_are_kept() -> None:
    transport = LogTransport("sms")
    ids = {
        transport.send(OutgoingMessage(channel="sms", to="+4791234567", body=f"#{n}")).message_id
        for n in range(150)
    }
    assert len(ids) == 150
    assert len(transport.sent) == KEEP_LAST == 100
    assert [m.body for m in transport.sent] == [f"#{n}" for n in range(50, 150)]
