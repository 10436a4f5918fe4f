"""A local stand-in for Twilio's Programmable Messaging API (2010-04-01), served over real HTTP.

It follows the parts of the contract our adapter and webhook rely on, as Twilio documents them:

* ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` with HTTP Basic auth
  ``AccountSid:AuthToken`` (401, code 20003 "Authenticate", when wrong or missing) and a
  form-encoded body. ``To`` is required (21604) and must be E.164 (21211); ``From`` or
  ``MessagingServiceSid`` is required (21603); ``Body`` is required (21602) and at most 1600
  characters (21617); a recipient who answered STOP is refused with 21610. Success is 201 with
  the Message resource as JSON: ``sid`` "SM" + 32 hex digits, ``status`` "queued" (or "accepted"
  through a Messaging Service). https://www.twilio.com/docs/messaging/api/message-resource
* Errors are Twilio's JSON ``{code, message, more_info, status}``; :meth:`FakeTwilio.fail_next`
  queues failures (a 500, or 429 with code 20429 and ``Retry-After``).
* :meth:`FakeTwilio.deliver` plays the status callback: a form POST of ``MessageSid``,
  ``MessageStatus``, ``AccountSid``, ``To``, ``From`` (and ``ErrorCode`` for a failure) to the
  message's ``StatusCallback``, signed in ``X-Twilio-Signature`` as
  https://www.twilio.com/docs/usage/security#validating-requests describes. The signature is
  computed here independently of the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

import httpx

API_VERSION = "2010-04-01"
_MESSAGES_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<account>[^/]+)/Messages\.json$")
_MESSAGE_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<account>[^/]+)/Messages/(?P<sid>[^/]+)\.json$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")

# The wording Twilio uses for the codes this fake answers with (https://www.twilio.com/docs/api/errors).
ERROR_MESSAGES = {
    20003: "Authenticate",
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    21211: "Invalid 'To' Phone Number",
    21602: "Message body is required.",
    21603: "A 'From' or 'MessagingServiceSid' parameter is required to send a message.",
    21604: "A 'To' phone number is required.",
    21610: "Attempt to send to unsubscribed recipient",
    21614: "'To' number is not a valid mobile number",
    21617: "The concatenated message body exceeds the 1600 character limit.",
}


@dataclass
class _Failure:
    status: int
    code: int
    retry_after: float | None


class FakeTwilio:
    """``with FakeTwilio(account_sid, auth_token) as gw:`` - a Messages API on ``gw.base_url``.

    ``gw.messages`` holds every accepted message (dicts: sid, to, from, body, status_callback,
    messaging_service_sid, status); ``gw.requests`` every form POSTed to the Messages endpoint,
    accepted or not, which tells a test how many attempts were made.
    """

    def __init__(
        self, account_sid: str = "AC" + "0" * 32, auth_token: str = "fake-twilio-auth-token"
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.messages: list[dict[str, str | None]] = []
        self.requests: list[dict[str, str]] = []
        self.callbacks: list[tuple[str, dict[str, str], int]] = []
        self._failures: deque[_Failure] = deque()
        self._opted_out: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeTwilio:
        gateway = self

        class Handler(_Handler):
            fake = gateway

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits up to one interval.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-twilio", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeTwilio:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeTwilio is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # --- steering --------------------------------------------------------------------------------

    def fail_next(self, status: int, code: int, times: int = 1, retry_after: float | None = None) -> None:
        """Answer the next ``times`` authenticated message requests with this error."""
        with self._lock:
            for _ in range(times):
                self._failures.append(_Failure(status, code, retry_after))

    def opt_out(self, number: str) -> None:
        """The recipient answered STOP: every later message to them gets 21610."""
        with self._lock:
            self._opted_out.add(number)

    def message(self, sid: str) -> dict[str, str | None]:
        with self._lock:
            for record in self.messages:
                if record["sid"] == sid:
                    return record
        raise KeyError(sid)

    def deliver(
        self,
        sid: str,
        status: str = "delivered",
        *,
        error_code: str | None = None,
        client: httpx.Client | None = None,
    ) -> int:
        """POST a signed status callback for message ``sid``; return the HTTP status it got.

        ``client`` may be any ``httpx.Client`` (a Starlette ``TestClient`` is one), for an app
        that is not listening on a socket.
        """
        record = self.message(sid)
        url = record["status_callback"]
        if not url:
            raise ValueError(f"message {sid} has no StatusCallback")
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "From": record["from"] or "",
            "MessageSid": sid,
            "MessageStatus": status,
            "SmsSid": sid,
            "SmsStatus": status,
            "To": record["to"] or "",
        }
        if record["messaging_service_sid"]:
            params["MessagingServiceSid"] = record["messaging_service_sid"]
        if error_code is not None or status in ("failed", "undelivered"):
            # 30003: "Unreachable destination handset", a common reason for "undelivered".
            params["ErrorCode"] = error_code or "30003"
        headers = {"X-Twilio-Signature": signature(url, params, self.auth_token)}
        if client is not None:
            answer = client.post(url, data=params, headers=headers)
        else:
            with httpx.Client(timeout=10.0) as own:
                answer = own.post(url, data=params, headers=headers)
        with self._lock:
            record["status"] = status
            self.callbacks.append((url, params, answer.status_code))
        return answer.status_code

    # --- the API ---------------------------------------------------------------------------------

    def _authenticated(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(user, self.account_sid) and hmac.compare_digest(password, self.auth_token)

    def _create(self, account: str, form: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            self.requests.append(dict(form))
            failure = self._failures.popleft() if self._failures else None
        if failure is not None:
            headers = {} if failure.retry_after is None else {"Retry-After": _seconds(failure.retry_after)}
            return failure.status, error_body(failure.code, failure.status), headers
        to = form.get("To", "")
        sender = form.get("From", "")
        service = form.get("MessagingServiceSid", "")
        body = form.get("Body", "")
        if not to:
            return 400, error_body(21604, 400), {}
        if not sender and not service:
            return 400, error_body(21603, 400), {}
        if not body and not form.get("MediaUrl") and not form.get("ContentSid"):
            return 400, error_body(21602, 400), {}
        if not _E164.match(to):
            return 400, error_body(21211, 400, f"Invalid 'To' Phone Number: {to}"), {}
        if len(body) > 1600:
            return 400, error_body(21617, 400), {}
        with self._lock:
            opted_out = to in self._opted_out
        if opted_out:
            return 400, error_body(21610, 400), {}
        sid = "SM" + uuid.uuid4().hex
        status = "accepted" if service else "queued"
        record: dict[str, str | None] = {
            "sid": sid,
            "to": to,
            "from": sender or None,
            "body": body,
            "status_callback": form.get("StatusCallback") or None,
            "messaging_service_sid": service or None,
            "status": status,
        }
        with self._lock:
            self.messages.append(record)
        return 201, self._resource(account, record), {}

    def _resource(self, account: str, record: dict[str, str | None]) -> dict[str, Any]:
        now = datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
        sid = record["sid"]
        uri = f"/{API_VERSION}/Accounts/{account}/Messages/{sid}.json"
        return {
            "account_sid": account,
            "api_version": API_VERSION,
            "body": record["body"],
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": record["from"],
            "messaging_service_sid": record["messaging_service_sid"],
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": record["status"],
            "subresource_uris": {"media": uri.replace(".json", "/Media.json")},
            "to": record["to"],
            "uri": uri,
        }


def error_body(code: int, status: int, message: str | None = None) -> dict[str, Any]:
    """Twilio's error representation."""
    return {
        "code": code,
        "message": message or ERROR_MESSAGES.get(code, "Error"),
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def signature(url: str, params: dict[str, str], auth_token: str) -> str:
    """X-Twilio-Signature: base64(HMAC-SHA1(token, url + name1 + value1 + name2 + ...)), names sorted."""
    payload = url + "".join(f"{name}{params[name]}" for name in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()).decode()


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeTwilio
    protocol_version = "HTTP/1.1"
    server_version = "FakeTwilio/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet: the test output is the place for assertions, not access logs.
        pass

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _guard(self) -> bool:
        if not self.fake._authenticated(self.headers.get("Authorization")):
            self._send(401, error_body(20003, 401), {"WWW-Authenticate": 'Basic realm="Twilio API"'})
            return False
        return True

    def do_POST(self) -> None:
        raw = self._read_body()
        match = _MESSAGES_PATH.match(self.path)
        if not self._guard():
            return
        if match is None or match["account"] != self.fake.account_sid:
            self._send(404, error_body(20404, 404))
            return
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        form: dict[str, str] = {}
        if content_type == "application/x-www-form-urlencoded":
            parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True)
            form = {name: values[0] for name, values in parsed.items()}
        status, payload, headers = self.fake._create(match["account"], form)
        self._send(status, payload, headers)

    def do_GET(self) -> None:
        match = _MESSAGE_PATH.match(self.path)
        if not self._guard():
            return
        if match is None or match["account"] != self.fake.account_sid:
            self._send(404, error_body(20404, 404))
            return
        try:
            record = self.fake.message(match["sid"])
        except KeyError:
            self._send(404, error_body(20404, 404))
            return
        self._send(200, self.fake._resource(match["account"], record))
