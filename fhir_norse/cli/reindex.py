"""``fhir-norse reindex``: compute the search-index rows of stored resources again.

Publishing the content pack at start-up reindexes the base types of every SearchParameter it publishes
for the first time (:mod:`fhir_norse.server.reindex`). This command does the same on demand: for a server
that runs with content publishing off, or after the index extraction changed. Only the index rows are
rewritten; versions, ``meta`` and history stay as they are. It can run while the server serves: each
page of resources is locked against concurrent writers while it is reindexed.

Exit codes: 0 done, 2 an unknown resource type or bad settings. Wire with ``register_commands(subparsers)``
and, for ``args.command in COMMANDS``, ``run_command(args, settings)``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["COMMANDS", "register_commands", "run_command"]

COMMANDS = frozenset({"reindex"})


def register_commands(subparsers: Any) -> None:
    """Add ``reindex`` to the ``fhir-norse`` subcommands (dest ``command``)."""
    parser = subparsers.add_parser(
        "reindex",
        help="compute the search-index rows of stored resources again (after new search parameters)",
        description=(
            "Compute the search-index rows of the stored resources of the given types again, with the "
            "R4 search parameters and those of the content pack. Without --type: the base types of the "
            "content pack's SearchParameters."
        ),
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL (env FHIR_NORSE_DATABASE_URL)")
    parser.add_argument(
        "--type", action="append", dest="types", metavar="TYPE", help="a resource type (repeatable)"
    )


def run_command(args: argparse.Namespace, settings: Any) -> int:
    """Run ``reindex``: one line per type on stdout; the exit code."""
    from fhir_norse.compose import build_service
    from fhir_norse.server.content import content_search_parameters
    from fhir_norse.server.reindex import reindex
    from fhir_norse.store.resource_types import SUPPORTED_TYPE_SET

    types = list(args.types or [])
    if not types:
        types = sorted({str(b) for sp in content_search_parameters(settings.content_dir) for b in sp["base"]})
    unknown = [t for t in types if t not in SUPPORTED_TYPE_SET]
    if unknown:
        print(
            f"fhir-norse reindex: not a resource type this server stores: {', '.join(unknown)}",
            file=sys.stderr,
        )
        return 2
    service = build_service(settings)
    try:
        for res_type, count in reindex(service.kernel, types).items():
            print(f"{res_type}: {count} reindexed")
    finally:
        service.storage.engine.dispose()
    return 0
