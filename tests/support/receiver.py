"""A real rest-hook endpoint for Subscription tests: a threaded ``http.server`` on 127.0.0.1 with a
random port that records every notification and answers the statuses it is told to."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    answered: int = 200

    @property
    def status(self) -> dict[str, Any]:
        """The SubscriptionStatus Parameters (first entry) as name -> value or parts."""
        params = self.body["entry"][0]["resource"]["parameter"]
        out: dict[str, Any] = {}
        for p in params:
            value = p.get("part") or next((v for k, v in p.items() if k.startswith("value")), None)
            out.setdefault(p["name"], []).append(value)
        return out

    @property
    def kind(self) -> str:
        return str(self.status["type"][0])

    def event_numbers(self) -> list[int]:
        return [
            int(next(part["valueString"] for part in event if part["name"] == "event-number"))
            for event in self.status.get("notification-event", [])
        ]


@dataclass
class Receiver:
    url: str
    received: list[Received] = field(default_factory=list)
    # Statuses to answer, one per request, before answering 200 again.
    answers: deque[int] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # While set: requests are recorded as held (answered 0) and not answered until the event is set.
    hold: threading.Event | None = None
    held: int = 0

    def events(self) -> list[Received]:
        """The event notifications acknowledged with 2xx."""
        with self.lock:
            return [r for r in self.received if r.kind == "event-notification" and 200 <= r.answered < 300]

    def of_kind(self, kind: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.kind == kind]


@contextmanager
def receiver() -> Iterator[Receiver]:
    """A running receiver (stopped when the block ends)."""
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            target = state["r"]
            hold = target.hold
            if hold is not None:
                with target.lock:
                    target.held += 1
                    target.received.append(Received(self.path, {}, body, 0))
                hold.wait(60)
                self.close_connection = True
                return
            with target.lock:
                status = target.answers.popleft() if target.answers else 200
                headers = {k.lower(): v for k, v in self.headers.items()}
                target.received.append(Received(self.path, headers, body, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["r"] = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}/hook")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state["r"]
    finally:
        server.shutdown()
        server.server_close()
