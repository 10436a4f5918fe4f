"""Topic-based Subscriptions for R4, as the Subscriptions R5 Backport IG (STU 1.1) defines them.

https://hl7.org/fhir/uv/subscriptions-backport/. The topics are content (:mod:`.topics`); a Subscription
is checked and its secrets sealed by a storage hook (:mod:`.hooks`); every change a topic fires on writes
an event to the outbox in its own transaction (:mod:`.hooks`, :mod:`.state`); a worker delivers them
over rest-hook in order, at least once (:mod:`.delivery`); ``$status`` and ``$events`` answer what
happened (:mod:`.operations`). Generic FHIR machinery: nothing here knows the domain, whose topics are
files of the content pack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fhir_norse.auth.sealed import Sealer
from fhir_norse.server.repository import StorageHook
from fhir_norse.server.subscriptions.hooks import ActiveSubscriptions, OutboxHook, SubscriptionHook
from fhir_norse.server.subscriptions.topics import TopicRegistry, load_topics
from fhir_norse.server.subscriptions.wakeup import Doorbell


@dataclass(frozen=True)
class SubscriptionHooks:
    """The hooks the kernel runs: one for Subscription, the outbox for each type a topic triggers on."""

    subscription: SubscriptionHook
    outbox: OutboxHook
    topics: TopicRegistry

    def by_type(self) -> Mapping[str, StorageHook]:
        hooks: dict[str, StorageHook] = {"Subscription": self.subscription}
        for res_type in sorted(self.topics.trigger_types()):
            hooks[res_type] = self.outbox
        return hooks


def subscription_hooks(content_dir: Path, sealer: Sealer, *, allow_http: bool = False) -> SubscriptionHooks:
    """The Subscription hooks over the topics of the content pack under ``content_dir``."""
    topics = load_topics(content_dir)
    doorbell = Doorbell()
    return SubscriptionHooks(
        subscription=SubscriptionHook(topics, sealer, allow_http=allow_http, doorbell=doorbell),
        outbox=OutboxHook(topics, ActiveSubscriptions(topics), doorbell),
        topics=topics,
    )


def advertised_topics(hooks: Mapping[str, StorageHook]) -> list[str]:
    """``url|version`` of the topics the kernel's Subscription hook runs (none without one)."""
    hook = hooks.get("Subscription")
    candidates = list(getattr(hook, "hooks", ())) or [hook]
    for candidate in candidates:
        if isinstance(candidate, SubscriptionHook):
            return candidate.topic_canonicals()
    return []
