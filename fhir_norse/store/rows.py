"""Search-index rows: what one SearchParameter extracts from one resource.

Produced by :mod:`fhir_norse.server.search.extract` on every write and stored by the
store in the typed index tables of :mod:`fhir_norse.store.tables`. Values are already
normalised for comparison (strings folded, dates as UTC ranges, numbers as ranges).
See https://hl7.org/fhir/R4/search.html for the semantics of each type.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from hashlib import blake2b

# ``Reference.identifier`` values are token rows under ``<param>:identifier`` (the ``:identifier`` modifier).
IDENTIFIER_SUFFIX = ":identifier"


@dataclass(frozen=True, slots=True)
class TokenRow:
    param: str
    system: str | None
    code: str | None
    # Folded display/text for ``:text`` (CodeableConcept.text, Coding.display, Identifier.type.text).
    text: str | None = None


@dataclass(frozen=True, slots=True)
class StringRow:
    param: str
    # Lower-cased, accents removed, whitespace collapsed: default and ``:contains`` searches.
    value: str
    # The original text: ``:exact`` searches.
    exact: str


@dataclass(frozen=True, slots=True)
class DateRow:
    param: str
    # Naive UTC bounds of the implicit range of the value (a date is a whole day, a Period its span).
    # ``None`` stands for an open end (Period without start or end).
    low: datetime | None
    high: datetime | None


@dataclass(frozen=True, slots=True)
class NumberRow:
    """``number`` and ``quantity`` values: the value with its implicit precision range."""

    param: str
    value: Decimal
    low: Decimal
    high: Decimal
    system: str | None = None
    code: str | None = None
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class ReferenceRow:
    param: str
    # Local or relative references: ``Patient/123`` -> ("Patient", "123").
    target_type: str | None
    target_id: str | None
    target_version: str | None = None
    # Absolute URLs and canonicals (without ``|version``); ``None`` for local references.
    url: str | None = None
    # The ``|version`` part of a canonical.
    canonical_version: str | None = None


@dataclass(frozen=True, slots=True)
class UriRow:
    param: str
    value: str


@dataclass(frozen=True, slots=True)
class CompositeRow:
    """One combination of a composite parameter (first component a token, second any type)."""

    param: str
    c1_system: str | None
    c1_code: str | None
    # Second component: exactly one group is filled, by the second component's type.
    c2_system: str | None = None
    c2_code: str | None = None
    c2_low: Decimal | None = None
    c2_high: Decimal | None = None
    c2_date_low: datetime | None = None
    c2_date_high: datetime | None = None
    c2_string: str | None = None


IndexRow = TokenRow | StringRow | DateRow | NumberRow | ReferenceRow | UriRow | CompositeRow


# --- hash columns ----------------------------------------------------------------------------------
#
# The token and reference index tables carry 64-bit hashes of (type, parameter[, system], value), HAPI's
# idea: their B-tree indexes are on a hash and the resource pk (narrow, one integer comparison) instead of
# the (res_type, param, code, system, resource_pk) text tuple. Searches look the hash up and re-check the
# text columns, so a collision never returns a wrong row; the text columns also serve the modifiers
# (:text, :not, :above/:below, ``system|``). The hash is the first 8 bytes of BLAKE2b over the parts as
# UTF-8 joined by U+001F (None as U+0000), read as a signed big-endian integer: the same BIGINT in Python
# on SQLite and PostgreSQL, stable across processes and versions (unlike ``hash()``).

_SEPARATOR = "\x1f"
_NONE = "\x00"


def index_hash(*parts: str | None) -> int:
    """The stable signed 64-bit hash of ``parts`` (see above)."""
    text = _SEPARATOR.join(_NONE if p is None else p for p in parts)
    return int.from_bytes(
        blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big", signed=True
    )


def identity_hash(res_type: str, param: str) -> int:
    """``hash_identity``: the rows of one parameter of one type."""
    return index_hash(res_type, param)


def token_code_hash(res_type: str, param: str, code: str | None) -> int:
    """``hash_code`` of a token row: ``param=code`` in any system."""
    return index_hash(res_type, param, "", code)


def token_system_code_hash(res_type: str, param: str, system: str | None, code: str | None) -> int:
    """``hash_sys_code`` of a token row: ``param=system|code`` (``None``: ``param=|code``, no system)."""
    return index_hash(res_type, param, "|", system, code)


def reference_target_hash(res_type: str, param: str, target_id: str | None) -> int | None:
    """``hash_target`` of a reference row: its target id, whatever the target type (a bare-id search
    names none; a typed one re-checks ``target_type``); ``None`` for a URL or canonical."""
    return None if target_id is None else index_hash(res_type, param, "@", target_id)
