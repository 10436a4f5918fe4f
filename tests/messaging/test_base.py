"""The transport seam: every transport is a Transport (checked by mypy too), SendError carries its facts."""

from __future__ import annotations

from fhir_norse.messaging.base import SendError, Transport
from fhir_norse.messaging.logsink import LogTransport
from fhir_norse.messaging.smtp import SmtpEmail
from fhir_norse.messaging.twilio import TwilioSms


def test_every_transport_is_a_transport() -> None:
    with TwilioSms("AC" + "1" * 32, "token", sender="+4759440000") as twilio:
        transports: list[Transport] = [
            twilio,
            SmtpEmail("smtp.example.no", 587, "a@example.no"),
            LogTransport("sms"),
        ]
        assert [t.name for t in transports] == ["twilio", "smtp", "log"]


def test_send_error_carries_what_the_caller_decides_on() -> None:
    error = SendError("refused", code="21610", retryable=False, opted_out=True)
    assert (str(error), error.code, error.retryable, error.retry_after, error.opted_out) == (
        "refused",
        "21610",
        False,
        None,
        True,
    )
    later = SendError("busy", retryable=True, retry_after=12.5)
    assert (later.code, later.retry_after, later.opted_out) == (None, 12.5, False)
