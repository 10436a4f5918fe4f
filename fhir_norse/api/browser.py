"""What the browser-facing routes (sign-in, the feedback report) share: the language a page is shown in,
the cookies that hold a browser's secrets, and a person's name for a page."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from fastapi import Request, Response

from fhir_norse.config import Settings

__all__ = ["Lang", "display_name", "other_lang", "preferred_lang", "set_private_cookie"]

Lang = Literal["nb", "en"]


def preferred_lang(request: Request, chosen: Any = None) -> Lang:
    """``?lang=``, else ``chosen`` (a language remembered for the flow), else the browser's first
    Accept-Language: English when it asks for English, bokmål otherwise."""
    for value in (request.query_params.get("lang"), chosen):
        if value == "nb":
            return "nb"
        if value == "en":
            return "en"
    first = request.headers.get("accept-language", "").lower().split(",", 1)[0].strip()
    return "en" if first.startswith("en") else "nb"


def other_lang(lang: Lang) -> Lang:
    return "en" if lang == "nb" else "nb"


def set_private_cookie(
    response: Response, settings: Settings, name: str, value: str, *, path: str, max_age: int
) -> None:
    """A cookie only this server reads: ``HttpOnly``, ``SameSite=Lax`` (a login provider's or an app's
    redirect back is a top-level navigation), scoped to ``path``, ``Secure`` when the server is on https."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        httponly=True,
        samesite="lax",
        secure=settings.fhir_base_url().startswith("https://"),
    )


def display_name(resource: Mapping[str, Any]) -> str:
    """A Patient's or Practitioner's name as a page shows it (``text``, else given names and family);
    empty when it has none."""
    for name in resource.get("name") or []:
        if name.get("text"):
            return str(name["text"])
        text = " ".join(p for p in [*name.get("given", []), name.get("family", "")] if p)
        if text:
            return text
    return ""
