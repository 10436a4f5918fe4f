"""The Twilio adapter against a local server that follows Twilio's Messages API contract."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from fhir_norse.messaging.base import DeliveryReport, OutgoingMessage, SendError
from fhir_norse.messaging.twilio import (
    TwilioSms,
    parse_retry_after,
    parse_status_callback,
    twilio_signature,
    verify_twilio_signature,
)
from tests.support.fake_twilio import FakeTwilio

ACCOUNT = "AC" + "5" * 32
TOKEN = "the-auth-token-0123456789abcdef"
SENDER = "+4759440000"
PATIENT = "+4791234567"
BODY = "Klinikk Nord ber deg fylle ut et skjema: https://skjema.example.no/p/abc"


@pytest.fixture
def gateway() -> Iterator[FakeTwilio]:
    with FakeTwilio(ACCOUNT, TOKEN) as gw:
        yield gw


@pytest.fixture
def sms(gateway: FakeTwilio) -> Iterator[TwilioSms]:
    with TwilioSms(ACCOUNT, TOKEN, sender=SENDER, api_base=gateway.base_url, timeout=5.0) as transport:
        yield transport


def _message(to: str = PATIENT, **changes: Any) -> OutgoingMessage:
    fields: dict[str, Any] = {"channel": "sms", "to": to, "body": BODY, "reference": "comm-1"}
    fields.update(changes)
    return OutgoingMessage(**fields)


def _failure(transport: TwilioSms, message: OutgoingMessage) -> SendError:
    with pytest.raises(SendError) as caught:
        transport.send(message)
    return caught.value


def test_a_message_is_created_with_twilios_fields(gateway: FakeTwilio, sms: TwilioSms) -> None:
    callback = "https://skjema.example.no/messaging/twilio/status/comm-1"
    receipt = sms.send(_message(status_callback=callback))

    assert receipt.provider == "twilio"
    assert receipt.status == "queued"
    assert receipt.message_id.startswith("SM") and len(receipt.message_id) == 34
    assert gateway.messages == [
        {
            "sid": receipt.message_id,
            "to": PATIENT,
            "from": SENDER,
            "body": BODY,
            "status_callback": callback,
            "messaging_service_sid": None,
            "status": "queued",
        }
    ]
    assert gateway.requests == [{"To": PATIENT, "From": SENDER, "Body": BODY, "StatusCallback": callback}]


def test_a_messaging_service_picks_the_sender(gateway: FakeTwilio) -> None:
    service = "MG" + "7" * 32
    with TwilioSms(ACCOUNT, TOKEN, messaging_service_sid=service, api_base=gateway.base_url) as transport:
        receipt = transport.send(_message())
    assert receipt.status == "accepted"
    assert gateway.requests == [{"To": PATIENT, "MessagingServiceSid": service, "Body": BODY}]


def test_wrong_credentials_are_a_permanent_20003(gateway: FakeTwilio) -> None:
    with TwilioSms(ACCOUNT, "not-the-token", sender=SENDER, api_base=gateway.base_url) as transport:
        error = _failure(transport, _message())
    assert (error.code, error.retryable, error.opted_out) == ("20003", False, False)
    assert gateway.messages == [] and gateway.requests == []


def test_500_then_201_is_one_retryable_error_then_one_message(gateway: FakeTwilio, sms: TwilioSms) -> None:
    gateway.fail_next(500, 20500)

    error = _failure(sms, _message())
    assert error.retryable and error.code == "20500" and error.retry_after is None
    receipt = sms.send(_message())

    assert len(gateway.requests) == 2
    assert [m["sid"] for m in gateway.messages] == [receipt.message_id]


def test_429_is_retryable_after_the_time_twilio_asks_for(gateway: FakeTwilio, sms: TwilioSms) -> None:
    gateway.fail_next(429, 20429, retry_after=30)
    error = _failure(sms, _message())
    assert (error.code, error.retryable, error.retry_after) == ("20429", True, 30.0)
    assert gateway.messages == []


def test_a_recipient_who_answered_stop_is_opted_out(gateway: FakeTwilio, sms: TwilioSms) -> None:
    gateway.opt_out(PATIENT)
    error = _failure(sms, _message())
    assert (error.code, error.retryable, error.opted_out) == ("21610", False, True)
    assert gateway.messages == []


@pytest.mark.parametrize(
    ("to", "code"),
    [("", "21604"), ("91234567", "21211"), ("+47 912 34 567", "21211")],
    ids=["missing-to", "not-e164", "spaces"],
)
def test_a_bad_recipient_is_permanent(gateway: FakeTwilio, sms: TwilioSms, to: str, code: str) -> None:
    error = _failure(sms, _message(to=to))
    assert (error.code, error.retryable, error.opted_out) == (code, False, False)
    assert gateway.messages == []


def test_not_a_mobile_number_is_permanent(gateway: FakeTwilio, sms: TwilioSms) -> None:
    gateway.fail_next(400, 21614)
    error = _failure(sms, _message())
    assert (error.code, error.retryable) == ("21614", False)


def test_an_unreachable_gateway_is_retryable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port any more: the connection is refused.
    with TwilioSms(
        ACCOUNT, TOKEN, sender=SENDER, api_base=f"http://127.0.0.1:{port}", timeout=2.0
    ) as transport:
        error = _failure(transport, _message())
    assert (error.code, error.retryable) == ("network", True)


def test_a_lost_answer_is_never_retried() -> None:
    """The request was written but no answer came: Twilio may have taken it, and a retry could text
    the patient twice (the Messages API has no idempotency key)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # accepts the connection in the backlog, never answers
        port = silent.getsockname()[1]
        with TwilioSms(
            ACCOUNT, TOKEN, sender=SENDER, api_base=f"http://127.0.0.1:{port}", timeout=0.2
        ) as transport:
            error = _failure(transport, _message())
    assert (error.code, error.retryable) == ("outcome-unknown", False)


def test_email_is_not_twilios(sms: TwilioSms) -> None:
    error = _failure(sms, OutgoingMessage(channel="email", to="a@example.no", body="x"))
    assert error.retryable is False


def test_a_sender_is_required() -> None:
    with pytest.raises(ValueError, match="sender"):
        TwilioSms(ACCOUNT, TOKEN)


def test_neither_the_body_nor_the_token_reaches_the_log(
    gateway: FakeTwilio, sms: TwilioSms, caplog: pytest.LogCaptureFixture
) -> None:
    gateway.fail_next(500, 20500)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(SendError) as caught:
            sms.send(_message())
        sms.send(_message())
    assert caplog.records, "the adapter logs what it did"
    for text in (caplog.text, str(caught.value), repr(caught.value), repr(sms)):
        assert TOKEN not in text
        assert BODY not in text and "skjema.example.no/p/abc" not in text


def test_the_client_made_here_is_closed_and_a_given_one_is_not(gateway: FakeTwilio) -> None:
    own = TwilioSms(ACCOUNT, TOKEN, sender=SENDER, api_base=gateway.base_url)
    own.send(_message())
    own.close()
    assert own._client.is_closed

    with httpx.Client(timeout=5.0) as given:
        with TwilioSms(ACCOUNT, TOKEN, sender=SENDER, api_base=gateway.base_url, client=given) as borrowed:
            borrowed.send(_message())
        assert not given.is_closed
    assert len(gateway.messages) == 2


def test_retry_after_as_seconds_or_http_date() -> None:
    now = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("Fri, 14 Mar 2025 12:01:30 GMT", now) == 90.0
    assert parse_retry_after("Fri, 14 Mar 2025 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


# --- X-Twilio-Signature ------------------------------------------------------------------------

# The worked example of https://www.twilio.com/docs/usage/security#validating-requests
DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+12349013030",
    "Digits": "1234",
    "From": "+12349013030",
    "To": "+18005551212",
}
DOC_TOKEN = "12345"
DOC_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def test_the_documented_signature_vector() -> None:
    assert twilio_signature(DOC_URL, DOC_PARAMS, DOC_TOKEN) == DOC_SIGNATURE
    assert verify_twilio_signature(DOC_URL, DOC_PARAMS, DOC_SIGNATURE, DOC_TOKEN)


@pytest.mark.parametrize(
    ("url", "params", "signature", "token"),
    [
        (DOC_URL, {**DOC_PARAMS, "Digits": "1235"}, DOC_SIGNATURE, DOC_TOKEN),
        (DOC_URL, {**DOC_PARAMS, "Extra": "1"}, DOC_SIGNATURE, DOC_TOKEN),
        (DOC_URL, {k: v for k, v in DOC_PARAMS.items() if k != "To"}, DOC_SIGNATURE, DOC_TOKEN),
        ("https://mycompany.com/myapp.php?foo=1&bar=3", DOC_PARAMS, DOC_SIGNATURE, DOC_TOKEN),
        ("https://evil.example/myapp.php?foo=1&bar=2", DOC_PARAMS, DOC_SIGNATURE, DOC_TOKEN),
        ("http://mycompany.com/myapp.php?foo=1&bar=2", DOC_PARAMS, DOC_SIGNATURE, DOC_TOKEN),
        (DOC_URL, DOC_PARAMS, DOC_SIGNATURE, "54321"),
        (DOC_URL, DOC_PARAMS, "", DOC_TOKEN),
        (DOC_URL, DOC_PARAMS, DOC_SIGNATURE[:-2], DOC_TOKEN),
    ],
    ids=["param", "added-param", "dropped-param", "query", "host", "scheme", "token", "empty", "truncated"],
)
def test_a_tampered_request_is_rejected(url: str, params: dict[str, str], signature: str, token: str) -> None:
    assert not verify_twilio_signature(url, params, signature, token)


def test_the_default_port_may_be_written_or_left_off() -> None:
    with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2"
    assert verify_twilio_signature(with_port, DOC_PARAMS, DOC_SIGNATURE, DOC_TOKEN)
    signed_with_port = twilio_signature(with_port, DOC_PARAMS, DOC_TOKEN)
    assert verify_twilio_signature(DOC_URL, DOC_PARAMS, signed_with_port, DOC_TOKEN)
    assert not verify_twilio_signature(
        "https://mycompany.com:8443/myapp.php?foo=1&bar=2", DOC_PARAMS, DOC_SIGNATURE, DOC_TOKEN
    )


# --- status callbacks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "delivered"),
    [
        ("queued", None),
        ("sending", None),
        ("sent", None),
        ("delivered", True),
        ("read", True),
        ("undelivered", False),
        ("failed", False),
    ],
)
def test_status_callback_outcomes(status: str, delivered: bool | None) -> None:
    report = parse_status_callback({"MessageSid": "SM1", "MessageStatus": status, "AccountSid": ACCOUNT})
    assert (report.message_id, report.status, report.delivered, report.error_code) == (
        "SM1",
        status,
        delivered,
        None,
    )


def test_status_callback_error_code_and_legacy_names() -> None:
    report = parse_status_callback({"SmsSid": "SM2", "SmsStatus": "undelivered", "ErrorCode": "30003"})
    assert (report.message_id, report.delivered, report.error_code) == ("SM2", False, "30003")
    assert (
        parse_status_callback({"MessageSid": "SM3", "MessageStatus": "sent", "ErrorCode": ""}).error_code
        is None
    )


@pytest.mark.parametrize("params", [{}, {"MessageSid": "SM1"}, {"MessageStatus": "delivered"}])
def test_status_callback_without_sid_or_status(params: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        parse_status_callback(params)


class _Receiver:
    """A webhook endpoint on loopback that checks the signature the way our route will."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.reports: list[DeliveryReport] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                params = {k: v[0] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
                url = receiver.origin + self.path
                ok = verify_twilio_signature(
                    url, params, self.headers.get("X-Twilio-Signature", ""), receiver.token
                )
                if ok:
                    receiver.reports.append(parse_status_callback(params))
                self.send_response(204 if ok else 403)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.origin}/messaging/twilio/status/comm-1"

    def __enter__(self) -> _Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_signed_delivery_report_round_trip(gateway: FakeTwilio, sms: TwilioSms) -> None:
    with _Receiver(TOKEN) as receiver:
        receipt = sms.send(_message(status_callback=receiver.url))
        assert gateway.deliver(receipt.message_id, "delivered") == 204
        assert gateway.deliver(receipt.message_id, "undelivered") == 204
    assert [(r.message_id, r.status, r.delivered, r.error_code) for r in receiver.reports] == [
        (receipt.message_id, "delivered", True, None),
        (receipt.message_id, "undelivered", False, "30003"),
    ]


def test_a_report_signed_with_another_token_is_refused(sms: TwilioSms) -> None:
    with FakeTwilio(ACCOUNT, "someone-elses-token") as impostor, _Receiver(TOKEN) as receiver:
        with TwilioSms(ACCOUNT, "someone-elses-token", sender=SENDER, api_base=impostor.base_url) as other:
            receipt = other.send(_message(status_callback=receiver.url))
        assert impostor.deliver(receipt.message_id) == 403
    assert receiver.reports == []
