"""Reindexing: the search-index rows of stored resources computed again with the server's parameters.

A search parameter the server gains (a content pack's SearchParameter, such as ``Flag?status=``) indexes
what is written from then on; the resources stored before it would stay invisible to it. Publishing the
content pack reindexes the base types of every SearchParameter it publishes for the first time
(:func:`fhir_norse.server.content.publish_content`), so an upgraded server finds its existing Flags by
status at once.

Only the index rows change: each resource keeps its version, ``meta`` and history, so reindexing is no
interaction and leaves no AuditEvent. Each page is one transaction with its rows locked against
concurrent writers.
"""

from __future__ import annotations

from collections.abc import Iterable

from fhir_norse.server.repository import Kernel, loads

PAGE = 500


def reindex(kernel: Kernel, res_types: Iterable[str], *, page: int = PAGE) -> dict[str, int]:
    """Recompute the index rows of every live resource of ``res_types``; the number done per type."""
    done: dict[str, int] = {}
    for res_type in sorted(set(res_types)):
        after, count = 0, 0
        while True:
            with kernel.storage.write() as uow:
                batch = uow.lock_page(res_type, after_pk=after, count=page)
                for stored in batch:
                    rows = kernel.extractor.extract(loads(stored.body_text))
                    uow.replace_index_rows(stored.pk, res_type, rows)
            if not batch:
                break
            after, count = batch[-1].pk, count + len(batch)
        done[res_type] = count
    return done
