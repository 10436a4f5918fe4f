"""The development transport: messages go to the log instead of a gateway.

``make serve`` (development mode) uses it for SMS and e-mail, so a developer finds the patient's
personal link in the server's output. It writes the whole body, link included, which is why it
must never be the transport of a production site (the settings choose "off" there by default).
"""

from __future__ import annotations

import logging
import threading
import uuid

from fhir_norse.messaging.base import Channel, OutgoingMessage, SendReceipt

MESSAGE_LOG = logging.getLogger("fhir_norse.messages")

KEEP_LAST = 100


class LogTransport:
    """Writes each message to the ``fhir_norse.messages`` logger at INFO and keeps the last 100."""

    name = "log"

    def __init__(self, channel: Channel) -> None:
        self.channel: Channel = channel
        self.sent: list[OutgoingMessage] = []
        self._lock = threading.Lock()

    def send(self, message: OutgoingMessage) -> SendReceipt:
        message_id = f"log-{uuid.uuid4()}"
        MESSAGE_LOG.info(
            "%s to %s (channel %s, reference %s, id %s)\nSubject: %s\n%s",
            message.channel.upper(),
            message.to,
            message.channel,
            message.reference or "-",
            message_id,
            message.subject or "-",
            message.body,
        )
        with self._lock:
            self.sent.append(message)
            # Bounded: a long-running development server must not grow without end.
            del self.sent[:-KEEP_LAST]
        return SendReceipt(provider=self.name, message_id=message_id, status="sent")
