"""The request id every log record of a request carries (set by the API's request middleware)."""

from __future__ import annotations

from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("request_id", default="-")
