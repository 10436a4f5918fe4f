"""What an interaction needs to know about its request, and what it answers.

The API layer builds a :class:`RequestContext` from HTTP; bundle entries build their own.
Interactions return a :class:`Result` that the API layer renders, so the FHIR layer
never sees FastAPI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fhir_norse.auth.caller import Caller

ReturnPref = Literal["minimal", "representation", "OperationOutcome"]


@dataclass(frozen=True, slots=True)
class Prefer:
    """The ``Prefer`` header: https://hl7.org/fhir/R4/http.html#ops."""

    return_: ReturnPref = "representation"
    handling: Literal["strict", "lenient"] = "lenient"

    @classmethod
    def parse(cls, header: str | None) -> Prefer:
        ret: ReturnPref = "representation"
        handling: Literal["strict", "lenient"] = "lenient"
        for part in (header or "").split(","):
            for token in part.split(";"):
                key, _, value = token.strip().partition("=")
                value = value.strip().strip('"')
                if key.strip().lower() == "return" and value in (
                    "minimal",
                    "representation",
                    "OperationOutcome",
                ):
                    ret = value  # type: ignore[assignment]
                elif key.strip().lower() == "handling" and value in ("strict", "lenient"):
                    handling = value  # type: ignore[assignment]
        return cls(ret, handling)


@dataclass(frozen=True, slots=True)
class RequestContext:
    caller: Caller
    base_url: str
    prefer: Prefer = field(default_factory=Prefer)
    # For the audit trail: where the request came from and its X-Request-ID.
    source_address: str | None = None
    request_id: str | None = None


@dataclass(slots=True)
class Result:
    """An interaction's answer: status, a JSON body (as a dict or as ready JSON text) and headers."""

    status: int
    body: dict[str, Any] | None = None
    raw: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
