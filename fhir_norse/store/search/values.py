"""Value normalisation shared by indexing (write side) and search (query side).

Both sides must fold strings and turn dates and numbers into ranges the same way, or a
search would miss what was indexed. See https://hl7.org/fhir/R4/search.html#date and
https://hl7.org/fhir/R4/search.html#number for the implicit-range rules.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation

from fhir_norse.outcomes import BadRequest

_SPACE = re.compile(r"\s+")
_DATE = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?P<fraction>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


# Letters that carry no combining mark in Unicode but are "accented" to a searcher:
# "Tromso" should find "Tromsø" as "Ostbo" finds "Østbø".
_LETTER_FOLDS = str.maketrans(
    {"ø": "o", "æ": "ae", "ð": "d", "þ": "th", "ß": "ss", "ł": "l", "đ": "d", "œ": "oe", "\u0131": "i"}
)


def normalize_string(value: str) -> str:
    """Fold for string search: accents removed, case folded, white space collapsed."""
    decomposed = unicodedata.normalize("NFKD", value.casefold().translate(_LETTER_FOLDS))
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _SPACE.sub(" ", stripped).strip()


def _to_naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def date_range(value: str) -> tuple[datetime, datetime]:
    """The implicit range ``[low, high]`` (naive UTC, inclusive) of a FHIR date, dateTime or instant.

    ``2024`` covers the whole year, ``2024-05`` the month, ``2024-05-03`` the day, a time
    without seconds the minute. A time without a zone is taken as UTC.
    Raises :class:`BadRequest` for a value that is not a FHIR date.
    """
    m = _DATE.match(value.strip())
    if not m:
        raise BadRequest(f"'{value}' is not a valid FHIR date, dateTime or instant")
    try:
        year = int(m["year"])
        if m["month"] is None:
            low = datetime(year, 1, 1)
            high = datetime(year + 1, 1, 1) if year < 9999 else datetime(9999, 12, 31, 23, 59, 59, 999999)
            return low, _minus_tick(high) if year < 9999 else high
        month = int(m["month"])
        if m["day"] is None:
            low = datetime(year, month, 1)
            nxt = datetime(year + (month == 12), month % 12 + 1, 1)
            return low, _minus_tick(nxt)
        day = int(m["day"])
        if m["hour"] is None:
            low = datetime(year, month, day)
            return low, _minus_tick(low + timedelta(days=1))
        tz = m["tz"]
        tzinfo = None
        if tz:
            tzinfo = UTC if tz == "Z" else datetime.strptime(tz.replace(":", ""), "%z").tzinfo
        hour, minute = int(m["hour"]), int(m["minute"])
        if m["second"] is None:
            low = datetime(year, month, day, hour, minute, tzinfo=tzinfo)
            return _to_naive_utc(low), _to_naive_utc(_minus_tick(low + timedelta(minutes=1)))
        second = int(m["second"])
        fraction = m["fraction"]
        if fraction:
            digits = fraction[1:]
            micro = int((digits + "000000")[:6])
            low = datetime(year, month, day, hour, minute, second, micro, tzinfo=tzinfo)
            # The precision of the fraction given (at most microseconds).
            step = timedelta(microseconds=10 ** max(0, 6 - len(digits)))
            return _to_naive_utc(low), _to_naive_utc(_minus_tick(low + step))
        low = datetime(year, month, day, hour, minute, second, tzinfo=tzinfo)
        return _to_naive_utc(low), _to_naive_utc(_minus_tick(low + timedelta(seconds=1)))
    except OverflowError:
        # A valid dateTime whose zone shifts it past the years Python represents (9999-12-31T23:59:59-14:00,
        # 0001-01-01T00:00:00+14:00): it lies beyond every stored moment, so it is pinned to that end.
        edge = datetime.max if int(m["year"]) > 5000 else datetime.min
        return edge, edge
    except ValueError as exc:
        raise BadRequest(f"'{value}' is not a valid FHIR date, dateTime or instant: {exc}") from exc


def _minus_tick(moment: datetime) -> datetime:
    return moment - timedelta(microseconds=1)


def parse_decimal(value: str) -> Decimal:
    try:
        number = Decimal(value.strip())
    except InvalidOperation as exc:
        raise BadRequest(f"'{value}' is not a number") from exc
    if not number.is_finite():
        raise BadRequest(f"'{value}' is not a finite number")
    return number


def decimal_range(number: Decimal) -> tuple[Decimal, Decimal]:
    """The implicit range of a number from its significant figures: ``100`` is [99.5, 100.5).

    Per https://hl7.org/fhir/R4/search.html#number the range is half a unit of the last
    significant digit either side.
    """
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    half = Decimal(5).scaleb(exponent - 1)
    return number - half, number + half


def utc_now() -> datetime:
    """The current instant as naive UTC, the form stored in the database."""
    return datetime.now(UTC).replace(tzinfo=None)


def instant_text(moment: datetime) -> str:
    """Render a naive-UTC timestamp as a FHIR instant (``2024-05-03T10:11:12.123456+00:00``)."""
    return moment.replace(tzinfo=UTC).isoformat()


def as_date(value: date | datetime) -> date:
    return value.date() if isinstance(value, datetime) else value
