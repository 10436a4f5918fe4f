"""SMS through Twilio's Programmable Messaging REST API (version 2010-04-01).

* Sending: ``POST {api_base}/2010-04-01/Accounts/{AccountSid}/Messages.json`` with HTTP Basic
  authentication (AccountSid:AuthToken) and a form-encoded body of ``To``, ``From`` or
  ``MessagingServiceSid``, ``Body`` and ``StatusCallback``; Twilio answers 201 with the Message
  resource as JSON (``sid`` "SM...", ``status`` "queued", or "accepted" through a Messaging
  Service). https://www.twilio.com/docs/messaging/api/message-resource#create-a-message-resource
* Errors come as JSON ``{code, message, more_info, status}``
  (https://www.twilio.com/docs/usage/twilios-response#response-formats-exceptions). Too many
  requests (HTTP 429, code 20429) and server errors are worth another try later, after
  ``Retry-After`` when given; any other 4xx is not. 21610 means the recipient answered STOP
  (https://www.twilio.com/docs/api/errors/21610): Twilio refuses every message to them until
  they send START, so the caller records the opt-out instead of retrying. 21211 (invalid 'To'
  number) and 21614 ('To' is not a mobile number) are permanent like every other 4xx.
* Delivery reports: Twilio POSTs ``MessageSid``, ``MessageStatus``, ``ErrorCode``, ... to the
  message's ``StatusCallback`` and signs the request in ``X-Twilio-Signature``: base64 of
  HMAC-SHA1, keyed with the AuthToken, over the full URL followed by every POST parameter,
  sorted by name, written as name then value without separators
  (https://www.twilio.com/docs/usage/security#validating-requests).

Neither the message body nor the AuthToken is ever logged or put into an exception.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from fhir_norse.messaging.base import (
    OUTCOME_UNKNOWN,
    DeliveryReport,
    OutgoingMessage,
    SendError,
    SendReceipt,
)

log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
SIGNATURE_HEADER = "X-Twilio-Signature"

# https://www.twilio.com/docs/api/errors/20429, /21610
TOO_MANY_REQUESTS = 20429
UNSUBSCRIBED_RECIPIENT = 21610

# Message statuses (https://www.twilio.com/docs/messaging/api/message-resource#message-status-values)
# that end a message's way: it arrived (read implies delivered) or it never will.
_DELIVERED = frozenset({"delivered", "read"})
_NOT_DELIVERED = frozenset({"failed", "undelivered", "canceled"})

_ERROR_TEXT_LIMIT = 200


class TwilioSms:
    """A :class:`~fhir_norse.messaging.base.Transport` sending SMS through Twilio.

    Give either ``sender`` (a Twilio phone number in E.164 or an alphanumeric sender id) or
    ``messaging_service_sid`` ("MG..."); with both, the Messaging Service is used, which picks the
    sender itself. A client passed in stays the caller's to close; otherwise :meth:`close` (or the
    ``with`` block) closes the one made here.

    A timeout after the request was written may hide a message Twilio did create (the Messages
    API has no idempotency key), so only errors before anything reached Twilio are retryable; a lost
    answer is a :class:`SendError` with code ``outcome-unknown``, never retried.
    """

    name = "twilio"

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        sender: str | None = None,
        messaging_service_sid: str | None = None,
        api_base: str = "https://api.twilio.com",
        timeout: float = 10.0,
        client: httpx.Client | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not account_sid or not auth_token:
            raise ValueError("Twilio needs an account SID and an auth token")
        if not sender and not messaging_service_sid:
            raise ValueError("Twilio needs a sender (From) or a Messaging Service SID")
        self._account_sid = account_sid
        self._auth = httpx.BasicAuth(account_sid, auth_token)
        self._sender = sender
        self._messaging_service_sid = messaging_service_sid
        self._url = (
            f"{api_base.rstrip('/')}/{API_VERSION}/Accounts/{quote(account_sid, safe='')}/Messages.json"
        )
        self._timeout = timeout
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout)
        self._now = now

    def __repr__(self) -> str:
        # The auth token stays out of every representation.
        return f"TwilioSms(account_sid={self._account_sid!r}, url={self._url!r})"

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> TwilioSms:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def send(self, message: OutgoingMessage) -> SendReceipt:
        """Create one Message resource; raise :class:`SendError` when Twilio does not take it."""
        if message.channel != "sms":
            raise SendError(f"Twilio sends SMS, not {message.channel}", code="channel", retryable=False)
        form: dict[str, str] = {"To": message.to, "Body": message.body}
        if self._messaging_service_sid:
            form["MessagingServiceSid"] = self._messaging_service_sid
        elif self._sender:
            form["From"] = self._sender
        if message.status_callback:
            form["StatusCallback"] = message.status_callback
        try:
            response = self._client.post(
                self._url,
                data=form,
                auth=self._auth,
                timeout=self._timeout,
                headers={"Accept": "application/json"},
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached Twilio: another try cannot send a second copy.
            raise SendError(
                f"Twilio could not be reached ({type(exc).__name__})", code="network", retryable=True
            ) from None
        except httpx.TransportError as exc:
            # The request may have been written and taken: with no idempotency key in the Messages
            # API, a retry could send the patient a second copy, so the attempt's outcome is unknown
            # (its delivery report, if any, settles it) and it is not retried.
            raise SendError(
                f"Twilio's answer was lost ({type(exc).__name__}); the message may have been sent",
                code=OUTCOME_UNKNOWN,
                retryable=False,
            ) from None
        if response.is_success:
            return self._receipt(response, message)
        raise self._error(response, message)

    def _receipt(self, response: httpx.Response, message: OutgoingMessage) -> SendReceipt:
        try:
            payload = response.json()
            sid = str(payload["sid"])
            status = str(payload.get("status") or "queued")
        except (ValueError, KeyError, TypeError):
            # Twilio took the message but its answer is unreadable: another try could send it
            # twice, so this is not retryable.
            raise SendError(
                f"Twilio answered {response.status_code} without a message SID",
                code="bad-response",
                retryable=False,
            ) from None
        log.info(
            "twilio accepted message %s (reference %s, status %s)", sid, message.reference or "-", status
        )
        return SendReceipt(provider=self.name, message_id=sid, status=status)

    def _error(self, response: httpx.Response, message: OutgoingMessage) -> SendError:
        payload = _json_object(response)
        raw_code = payload.get("code")
        code = str(raw_code) if raw_code is not None else None
        text = str(payload.get("message") or response.reason_phrase or "error")[:_ERROR_TEXT_LIMIT]
        status = response.status_code
        description = f"Twilio refused the message: HTTP {status}, code {code or '-'}: {text}"
        retry_after = parse_retry_after(response.headers.get("Retry-After"), self._now())
        if status == 429 or code == str(TOO_MANY_REQUESTS):
            error = SendError(
                description, code=code or str(TOO_MANY_REQUESTS), retryable=True, retry_after=retry_after
            )
        elif status >= 500:
            error = SendError(
                description, code=code or f"http-{status}", retryable=True, retry_after=retry_after
            )
        elif code == str(UNSUBSCRIBED_RECIPIENT):
            error = SendError(description, code=code, retryable=False, opted_out=True)
        else:
            error = SendError(description, code=code or f"http-{status}", retryable=False)
        log.warning(
            "twilio refused message (reference %s): HTTP %s, code %s, retryable %s",
            message.reference or "-",
            status,
            error.code,
            error.retryable,
        )
        return error


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` (delta-seconds or an HTTP-date; RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return max(seconds, 0.0)


def twilio_signature(url: str, params: Mapping[str, str], auth_token: str) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for a POST of ``params`` to ``url``."""
    data = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _url_variants(url: str) -> list[str]:
    """``url`` as given, and with its default port written out or left off.

    Twilio's own helper libraries check both, because whether the port ends up in the signed URL
    depends on how the webhook address was configured and what a proxy hands on.
    """
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    variants = [url]
    if default is None or parts.hostname is None:
        return variants
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    if parts.port is None:
        variants.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default}")))
    elif parts.port == default:
        variants.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}")))
    return variants


def verify_twilio_signature(url: str, params: Mapping[str, str], signature: str, auth_token: str) -> bool:
    """Whether ``signature`` (the ``X-Twilio-Signature`` header) signs this URL and these POST params.

    ``url`` must be the address exactly as Twilio called it (scheme, host, path and query).
    """
    if not signature or not auth_token:
        return False
    presented = signature.encode("ascii", "replace")
    # Every candidate is compared (no early exit), so timing says nothing about which one matched.
    matched = False
    for candidate in _url_variants(url):
        expected = twilio_signature(candidate, params, auth_token).encode("ascii")
        matched = hmac.compare_digest(expected, presented) or matched
    return matched


def parse_status_callback(params: Mapping[str, str]) -> DeliveryReport:
    """A delivery report from the form fields of Twilio's status callback request.

    https://www.twilio.com/docs/messaging/guides/track-outbound-message-status. Verify the
    signature first (:func:`verify_twilio_signature`). Raises ``ValueError`` when the request has
    no message SID or status. "sent" stays ``delivered=None``: where the carrier sends no receipt
    it is the last status Twilio reports.
    """
    sid = (params.get("MessageSid") or params.get("SmsSid") or "").strip()
    status = (params.get("MessageStatus") or params.get("SmsStatus") or "").strip().lower()
    if not sid or not status:
        raise ValueError("a Twilio status callback needs MessageSid and MessageStatus")
    delivered: bool | None
    if status in _DELIVERED:
        delivered = True
    elif status in _NOT_DELIVERED:
        delivered = False
    else:
        delivered = None
    error_code = (params.get("ErrorCode") or "").strip() or None
    return DeliveryReport(message_id=sid, status=status, delivered=delivered, error_code=error_code)
