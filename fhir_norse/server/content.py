"""Publishing the content pack (Questionnaires, terminology, profiles) as read-only resources.

https://hl7.org/fhir/R4/resource.html#versions. Content files are loaded at start-up. Each
``url|version`` is stored once, as its own resource (id ``<file id>-<version>``), so responses
that name an older version keep resolving after a newer one is published. Loading is
idempotent; a file whose content changed while its version did not is refused, because two
different artefacts must never share one canonical version. Published resources carry a
``meta.tag`` and cannot be updated, patched or deleted through the API, and no client resource may
take a url of the pack, in any version (:mod:`fhir_norse.server.published`).

The pack's SearchParameters also extend what the server indexes and searches
(:func:`search_registry`); publishing one for the first time reindexes the stored resources of its base
types (:mod:`fhir_norse.server.reindex`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import orjson

from fhir_norse.auth.caller import Caller
from fhir_norse.outcomes import FhirError
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.published import CONTENT_TYPES, PUBLISHED_TAG
from fhir_norse.server.reindex import reindex
from fhir_norse.server.search.typed import Where
from fhir_norse.server.subscriptions.topics import is_topic, topic_canonical
from fhir_norse.store.search.advertised import ExtraParameterError
from fhir_norse.store.search.params import CustomParameterError, SearchParamRegistry, registry_with

# Folders of a content pack; ``questionnaires/source`` holds authoring sources, not resources.
CONTENT_FOLDERS = ("questionnaires", "profiles")
_SKIP_DIRS = frozenset({"source"})
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9\-.]")


class ContentConflict(Exception):
    """A content file changed but kept its ``url|version``."""


@dataclass
class PublishReport:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # Resources reindexed per type, for the SearchParameters published for the first time.
    reindexed: dict[str, int] = field(default_factory=dict)


def content_files(root: Path) -> Iterator[Path]:
    for folder in CONTENT_FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.json")):
            if _SKIP_DIRS.intersection(path.relative_to(base).parts[:-1]):
                continue
            yield path


def content_search_parameters(root: Path) -> list[dict[str, Any]]:
    """The SearchParameter resources of the content pack under ``root``."""
    found = (orjson.loads(path.read_bytes()) for path in content_files(root))
    return [r for r in found if isinstance(r, dict) and r.get("resourceType") == "SearchParameter"]


@cache
def search_registry(root: Path, enabled: tuple[tuple[str, str], ...] = ()) -> SearchParamRegistry:
    """The advertised R4 search parameters plus the pack's SearchParameters (:class:`ContentConflict` for
    one the server cannot add) plus the site-``enabled`` ones, loaded once per content pack."""
    try:
        return registry_with(content_search_parameters(root), enabled)
    except (CustomParameterError, ExtraParameterError) as error:
        raise ContentConflict(f"{root}: {error}") from error


def _comparable(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


def stored_id(resource: dict[str, Any]) -> str:
    base = str(resource.get("id") or resource["url"].rstrip("/").rsplit("/", 1)[-1])
    return _ID_UNSAFE.sub("-", f"{base}-{resource['version']}")[:64]


def publish_content(service: FhirService, root: Path) -> PublishReport:
    """Store every content resource under ``root`` that is not stored yet (see module doc)."""
    ctx = RequestContext(caller=Caller.operator(), base_url="urn:fhir-norse:content")
    report = PublishReport()
    new_params: set[str] = set()
    for path in content_files(root):
        resource = orjson.loads(path.read_bytes())
        if isinstance(resource, dict) and is_topic(resource):
            _publish_topic(service, ctx, path, resource, report)
            continue
        if not isinstance(resource, dict) or resource.get("resourceType") not in CONTENT_TYPES:
            continue
        if not resource.get("url") or not resource.get("version"):
            raise ContentConflict(f"{path}: a content resource needs url and version")
        res_type, canonical = resource["resourceType"], f"{resource['url']}|{resource['version']}"
        with service.session(ctx) as repo:
            where = Where(res_type, uris={"url": resource["url"]}, tokens={"version": resource["version"]})
            found = repo.find(where, 2)
            if found:
                if _comparable(orjson.loads(found[0].body_text or "{}")) != _comparable(resource):
                    raise ContentConflict(
                        f"{path}: {res_type} {canonical} is already published with other content; "
                        "give the changed file a new version"
                    )
                report.unchanged.append(canonical)
                continue
            meta = dict(resource.get("meta") or {})
            meta["tag"] = [*meta.get("tag", []), PUBLISHED_TAG]
            body = {**resource, "id": stored_id(resource), "meta": meta}
            try:
                # The server publishes its own content (only it may write the tag and a pack url); the
                # operator's audit trail still records each publication.
                outcome = repo.as_server().update(res_type, body["id"], body)
            except FhirError as error:
                raise ContentConflict(f"{path}: {error.message}") from error
            repo.audit("update", res_type, body["id"], version=outcome.stored.version)
            report.created.append(canonical)
            if res_type == "SearchParameter":
                new_params.update(str(base) for base in resource.get("base") or [])
    if new_params:
        report.reindexed = reindex(service.kernel, new_params)
    return report


def _publish_topic(
    service: FhirService, ctx: RequestContext, path: Path, resource: dict[str, Any], report: PublishReport
) -> None:
    """Publish a backported SubscriptionTopic (a ``Basic``: its url and version are extensions, so it is
    stored under the id ``<file id>-<version>`` and found by that id)."""
    canonical = topic_canonical(resource)
    if canonical is None or not canonical[1] or not resource.get("id"):
        raise ContentConflict(f"{path}: a SubscriptionTopic needs an id, a url and a version")
    res_id = _ID_UNSAFE.sub("-", f"{resource['id']}-{canonical[1]}")[:64]
    label = f"{canonical[0]}|{canonical[1]}"
    with service.session(ctx) as repo:
        found = repo.uow.current("Basic", res_id)
        if found is not None and not found.deleted:
            if _comparable(orjson.loads(found.body_text or "{}")) != _comparable(resource):
                raise ContentConflict(
                    f"{path}: SubscriptionTopic {label} is already published with other content; "
                    "give the changed file a new version"
                )
            report.unchanged.append(label)
            return
        meta = dict(resource.get("meta") or {})
        meta["tag"] = [*meta.get("tag", []), PUBLISHED_TAG]
        try:
            outcome = repo.as_server().update("Basic", res_id, {**resource, "id": res_id, "meta": meta})
        except FhirError as error:
            raise ContentConflict(f"{path}: {error.message}") from error
        repo.audit("update", "Basic", res_id, version=outcome.stored.version)
        report.created.append(label)
