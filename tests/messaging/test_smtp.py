"""The SMTP transport against a real local SMTP server (aiosmtpd) requiring STARTTLS and AUTH."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import pytest

from fhir_norse.messaging.base import OutgoingMessage, SendError
from fhir_norse.messaging.smtp import SmtpEmail
from tests.support.smtp_server import LocalSmtp

SENDER = "Poliklinikk Sørbyen <skjema@klinikk.example.no>"
PATIENT = "pasient@example.no"
SUBJECT = "Skjema fra Poliklinikk Sørbyen"
BODY = (
    "Hei!\n\nÅpne lenken: https://skjema.example.no/p/abc\n\n"
    "Vennlig hilsen\nPoliklinikk Sørbyen \N{EN DASH} æøå"
)
NOW = datetime(2025, 3, 14, 7, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalSmtp]:
    with LocalSmtp() as smtp:
        yield smtp


@pytest.fixture
def smtp(server: LocalSmtp) -> Iterator[LocalSmtp]:
    server.messages.clear()
    server.envelopes.clear()
    yield server


def _transport(server: LocalSmtp, **changes: object) -> SmtpEmail:
    options: dict[str, object] = {
        "username": server.username,
        "password": server.password,
        "ca_file": server.ca_file,
        "timeout": 5.0,
        "now": lambda: NOW,
    }
    options.update(changes)
    return SmtpEmail(server.host, server.port, SENDER, **options)  # type: ignore[arg-type]


def _message(to: str = PATIENT) -> OutgoingMessage:
    return OutgoingMessage(channel="email", to=to, body=BODY, subject=SUBJECT, reference="comm-7")


def _failure(transport: SmtpEmail, message: OutgoingMessage | None = None) -> SendError:
    with pytest.raises(SendError) as caught:
        transport.send(message or _message())
    return caught.value


def test_delivered_over_starttls_with_auth(smtp: LocalSmtp) -> None:
    receipt = _transport(smtp).send(_message())

    assert (receipt.provider, receipt.status) == ("smtp", "sent")
    [(mail_from, recipients, over_tls)] = smtp.envelopes
    assert (mail_from, recipients, over_tls) == ("skjema@klinikk.example.no", [PATIENT], True)
    [received] = smtp.messages
    assert received["Message-ID"] == receipt.message_id
    assert receipt.message_id.startswith("<") and receipt.message_id.endswith("@klinikk.example.no>")
    assert received["From"] == SENDER
    assert received["To"] == PATIENT
    assert received["Subject"] == SUBJECT
    assert parsedate_to_datetime(received["Date"]) == NOW
    assert received.get_content_type() == "text/plain"
    assert received.get_content_charset() == "utf-8"
    # 7-bit safe on the wire: no server needs 8BITMIME for it.
    assert received["Content-Transfer-Encoding"] == "quoted-printable"
    assert received.get_content().rstrip("\n") == BODY


def test_each_message_gets_its_own_message_id(smtp: LocalSmtp) -> None:
    transport = _transport(smtp)
    first, second = transport.send(_message()), transport.send(_message())
    assert first.message_id != second.message_id
    assert len(smtp.messages) == 2


def test_a_wrong_password_is_permanent(smtp: LocalSmtp) -> None:
    error = _failure(_transport(smtp, password="wrong"))
    assert (error.code, error.retryable) == ("535", False)
    assert smtp.messages == []


def test_a_server_certificate_that_does_not_verify_is_refused(smtp: LocalSmtp) -> None:
    # Without the test CA the system's trust store does not know the server's certificate.
    error = _failure(_transport(smtp, ca_file=None))
    assert (error.code, error.retryable) == ("tls", False)
    assert smtp.messages == []


def test_a_4xx_reply_is_retryable_and_a_5xx_is_not(smtp: LocalSmtp) -> None:
    transport = _transport(smtp)
    smtp.reject_next("451 4.3.0 Try again later")
    transient = _failure(transport)
    smtp.reject_next("554 5.7.1 Rejected")
    permanent = _failure(transport)
    receipt = transport.send(_message())

    assert (transient.code, transient.retryable) == ("451", True)
    assert (permanent.code, permanent.retryable) == ("554", False)
    assert [m["Message-ID"] for m in smtp.messages] == [receipt.message_id]


def test_an_unreachable_server_is_retryable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = _failure(SmtpEmail("127.0.0.1", port, SENDER, timeout=2.0))
    assert (error.code, error.retryable) == ("network", True)


def test_sms_is_not_smtps(smtp: LocalSmtp) -> None:
    error = _failure(_transport(smtp), OutgoingMessage(channel="sms", to="+4791234567", body="x"))
    assert error.retryable is False
    assert smtp.messages == []


def test_the_password_stays_out_of_errors_and_repr(smtp: LocalSmtp) -> None:
    transport = _transport(smtp, password="wrong-but-secret")
    error = _failure(transport)
    for text in (str(error), repr(error), repr(transport)):
        assert "wrong-but-secret" not in text


def test_a_server_without_starttls_is_refused_and_nothing_is_sent() -> None:
    with LocalSmtp(starttls=False) as plain:
        error = _failure(_transport(plain))
        assert (error.code, error.retryable) == ("starttls-unavailable", False)
        assert plain.messages == []

        # Turned off on purpose (a relay on the same host), the same server is used.
        receipt = _transport(plain, starttls=False).send(_message())
        [(_, _, over_tls)] = plain.envelopes
        assert over_tls is False
        assert [m["Message-ID"] for m in plain.messages] == [receipt.message_id]
