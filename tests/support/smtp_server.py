"""A real SMTP server on loopback (aiosmtpd) that insists on STARTTLS and AUTH, as a submission server does.

Its certificate is issued, for ``localhost`` and ``127.0.0.1``, by a throw-away CA made with
``cryptography`` in a temporary folder; ``.ca_file`` is that CA's PEM, the one thing a client needs
to verify the server. With ``starttls=False`` it offers no STARTTLS at all (a server a careful
client must refuse to send through) and AUTH in clear text, not required.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import tempfile
import threading
from collections import deque
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# aiosmtpd logs this at WARNING on every successful AUTH (its own legacy attribute, set by itself).
logging.getLogger("mail.log").addFilter(lambda record: "login_data is deprecated" not in record.getMessage())


def _write_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server chain .pem, server key .pem): a CA and a server certificate it signed."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fhir-norse test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = folder / "ca.pem"
    chain_file = folder / "server.pem"
    key_file = folder / "server-key.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain_file.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, chain_file, key_file


class _Controller(Controller):
    """Binds port 0 (the system picks a free one) and learns the port before the readiness check."""

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        async def create() -> asyncio.AbstractServer:
            server = await self.loop.create_server(self._factory_invoker, host=self.hostname, port=0)
            self.port = server.sockets[0].getsockname()[1]
            return server

        return create()


class _Handler:
    def __init__(self, smtp: LocalSmtp) -> None:
        self._smtp = smtp

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        rejection = self._smtp._next_rejection()
        if rejection is not None:
            return rejection
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode("utf-8")
        # CRLF is SMTP's line ending on the wire; the message as stored uses the local one.
        parsed = BytesParser(policy=policy.default).parsebytes(raw.replace(b"\r\n", b"\n"))
        assert isinstance(parsed, EmailMessage)
        self._smtp._received(parsed, envelope, session)
        return "250 2.0.0 Message accepted for delivery"


class LocalSmtp:
    """``with LocalSmtp() as smtp:`` - an SMTP server on ``smtp.host``:``smtp.port``.

    ``.messages`` holds every accepted message as an ``EmailMessage``; ``.envelopes`` the matching
    (MAIL FROM, RCPT TO list, whether the session was TLS) triples.
    ``reject_next("451 4.3.0 Try again later")`` answers the next DATA with that reply instead.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        username: str = "fhir-norse-mailer",
        password: str = "local-smtp-password",
        *,
        starttls: bool = True,
    ) -> None:
        self.username = username
        self.password = password
        self.starttls = starttls
        self.port = 0
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str], bool]] = []
        self._rejections: deque[str] = deque()
        self._lock = threading.Lock()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._controller: _Controller | None = None
        self._ca_file: Path | None = None

    @property
    def ca_file(self) -> Path:
        if self._ca_file is None:
            raise RuntimeError("LocalSmtp is not running")
        return self._ca_file

    def reject_next(self, reply: str) -> None:
        with self._lock:
            self._rejections.append(reply)

    def _next_rejection(self) -> str | None:
        with self._lock:
            return self._rejections.popleft() if self._rejections else None

    def _received(self, message: EmailMessage, envelope: Envelope, session: Session) -> None:
        with self._lock:
            self.messages.append(message)
            self.envelopes.append(
                (envelope.mail_from or "", list(envelope.rcpt_tos), session.ssl is not None)
            )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        ok = auth_data.login == self.username.encode() and auth_data.password == self.password.encode()
        return AuthResult(success=ok, handled=False)

    def start(self) -> LocalSmtp:
        self._tmp = tempfile.TemporaryDirectory(prefix="fhir-norse-smtp-")
        ca_file, chain_file, key_file = _write_certificates(Path(self._tmp.name))
        self._ca_file = ca_file
        tls: ssl.SSLContext | None = None
        if self.starttls:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            tls.load_cert_chain(chain_file, key_file)
        self._controller = _Controller(
            _Handler(self),
            hostname=self.host,
            server_hostname="localhost",
            tls_context=tls,
            require_starttls=self.starttls,
            # Without TLS, AUTH is offered but not demanded (aiosmtpd warns about demanding it in clear).
            auth_required=self.starttls,
            auth_require_tls=self.starttls,
            authenticator=self._authenticate,
        )
        self._controller.start()
        self.port = self._controller.port
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalSmtp:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
