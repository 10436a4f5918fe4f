"""Several storage hooks on one resource type, run as one (:class:`~fhir_norse.server.repository.Kernel`
holds one hook per type)."""

from __future__ import annotations

from collections.abc import Mapping

from fhir_norse.outcomes import Issue
from fhir_norse.server.repository import JsonDict, Repository, StorageHook, WriteOutcome
from fhir_norse.store.storage import StoredResource


class ChainedHook(StorageHook):
    """Runs ``hooks`` in order: the first ``existing`` answer wins; every check and every
    before-commit step runs, their warnings together."""

    def __init__(self, *hooks: StorageHook) -> None:
        self.hooks = hooks

    def existing(self, repo: Repository, body: JsonDict) -> StoredResource | None:
        for hook in self.hooks:
            found = hook.existing(repo, body)
            if found is not None:
                return found
        return None

    def before_storage(
        self, repo: Repository, res_id: str, body: JsonDict, previous: StoredResource | None
    ) -> None:
        for hook in self.hooks:
            hook.before_storage(repo, res_id, body, previous)

    def before_commit(
        self, repo: Repository, outcome: WriteOutcome, previous: StoredResource | None
    ) -> list[Issue]:
        warnings: list[Issue] = []
        for hook in self.hooks:
            warnings += hook.before_commit(repo, outcome, previous)
        return warnings


def merge_hooks(*maps: Mapping[str, StorageHook]) -> dict[str, StorageHook]:
    """One hook per type from several maps: a type in more than one gets a :class:`ChainedHook` (in the
    order of the maps)."""
    found: dict[str, list[StorageHook]] = {}
    for hooks in maps:
        for res_type, hook in hooks.items():
            found.setdefault(res_type, []).append(hook)
    return {t: hooks[0] if len(hooks) == 1 else ChainedHook(*hooks) for t, hooks in found.items()}
