"""E-mail over SMTP (RFC 5321) with STARTTLS (RFC 3207) and SMTP AUTH (RFC 4954).

With ``starttls=True`` (the default) nothing is sent unless the server offers STARTTLS and the
TLS handshake verifies its certificate and host name, so the patient's link never crosses the
network in clear text and the password is never sent in clear. Reply codes decide what a
failure means (RFC 5321 4.2.1): 4xx is a transient failure worth another try, 5xx a permanent
one; a connection that cannot be made or breaks off is transient too.

The message is plain text in UTF-8 (quoted-printable, so it passes servers without 8BITMIME),
with ``Date`` and a ``Message-ID`` made here, which is returned as the receipt's message id.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import NoReturn

from fhir_norse.messaging.base import OutgoingMessage, SendError, SendReceipt

log = logging.getLogger(__name__)


class SmtpEmail:
    """A :class:`~fhir_norse.messaging.base.Transport` handing e-mail to an SMTP server (submission)."""

    name = "smtp"

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        *,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = True,
        ca_file: Path | None = None,
        timeout: float = 10.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not parseaddr(sender)[1]:
            raise ValueError("the SMTP sender must be an e-mail address")
        self._host = host
        self._port = port
        self._sender = sender
        self._username = username
        self._password = password or ""
        self._starttls = starttls
        self._ca_file = ca_file
        self._timeout = timeout
        self._now = now
        # Message-IDs carry the sender's domain (RFC 5322 3.6.4: unique, and the right-hand side
        # names where it was made), which also spares make_msgid a DNS lookup of our own name.
        self._msgid_domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"

    def __repr__(self) -> str:
        return f"SmtpEmail(host={self._host!r}, port={self._port}, username={self._username!r})"

    def _tls_context(self) -> ssl.SSLContext:
        # create_default_context verifies the certificate chain and the host name.
        if self._ca_file is not None:
            return ssl.create_default_context(cafile=str(self._ca_file))
        return ssl.create_default_context()

    def _compose(self, message: OutgoingMessage) -> EmailMessage:
        email = EmailMessage()
        email["From"] = self._sender
        email["To"] = message.to
        email["Subject"] = message.subject or ""
        email["Date"] = format_datetime(self._now())
        email["Message-ID"] = make_msgid(domain=self._msgid_domain)
        email.set_content(message.body, subtype="plain", charset="utf-8", cte="quoted-printable")
        return email

    def send(self, message: OutgoingMessage) -> SendReceipt:
        """Hand one message to the server; raise :class:`SendError` when it does not take it."""
        if message.channel != "email":
            raise SendError(f"SMTP sends e-mail, not {message.channel}", code="channel", retryable=False)
        if not parseaddr(message.to)[1] or "@" not in message.to:
            raise SendError("not an e-mail address", code="address", retryable=False)
        email = self._compose(message)
        message_id = str(email["Message-ID"])
        try:
            self._deliver(email)
        except SendError:
            raise
        except smtplib.SMTPRecipientsRefused as exc:
            # One recipient per message: its reply decides.
            codes = [code for code, _text in exc.recipients.values()]
            _reply_error("the recipient was refused", codes[0] if codes else 550, message)
        except smtplib.SMTPAuthenticationError as exc:
            _reply_error("the SMTP server refused the login", exc.smtp_code, message)
        except smtplib.SMTPResponseException as exc:
            _reply_error("the SMTP server refused the message", exc.smtp_code, message)
        except smtplib.SMTPNotSupportedError:
            raise SendError(
                "the SMTP server does not support a command needed (AUTH)",
                code="unsupported",
                retryable=False,
            ) from None
        except ssl.SSLError as exc:
            # A certificate that does not verify is a configuration matter, not a passing fault.
            raise SendError(
                f"TLS with the SMTP server failed ({exc.reason or type(exc).__name__})",
                code="tls",
                retryable=False,
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise SendError(
                f"the SMTP server could not be reached ({type(exc).__name__})", code="network", retryable=True
            ) from None
        log.info("smtp accepted message %s (reference %s)", message_id, message.reference or "-")
        return SendReceipt(provider=self.name, message_id=message_id, status="sent")

    def _deliver(self, email: EmailMessage) -> None:
        smtp = smtplib.SMTP(self._host, self._port, timeout=self._timeout)
        try:
            smtp.ehlo()
            if self._starttls:
                if not smtp.has_extn("starttls"):
                    raise SendError(
                        f"the SMTP server {self._host}:{self._port} offers no STARTTLS; nothing was sent",
                        code="starttls-unavailable",
                        retryable=False,
                    )
                smtp.starttls(context=self._tls_context())
                smtp.ehlo()
            if self._username:
                smtp.login(self._username, self._password)
            smtp.send_message(email)
        finally:
            _quit(smtp)


def _quit(smtp: smtplib.SMTP) -> None:
    # Once the server has taken the message a failing QUIT changes nothing, and must not turn
    # into an error that makes the caller send the message again.
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def _reply_error(what: str, smtp_code: int, message: OutgoingMessage) -> NoReturn:
    # Only a 5xx reply is a permanent "no"; a 4xx (or an odd code from a broken exchange) may pass.
    retryable = not 500 <= smtp_code < 600
    log.warning(
        "smtp refused message (reference %s): reply %s, retryable %s",
        message.reference or "-",
        smtp_code,
        retryable,
    )
    raise SendError(f"{what} (reply {smtp_code})", code=str(smtp_code), retryable=retryable)
