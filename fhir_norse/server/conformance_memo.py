"""Remembering which shapes of derived resources were found conformant, so that checking them costs
little on every write.

The server checks every resource it derives (scores, reports, alerts) against R4 and against the
profiles it claims (:meth:`fhir_norse.server.repository.Repository.check_derived`). Those resources
come from a few builders and differ mostly in values no check depends on: their ids, the ids their
references point to, their instants, their decimal scores. :func:`shape` replaces exactly those values
by what the checks see of them, so two resources with the same shape get the same verdict:

* a JSON float (a FHIR ``decimal``: its validity depends only on being a finite number; integers are
  kept, since ``positiveInt`` and ``unsignedInt`` have ranges);
* an ``id`` matching the R4 id type;
* the id part of a ``reference`` (``Type/id`` or ``Type/id/_history/n``; the type, which profiles
  check as the target, is kept);
* an instant, date or dateTime at the elements that carry them here, as the set of those types its
  text is valid for (so a malformed one has a shape of its own and is checked in full);
* free text at :data:`FREE_TEXT` elements (``DiagnosticReport.conclusion``, ``CodeableConcept.text``,
  ``Flag.code.text``...: they carry the scores and scale names of an administration, so without this
  every report was a shape of its own and checked in full), once it is a valid R4 ``string``: no
  check reads their words. R4 checks a ``string`` only for being one; the profiles of the pack ask
  only whether these elements exist (``tests/server/test_conformance_memo.py`` keeps it so: a
  profile that fixes, patterns, binds or constrains them fails it).

Everything else (codes, systems, statuses, text, presence of elements, JSON types) is kept verbatim.
Only verdicts of success are remembered, and at most :data:`LIMIT` shapes.
"""

from __future__ import annotations

import hashlib
import re
import threading
from functools import lru_cache
from typing import Any

import orjson

from fhir_norse.server.validation import primitive_problem

LIMIT = 20_000
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_REFERENCE_TAIL = re.compile(r"[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?")
# The elements of derived resources that carry an instant, date or dateTime.
_MOMENTS = frozenset(
    {"effectiveDateTime", "issued", "authored", "recorded", "start", "end", "occurredDateTime", "date"}
)
_MOMENT_TYPES = ("date", "dateTime", "instant")
# Elements whose (string) value no check reads beyond its being a valid string (module doc).
FREE_TEXT = frozenset({"conclusion", "text"})


@lru_cache(maxsize=4096)
def _moment(text: str) -> str:
    # Cached: the Observations of one administration share their instants.
    valid = [code for code in _MOMENT_TYPES if primitive_problem(code, text) is None]
    return "\x00moment:" + ",".join(valid) if valid else text


@lru_cache(maxsize=4096)
def _free_text(text: str) -> str:
    # Cached: the same scale names and interpretations recur in every administration.
    return "\x00string" if primitive_problem("string", text) is None else text


def _shape(value: Any, key: str | None) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _shape(v, k) for k, v in value.items()}
    if kind is list:
        return [_shape(v, key) for v in value]
    if kind is float:
        return "\x00decimal"
    if kind is str:
        if key == "id" and _ID.fullmatch(value):
            return "\x00id"
        if key == "reference":
            res_type, slash, tail = value.partition("/")
            if slash and _REFERENCE_TAIL.fullmatch(tail):
                return f"{res_type}/\x00id"
        elif key in _MOMENTS:
            return _moment(value)
        elif key in FREE_TEXT:
            return _free_text(value)
    return value


def shape(res_type: str, body: dict[str, Any]) -> bytes:
    """The shape of a resource (module doc), as a key: a 128-bit BLAKE2b digest of its JSON, so that a
    full memo of :data:`LIMIT` shapes holds about 1 MB of keys rather than about 40 MB (a scoring
    Observation's shape is 0.8-3.4 KB of JSON, 1.8 KB on average). Two different shapes share a digest
    with probability 2^-128."""
    text = res_type.encode() + b"\x00" + orjson.dumps(_shape(body, None))
    return hashlib.blake2b(text, digest_size=16).digest()


class ConformanceMemo:
    """The shapes found conformant (thread-safe; bounded)."""

    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._known: set[bytes] = set()
        self._lock = threading.Lock()

    def __contains__(self, key: bytes) -> bool:
        return key in self._known

    def remember(self, key: bytes) -> None:
        with self._lock:
            if len(self._known) >= self._limit:
                self._known.clear()
            self._known.add(key)
