"""A local OpenID Connect provider for the tests: panva's ``oidc-provider`` (npm) run by Node on a loopback
port, standing in for the national logins (ID-porten, HelseID). tests/support/oidc/provider.mjs is the
provider; this module starts and stops it and walks its login page without a browser.

- :class:`LocalOidc`: a context manager; it writes the configuration (clients, accounts), starts
  ``node provider.mjs``, waits for its ``READY`` line and stops it at the end. ``.issuer`` is its
  issuer (``http://127.0.0.1:<port>``).
- :func:`login_via_http`: follows the provider's redirects from an authorization URL, submits the login
  form for a given account and returns the final redirect back to the relying party.
- :func:`rsa_client_key`: a fresh RSA key pair as JWKs, for a ``private_key_jwt`` client.
- :func:`require_node`: skips a test when Node or the npm packages are missing, and fails instead
  under ``FHIR_NORSE_REQUIRE_BROWSER=1`` (CI), as tests/web/browser.py does for Chromium.

``make test`` installs the npm packages (tools/ensure_node_deps.sh).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
NODE_MODULES = OIDC_DIR / "node_modules"
PROVIDER_SCRIPT = OIDC_DIR / "provider.mjs"
START_SECONDS = 20.0
MAX_REDIRECTS = 10

__all__ = [
    "LocalOidc",
    "login_via_http",
    "node_missing",
    "require_node",
    "rsa_client_key",
]


def node_missing() -> str | None:
    """Why the local provider cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "Node.js (node) is not installed"
    if not (NODE_MODULES / "oidc-provider").is_dir():
        return "the npm packages of tests/support/oidc are not installed (run tools/ensure_node_deps.sh)"
    return None


def require_node() -> None:
    """Skip the calling test (or fixture) without Node and the packages; fail under
    ``FHIR_NORSE_REQUIRE_BROWSER=1``, where CI must run these tests."""
    reason = node_missing()
    if reason is None:
        return
    if os.environ.get("FHIR_NORSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"FHIR_NORSE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def rsa_client_key(kid: str = "client-key-1") -> tuple[dict[str, str], dict[str, str]]:
    """(private JWK, public JWK) of a fresh RSA-2048 key with ``kid``, alg RS256."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.private_numbers()
    public = {
        "kty": "RSA",
        "kid": kid,
        "alg": "RS256",
        "use": "sig",
        "n": _b64(numbers.public_numbers.n),
        "e": _b64(numbers.public_numbers.e),
    }
    private = {
        **public,
        "d": _b64(numbers.d),
        "p": _b64(numbers.p),
        "q": _b64(numbers.q),
        "dp": _b64(numbers.dmp1),
        "dq": _b64(numbers.dmq1),
        "qi": _b64(numbers.iqmp),
    }
    return private, public


class LocalOidc:
    """``oidc-provider`` on 127.0.0.1, configured with ``clients`` and ``accounts``.

    ``clients``: dicts of OpenID Connect client metadata (``client_id``, ``redirect_uris``,
    ``token_endpoint_auth_method``, and ``client_secret`` or ``jwks``). ``accounts``: login name ->
    claims (``pid``, ``helseid://claims/hpr/hpr_number``, ``name``...; optional ``sub``, else the login
    name, and ``acr`` to force the assurance level reported). ``id_token_claims=False`` releases the
    scope claims at the userinfo endpoint only; ``single_sign_on=True`` lets a browser session skip
    the login page on later requests. ``port`` is chosen free unless given (the issuer includes it).
    """

    def __init__(
        self,
        *,
        clients: Sequence[Mapping[str, Any]],
        accounts: Mapping[str, Mapping[str, Any]],
        port: int | None = None,
        id_token_claims: bool = True,
        single_sign_on: bool = False,
        acr_values: Sequence[str] = ("idporten-loa-substantial", "idporten-loa-high"),
        claims: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.port = port or _free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self._config: dict[str, Any] = {
            "port": self.port,
            "issuer": self.issuer,
            "clients": [dict(client) for client in clients],
            "accounts": {login: dict(claims) for login, claims in accounts.items()},
            "id_token_claims": id_token_claims,
            "single_sign_on": single_sign_on,
            "acr_values": list(acr_values),
        }
        if claims is not None:
            self._config["claims"] = {scope: list(names) for scope, names in claims.items()}
        self._process: subprocess.Popen[str] | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._stderr: list[str] = []
        self._pumps: list[threading.Thread] = []
        self.started_in: float | None = None

    def start(self) -> LocalOidc:
        require_node()
        began = time.monotonic()
        self._folder = tempfile.TemporaryDirectory(prefix="fhir-norse-oidc-")
        config_file = Path(self._folder.name) / "config.json"
        config_file.write_text(json.dumps(self._config), encoding="utf-8")
        self._process = subprocess.Popen(
            ["node", str(PROVIDER_SCRIPT), str(config_file)],
            cwd=OIDC_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NODE_ENV": "test"},
        )
        lines: queue.Queue[str | None] = queue.Queue()
        self._pumps = [
            threading.Thread(target=self._pump, args=(self._process.stdout, lines), daemon=True),
            threading.Thread(target=self._pump, args=(self._process.stderr, None), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()
        deadline = began + START_SECONDS
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is not None and line.strip() == f"READY {self.issuer}":
                break
            if line is None:
                self.stop()
                raise RuntimeError(
                    "the local OpenID Connect provider did not start: " + "".join(self._stderr)[-2000:]
                )
        self.started_in = time.monotonic() - began
        return self

    def _pump(self, stream: Any, lines: queue.Queue[str | None] | None) -> None:
        for line in stream:
            if lines is None:
                self._stderr.append(line)
            else:
                lines.put(line)
        if lines is not None:
            lines.put(None)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        for pump in self._pumps:
            pump.join(timeout=5)
        self._pumps = []
        if process is not None:
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    @property
    def log(self) -> str:
        """What the provider wrote on stderr (warnings, errors)."""
        return "".join(self._stderr)

    def __enter__(self) -> LocalOidc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class _LoginForm(HTMLParser):
    """The action of the provider's login form (the first form of the page)."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "form" and self.action is None:
            self.action = dict(attrs).get("action") or ""


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def login_via_http(client: httpx.Client, authorize_url: str, login: str) -> httpx.Response:
    """Sign in as ``login`` at the provider of ``authorize_url`` without a browser.

    ``client`` keeps the provider's cookies (an ``httpx.Client`` without ``follow_redirects``). The
    provider's own redirects are followed, its login form is posted, and the first redirect that leaves
    the provider (back to the relying party's redirect_uri, ``code`` and ``state`` in its query) is
    returned without following it. A page that is not a redirect (an error page, or the login form
    again for an unknown login) raises AssertionError with the page's text.
    """
    provider = _origin(authorize_url)
    response = client.get(authorize_url)
    posted = False
    for _ in range(MAX_REDIRECTS):
        if response.is_redirect:
            target = urljoin(str(response.url), response.headers["location"])
            if _origin(target) != provider:
                return response
            response = client.get(target)
            continue
        if response.status_code == 200 and not posted:
            form = _LoginForm()
            form.feed(response.text)
            assert form.action is not None, f"no login form at {response.url}: {response.text[:500]}"
            posted = True
            response = client.post(urljoin(str(response.url), form.action), data={"login": login})
            continue
        raise AssertionError(
            f"the provider answered {response.status_code} at {response.url}: {response.text[:800]}"
        )
    raise AssertionError(f"more than {MAX_REDIRECTS} redirects at the provider")
