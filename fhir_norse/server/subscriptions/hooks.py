"""The storage hooks of topic-based Subscriptions: the Subscription's own writes, and the outbox.

**Subscription** (:class:`SubscriptionHook`), on every write path: the resource is checked
(:func:`.model.parse_subscription`, 400 otherwise); its ``channel.header`` values are taken out of the
body before it is stored and kept sealed in ``subscription_state`` (never in the resource, so never in
a read, search, history or notification). An update without ``channel.header`` keeps the stored values;
one with it replaces them. A client sets ``status`` ``requested`` (to start or restart delivery: the
worker performs the handshake and makes it ``active``) or ``off``; ``active`` and ``error`` are the
server's, so a client's value is replaced by the stored one (``requested`` for a new Subscription). The
client that creates a Subscription owns it: its client id and scopes are recorded, and bound what a
``full-resource`` notification may carry.

**The outbox** (:class:`OutboxHook`) runs before commit on every write of a type some topic triggers on
(REST, Bundle entries, and the derived writes of scoring): for each live Subscription (requested,
active, error) on a topic the change fires, whose filters all match, it writes an event with the
Subscription's next event number in the same transaction (:func:`.state.record_event`). The live
Subscriptions per topic are cached in the process and reloaded when the generation counter, bumped by
every Subscription write, has moved: one primary-key read per triggering write.

Both hooks ring the delivery workers' :class:`~.wakeup.Doorbell` for a transaction that gives them
work (events; a Subscription ``requested``, whose handshake is due): they deliver once it has
committed rather than at their next poll.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from fhir_norse.auth.sealed import Sealer
from fhir_norse.outcomes import Issue
from fhir_norse.server.repository import JsonDict, Repository, StorageHook, WriteOutcome, loads
from fhir_norse.server.search.typed import Where
from fhir_norse.server.subscriptions import state
from fhir_norse.server.subscriptions.model import LIVE_STATUSES, Filter, SubscriptionSpec, parse_subscription
from fhir_norse.server.subscriptions.topics import TopicRegistry
from fhir_norse.server.subscriptions.wakeup import Doorbell
from fhir_norse.store.rows import ReferenceRow
from fhir_norse.store.storage import StoredResource

_HEADERS_MEMO = "subscription-headers"
_LIMIT = 100_000


class SubscriptionHook(StorageHook):
    """Checks Subscriptions, seals their headers, keeps their delivery state (module doc)."""

    def __init__(
        self,
        topics: TopicRegistry,
        sealer: Sealer,
        *,
        allow_http: bool = False,
        doorbell: Doorbell | None = None,
    ) -> None:
        self.topics = topics
        self.sealer = sealer
        self.allow_http = allow_http
        self.doorbell = doorbell

    def topic_canonicals(self) -> list[str]:
        """``url|version`` of every topic, for the CapabilityStatement."""
        return sorted(f"{t.url}|{t.version}" for t in self.topics)

    def before_storage(
        self, repo: Repository, res_id: str, body: JsonDict, previous: StoredResource | None
    ) -> None:
        parse_subscription(res_id, body, self.topics, allow_http=self.allow_http)
        channel = body.get("channel") or {}
        # parse_subscription checked them; out of the body before anything stores or returns it.
        repo.memo[(_HEADERS_MEMO, res_id)] = channel.pop("header", None)
        if repo.server:
            return
        before = None
        if previous is not None and not previous.deleted:
            before = loads(previous.body_text).get("status")
        asked = body.get("status")
        if asked not in ("requested", "off"):
            body["status"] = before if before in ("active", "error", "requested") else "requested"

    def before_commit(
        self, repo: Repository, outcome: WriteOutcome, previous: StoredResource | None
    ) -> list[Issue]:
        conn = repo.uow.conn
        res_id = outcome.stored.res_id
        state.bump_generation(conn)
        if outcome.body is None:
            state.delete_state(conn, res_id)
            return []
        headers = repo.memo.pop((_HEADERS_MEMO, res_id), None)
        sealed = None if headers is None else self.sealer.seal(orjson.dumps(headers), res_id)
        current = state.get_state(conn, res_id)
        if current is None:
            caller = repo.caller
            state.insert_state(conn, res_id, caller.client_id, caller.scopes, sealed)
        elif headers is not None:
            state.update_state(conn, res_id, headers_sealed=sealed)
        before = None if previous is None or previous.deleted else loads(previous.body_text).get("status")
        if current is not None and outcome.body.get("status") == "requested" and before != "requested":
            # (Re)started by its owner: a new handshake, a clean failure count.
            state.update_state(conn, res_id, handshake_done=False, failures=0, retry_at=state.utcnow())
        if self.doorbell is not None and outcome.body.get("status") == "requested":
            self.doorbell.ring_after_commit(repo)  # its handshake is due
        return []

    def headers(self, sealed: str | None, res_id: str) -> list[str]:
        """The ``Name: value`` headers of a Subscription, opened."""
        if sealed is None:
            return []
        value = orjson.loads(self.sealer.open(sealed, res_id))
        return [str(v) for v in value] if isinstance(value, list) else []


@dataclass(frozen=True, slots=True)
class _Live:
    generation: int
    by_topic: Mapping[str, tuple[SubscriptionSpec, ...]]


class ActiveSubscriptions:
    """The live Subscriptions per topic url, cached per process (module doc)."""

    def __init__(self, topics: TopicRegistry) -> None:
        self.topics = topics
        self._lock = threading.Lock()
        self._live: _Live | None = None

    def for_topic(self, repo: Repository, topic_url: str) -> tuple[SubscriptionSpec, ...]:
        current = state.generation(repo.uow.conn)
        live = self._live
        if live is None or live.generation != current:
            with self._lock:
                live = self._live
                if live is None or live.generation != current:
                    live = self._live = _Live(current, self._load(repo))
        return live.by_topic.get(topic_url, ())

    def _load(self, repo: Repository) -> dict[str, tuple[SubscriptionSpec, ...]]:
        found: dict[str, list[SubscriptionSpec]] = {}
        server = repo.as_server()
        for status in LIVE_STATUSES:
            for stored in server.find(Where("Subscription", tokens={"status": status}), _LIMIT):
                try:
                    spec = parse_subscription(
                        stored.res_id, loads(stored.body_text), self.topics, allow_http=True
                    )
                except Exception:
                    continue
                found.setdefault(spec.topic, []).append(spec)
        return {url: tuple(specs) for url, specs in found.items()}


class OutboxHook(StorageHook):
    """Writes the events of a change for every matching live Subscription (module doc)."""

    def __init__(
        self, topics: TopicRegistry, active: ActiveSubscriptions, doorbell: Doorbell | None = None
    ) -> None:
        self.topics = topics
        self.active = active
        self.doorbell = doorbell

    def before_commit(
        self, repo: Repository, outcome: WriteOutcome, previous: StoredResource | None
    ) -> list[Issue]:
        if outcome.body is None:
            return []  # no topic of this server triggers on delete
        stored = outcome.stored
        res_type = stored.res_type
        interaction = "create" if previous is None or previous.deleted else "update"
        current: JsonDict | None = None
        before: JsonDict | None = None
        matcher: _Matcher | None = None
        for topic in self.topics.for_type(res_type):
            subscriptions = self.active.for_topic(repo, topic.url)
            if not subscriptions:
                continue
            if current is None:
                current = {**outcome.body, "resourceType": res_type, "id": stored.res_id}
                before = None if interaction == "create" or previous is None else loads(previous.body_text)
                matcher = _Matcher(repo, current)
            if not topic.fires(res_type, interaction, before, current):
                continue
            assert matcher is not None
            for spec in subscriptions:
                if all(matcher.matches(f) for f in spec.filters if f.res_type == res_type):
                    number = state.record_event(
                        repo.uow.conn,
                        spec.res_id,
                        topic.url,
                        res_type,
                        stored.res_id,
                        stored.version,
                        interaction,
                    )
                    if number is not None and self.doorbell is not None:
                        self.doorbell.ring_after_commit(repo)
        return []


class _Matcher:
    """Evaluates filters against one changed resource (its patient looked up once)."""

    def __init__(self, repo: Repository, resource: JsonDict) -> None:
        self.repo = repo
        self.resource = resource
        self._patients: set[str] | None = None

    def patients(self) -> set[str]:
        if self._patients is None:
            rows = self.repo.kernel.extractor.extract(self.resource)
            self._patients = {
                r.target_id
                for r in rows
                if isinstance(r, ReferenceRow)
                and r.param == "patient"
                and r.target_type == "Patient"
                and r.target_id
                and r.url is None
            }
        return self._patients

    def matches(self, flt: Filter) -> bool:
        if flt.parameter == "patient":
            wanted = {v.removeprefix("Patient/") for v in flt.values}
            return bool(self.patients() & wanted)
        if flt.parameter == "code":
            return _code_matches(self.resource.get("code"), flt.values)
        if flt.parameter == "care-team":
            return self._linked("CareTeam", "patient", flt.values)
        if flt.parameter == "organization":
            return self._organization(flt.values)
        return False

    def _ids(self, values: Iterable[str], res_type: str) -> list[str]:
        return [v.removeprefix(f"{res_type}/") for v in values]

    def _linked(self, res_type: str, param: str, values: Iterable[str]) -> bool:
        """Whether one of ``values`` (live resources of ``res_type``) names the patient by ``param``."""
        patients = self.patients()
        if not patients:
            return False
        server = self.repo.as_server()
        for patient in patients:
            where = Where(res_type, references={param: f"Patient/{patient}"})
            found = {s.res_id for s in server.find(where, _LIMIT)}
            if found & set(self._ids(values, res_type)):
                return True
        return False

    def _organization(self, values: Iterable[str]) -> bool:
        wanted = set(self._ids(values, "Organization"))
        server = self.repo.as_server()
        for patient in self.patients():
            stored = server.get("Patient", patient)
            body: dict[str, Any] = loads(stored.body_text) if stored is not None else {}
            managing = (body.get("managingOrganization") or {}).get("reference")
            if isinstance(managing, str) and managing.removeprefix("Organization/") in wanted:
                return True
            for org in wanted:
                where = Where(
                    "EpisodeOfCare",
                    references={"patient": f"Patient/{patient}", "organization": f"Organization/{org}"},
                )
                if server.find(where, 1):
                    return True
        return False


def doorbell_of(hooks: Mapping[str, StorageHook]) -> Doorbell | None:
    """The doorbell the Subscription hooks among a kernel's hooks ring (alone or in a chain)."""
    for hook in hooks.values():
        for candidate in list(getattr(hook, "hooks", ())) or [hook]:
            if isinstance(candidate, SubscriptionHook | OutboxHook) and candidate.doorbell is not None:
                return candidate.doorbell
    return None


def _code_matches(concept: Any, values: Iterable[str]) -> bool:
    codings = (
        [c for c in (concept or {}).get("coding") or [] if isinstance(c, Mapping)]
        if isinstance(concept, Mapping)
        else []
    )
    for value in values:
        system, sep, code = value.rpartition("|")
        for coding in codings:
            same_code = not code or coding.get("code") == code
            if (not sep and coding.get("code") == code) or (
                sep and (system or code) and same_code and (not system or coding.get("system") == system)
            ):
                return True
    return False
