"""Opaque keyset-paging cursors for search results.

A cursor holds the sort-key values and primary key of the row a page ends (``next``) or
starts (``prev``) at, so the following page is "rows strictly after it in the sort order"
and needs no OFFSET (see https://hl7.org/fhir/R4/http.html#paging: the links are opaque
to clients). It also carries a digest of the sort it was made for and a checksum, so a
cursor from another search or a mangled token is refused with a 400 instead of paging
through the wrong order.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from fhir_norse.outcomes import BadRequest

CursorValue = datetime | float | str | None
ValueKind = Literal["datetime", "float", "str"]
Direction = Literal["next", "prev"]

_VERSION = 1
_CHECK_BYTES = 6


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in a sorted result: the sort-key values (None where missing) and the pk."""

    direction: Direction
    values: tuple[CursorValue, ...]
    pk: int


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_cursor(cursor: Cursor, sort_signature: str) -> str:
    """Render ``cursor`` as a URL-safe token bound to ``sort_signature``."""
    values: list[object] = []
    for value in cursor.values:
        if isinstance(value, datetime):
            values.append({"t": value.isoformat()})
        else:
            values.append(value)
    payload = json.dumps(
        [_VERSION, cursor.direction[0], _digest(sort_signature), values, cursor.pk],
        separators=(",", ":"),
        allow_nan=False,
    ).encode()
    check = hashlib.sha256(payload).digest()[:_CHECK_BYTES]
    return _b64(payload) + "." + _b64(check)


def _bad(reason: str) -> BadRequest:
    return BadRequest(f"Invalid paging cursor ({reason}); start the search again", expression="_cursor")


def decode_cursor(token: str, sort_signature: str, kinds: tuple[ValueKind, ...]) -> Cursor:
    """Parse a token made by :func:`encode_cursor` for the same sort; :class:`BadRequest` otherwise."""
    body, dot, check = token.partition(".")
    if not dot or len(token) > 4096:
        raise _bad("malformed")
    try:
        payload = _unb64(body)
        expected = _unb64(check)
    except (binascii.Error, ValueError) as exc:
        raise _bad("malformed") from exc
    if hashlib.sha256(payload).digest()[:_CHECK_BYTES] != expected:
        raise _bad("checksum mismatch")
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise _bad("malformed") from exc
    if not (isinstance(data, list) and len(data) == 5 and data[0] == _VERSION):
        raise _bad("unknown format")
    _, direction, digest, raw_values, pk = data
    if digest != _digest(sort_signature):
        raise _bad("it belongs to a search with another sort order")
    if direction not in ("n", "p") or not isinstance(pk, int) or isinstance(pk, bool):
        raise _bad("malformed")
    if not isinstance(raw_values, list) or len(raw_values) != len(kinds):
        raise _bad("wrong number of sort values")
    values = tuple(_value(v, kind) for v, kind in zip(raw_values, kinds, strict=True))
    return Cursor(direction="next" if direction == "n" else "prev", values=values, pk=pk)


def _value(raw: object, kind: ValueKind) -> CursorValue:
    if raw is None:
        return None
    if kind == "datetime":
        if not (isinstance(raw, dict) and isinstance(raw.get("t"), str)):
            raise _bad("bad date value")
        try:
            moment = datetime.fromisoformat(raw["t"])
        except ValueError as exc:
            raise _bad("bad date value") from exc
        if moment.tzinfo is not None:
            raise _bad("bad date value")
        return moment
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _bad("bad number value")
        return float(raw)
    if not isinstance(raw, str):
        raise _bad("bad text value")
    return raw
