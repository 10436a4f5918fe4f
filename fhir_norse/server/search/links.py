"""Query strings for the ``self``, ``next`` and ``previous`` links of a searchset Bundle.

The self link repeats the parameters the server understood and used (ignored ones are left
out, so the client can see what was not applied); paging links add the opaque cursor. See
https://hl7.org/fhir/R4/search.html#conformance and https://hl7.org/fhir/R4/http.html#paging.
"""

from __future__ import annotations

from urllib.parse import quote

from fhir_norse.server.search.parse import CURSOR_PARAM
from fhir_norse.store.search.request import SearchRequest

# Characters left readable in links; everything else (``+``, ``&``, ``=``, spaces) is escaped.
_SAFE_NAME = ":._-"
_SAFE_VALUE = ":/|,$*@._-~"


def _encode(pairs: list[tuple[str, str]]) -> str:
    return "&".join(
        f"{quote(name, safe=_SAFE_NAME)}={quote(value, safe=_SAFE_VALUE)}" for name, value in pairs
    )


def _used(req: SearchRequest) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for name, value in req.params:
        if name == "_count":
            # The effective page size, which may be capped below what was asked.
            value = str(req.count)
        pairs.append((name, value))
    return pairs


def self_query(req: SearchRequest) -> str:
    """The query string of the ``self`` link: the parameters used, and the cursor of this page."""
    pairs = _used(req)
    if req.cursor_token is not None:
        pairs.append((CURSOR_PARAM, req.cursor_token))
    return _encode(pairs)


def page_query(req: SearchRequest, cursor: str) -> str:
    """The query string of a ``next``/``previous`` link for ``cursor`` (from a SearchPage)."""
    return _encode([*_used(req), (CURSOR_PARAM, cursor)])
