"""The seam between the code that decides what to send and the transports that send it.

A :class:`Transport` takes one :class:`OutgoingMessage` and either returns a :class:`SendReceipt`
(the provider took the message) or raises :class:`SendError`, which says whether trying again
later can help (``retryable``), how long the provider asked us to wait (``retry_after``), and
whether the recipient has opted out at the provider (``opted_out``: never try that address again
on that channel). Delivery reports arriving later are :class:`DeliveryReport` values.

These map onto the R4 ``Communication`` the caller records per attempt
(https://hl7.org/fhir/R4/communication.html): the receipt's ``message_id`` is the provider's
identifier, and a report's ``delivered`` decides ``completed`` or ``not-done``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Channel = Literal["sms", "email"]


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message to one recipient."""

    channel: Channel
    to: str  # E.164 phone number or e-mail address
    body: str
    subject: str | None = None  # e-mail only
    reference: str = ""  # our Communication id (logged, and put in the status callback URL)
    status_callback: str | None = None  # absolute URL for delivery reports (SMS)


@dataclass(frozen=True, slots=True)
class SendReceipt:
    """The provider accepted the message."""

    provider: str  # "twilio", "smtp", "log"
    message_id: str  # the provider's id (Twilio MessageSid, SMTP Message-ID, log-<uuid>)
    status: str  # the provider's status on acceptance ("queued", "accepted", "sent")


# SendError.code when the request may have reached the provider but its answer was lost: the message
# may have been sent, so it must not be sent again (a delivery report settles it).
OUTCOME_UNKNOWN = "outcome-unknown"


class SendError(Exception):
    """The provider did not take the message.

    ``code`` is the provider's own error code where it gave one (Twilio's numeric code, the SMTP
    reply code) or a short word of ours ("network", "tls", ...). The message text never contains
    the message body or a credential, so it can be logged and stored as it is.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool,
        retry_after: float | None = None,
        opted_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after
        self.opted_out = opted_out

    def __repr__(self) -> str:
        return (
            f"SendError({self.message!r}, code={self.code!r}, retryable={self.retryable}, "
            f"retry_after={self.retry_after!r}, opted_out={self.opted_out})"
        )


class Transport(Protocol):
    """Sends one message; see the module docstring for the contract."""

    name: str

    def send(self, message: OutgoingMessage) -> SendReceipt: ...


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """A provider's later word on a message it accepted."""

    message_id: str
    status: str  # provider status: queued|sending|sent|delivered|undelivered|failed|read
    delivered: bool | None  # True delivered, False failed/undelivered, None still on its way
    error_code: str | None = None
