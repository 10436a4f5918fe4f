"""Walking the SMART authorization code flow over HTTP, as an app and a person's browser would, without a
browser: authorize, the login provider's page (tests/support/oidc_provider.py), consent, the code
exchange."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from tests.smart.site import Clinic
from tests.support.oidc_provider import login_via_http


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


@dataclass
class Ask:
    """One authorization request of an app."""

    clinic: Clinic
    app: str = "public"
    scope: str = "patient/*.rs openid fhirUser launch/patient offline_access"
    launch: str | None = None
    state: str = "st-1"

    def __post_init__(self) -> None:
        self.verifier, self.challenge = pkce()
        self.redirect_uri = self.clinic.app_origin + "/index.html"

    @property
    def client_id(self) -> str:
        return self.clinic.apps[self.app]

    def url(self, **override: str | None) -> str:
        params: dict[str, str | None] = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": self.scope,
            "state": self.state,
            "aud": self.clinic.base,
            "code_challenge": self.challenge,
            "code_challenge_method": "S256",
            "launch": self.launch,
        }
        params.update(override)
        return f"{self.clinic.root}/auth/authorize?" + urlencode(
            {k: v for k, v in params.items() if v is not None}
        )


class _Forms(HTMLParser):
    """The forms of a page: action, and fields (hidden and checked inputs; radio values listed)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "method": a.get("method", "get"), "fields": []})
        elif tag == "input" and self.forms:
            self.forms[-1]["fields"].append(a)


def forms(html: str) -> list[dict[str, Any]]:
    parser = _Forms()
    parser.feed(html)
    return parser.forms


def post_form(http: httpx.Client, clinic: Clinic, page: httpx.Response, **fields: Any) -> httpx.Response:
    """Submit the page's POST form with its hidden fields and ``fields`` (a list value repeats the name)."""
    form = next(f for f in forms(page.text) if f["method"].lower() == "post" and "csrf" in str(f["fields"]))
    data: list[tuple[str, str]] = [
        (f["name"], f.get("value", "")) for f in form["fields"] if f.get("type") == "hidden" and f.get("name")
    ]
    for name, value in fields.items():
        for one in value if isinstance(value, list) else [value]:
            data.append((name, one))
    return http.post(
        clinic.root + form["action"],
        content=urlencode(data),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )


def offered_scopes(page: httpx.Response) -> list[str]:
    """The scopes the consent page offers (a line may stand for several: "openid fhirUser")."""
    return [
        s
        for form in forms(page.text)
        for f in form["fields"]
        if f.get("name") == "scope"
        for s in f["value"].split()
    ]


def sign_in(http: httpx.Client, ask: Ask, login: str, **override: str | None) -> httpx.Response:
    """authorize -> the login provider's page -> our callback; returns our answer to the callback."""
    first = http.get(ask.url(**override))
    assert first.status_code == 303, first.text
    back = login_via_http(http, first.headers["location"], login)
    assert back.headers["location"].startswith(ask.clinic.root + "/auth/login/callback"), back.headers
    return http.get(back.headers["location"])


def follow(http: httpx.Client, clinic: Clinic, answer: httpx.Response) -> httpx.Response:
    """Follow our own redirects (picker, consent), stopping at one that leaves for the app."""
    while answer.status_code in (302, 303) and answer.headers["location"].startswith("/auth/"):
        answer = http.get(clinic.root + answer.headers["location"])
    return answer


def redirect_params(answer: httpx.Response) -> dict[str, str]:
    assert answer.status_code in (302, 303), answer.text[:500]
    return {k: v[0] for k, v in parse_qs(urlsplit(answer.headers["location"]).query).items()}


def exchange(http: httpx.Client, ask: Ask, code: str, **extra: str) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": ask.redirect_uri,
        "code_verifier": ask.verifier,
        "client_id": ask.client_id,
        **extra,
    }
    return http.post(ask.clinic.root + "/auth/token", data=form)


def consent_and_code(
    http: httpx.Client, ask: Ask, consent: httpx.Response, scopes: list[str] | None = None
) -> str:
    allowed = offered_scopes(consent) if scopes is None else scopes
    answer = post_form(http, ask.clinic, consent, scope=allowed, decision="allow")
    params = redirect_params(answer)
    assert params.get("state") == ask.state, params
    return params["code"]
