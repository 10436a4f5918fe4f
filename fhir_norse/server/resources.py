"""Small facts about resources: ids, server-owned meta, ETags and instants.

See https://hl7.org/fhir/R4/resource.html#id and https://hl7.org/fhir/R4/http.html#versioning.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

import orjson

from fhir_norse.outcomes import BadRequest, NotFound
from fhir_norse.store.resource_types import SUPPORTED_TYPE_SET

ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ETAG = re.compile(r'^\s*(?:W/)?"?([^"]*)"?\s*$')


def check_type(resource_type: str) -> str:
    if resource_type not in SUPPORTED_TYPE_SET:
        raise NotFound(
            f"Resource type '{resource_type}' is not supported by this server", code="not-supported"
        )
    return resource_type


def check_id(resource_id: str) -> str:
    if not ID_PATTERN.match(resource_id):
        raise BadRequest(f"'{resource_id}' is not a valid resource id ([A-Za-z0-9-.]{{1,64}})")
    return resource_id


def new_id() -> str:
    return str(uuid.uuid4())


def now_ms() -> datetime:
    """The current instant as naive UTC, truncated to milliseconds (the precision we publish)."""
    moment = datetime.now(UTC).replace(tzinfo=None)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def instant(moment: datetime) -> str:
    """A FHIR instant with millisecond precision in UTC, e.g. ``2024-05-03T10:11:12.345Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def http_date(moment: datetime) -> str:
    return format_datetime(moment.replace(tzinfo=UTC), usegmt=True)


def parse_http_date(value: str) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def etag(version: int) -> str:
    return f'W/"{version}"'


def parse_etag(value: str) -> str:
    m = _ETAG.match(value)
    if not m or not m.group(1):
        raise BadRequest(f"Malformed ETag '{value}': expected W/\"<versionId>\"")
    return m.group(1)


def stamp_meta(body: dict[str, Any], res_id: str, version: int, last_updated: datetime) -> dict[str, Any]:
    """Set ``id``, ``meta.versionId`` and ``meta.lastUpdated``: the server owns them."""
    meta = dict(body.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = instant(last_updated)
    stamped = {"resourceType": body["resourceType"], "id": res_id}
    stamped.update((k, v) for k, v in body.items() if k not in ("resourceType", "id", "meta"))
    stamped["meta"] = meta
    return stamped


def reference_id(reference: Any, res_type: str) -> str | None:
    """``<id>`` of a relative literal reference ``<res_type>/<id>`` (``/_history/<v>`` allowed)."""
    if not isinstance(reference, str):
        return None
    parts = reference.split("/")
    if (
        len(parts) in (2, 4)
        and parts[0] == res_type
        and parts[1]
        and (len(parts) == 2 or parts[2] == "_history")
    ):
        return parts[1]
    return None


def flat_items(questionnaire: Any) -> list[dict[str, Any]]:
    """Every item of a Questionnaire (or QuestionnaireResponse), depth first, groups included."""
    out: list[dict[str, Any]] = []
    for item in questionnaire.get("item") or []:
        if isinstance(item, dict):
            out.append(item)
            out += flat_items(item)
    return out


def dumps(value: Any) -> str:
    """JSON text of a value (as stored and sent)."""
    return orjson.dumps(value).decode()
