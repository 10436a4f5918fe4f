"""The SMART test app of the browser tests: two static pages (tests/support/smart_app/) that use the
official SMART JS client (``fhirclient`` on npm, its browser build ``fhir-client.js``).

- ``launch.html?iss=<FHIR base>[&launch=<handle>]&client_id=...&scope=...[&jwk=<private JWK JSON>]``
  calls ``FHIR.oauth2.authorize`` (PKCE required), redirecting to ``index.html``;
- ``index.html`` calls ``FHIR.oauth2.ready()``, reads the Patient and ``Observation?patient=<id>`` and
  writes ``#status`` ("done" or "error"), ``#patient``, ``#patientName``, ``#fhirUser``, ``#encounter``,
  ``#observations`` (the count) and ``#error``.

:func:`serve_smart_app` serves them (and ``/fhir-client.js``) on a free loopback port.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.oidc_provider import NODE_MODULES, require_node

APP_DIR = Path(__file__).resolve().parent / "smart_app"
FHIR_CLIENT_JS = NODE_MODULES / "fhirclient" / "build" / "fhir-client.js"
PAGES = frozenset({"/launch.html", "/index.html"})

__all__ = ["FHIR_CLIENT_JS", "serve_smart_app"]


class _Handler(SimpleHTTPRequestHandler):
    """The two pages and fhir-client.js, nothing else (no directory listings)."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/fhir-client.js":
            self._send(FHIR_CLIENT_JS, "text/javascript; charset=utf-8")
        elif path in PAGES:
            self._send(APP_DIR / path.lstrip("/"), "text/html; charset=utf-8")
        else:
            self.send_error(404)

    def _send(self, file: Path, content_type: str) -> None:
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: the query strings carry launch handles


@contextmanager
def serve_smart_app() -> Iterator[str]:
    """Serve the test app on 127.0.0.1 (a free port) for the block; yields its origin
    (``http://127.0.0.1:<port>``): open ``<origin>/launch.html?...``."""
    require_node()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(APP_DIR)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
