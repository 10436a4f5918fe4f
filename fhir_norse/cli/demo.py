"""``fhir-norse demo``: load the demo clinic into a development database and say where to look.

Loads what :mod:`fhir_norse.rom.demo.clinic` describes (the case study's Sonja and Harald, three
synthetic patients, their clinician Kari Berg with her care teams and episodes, open Tasks) through the
FHIR service as the local operator, so everything is scored, indexed and audited like real data. Before
that it brings the schema up to date and publishes the content pack, as ``fhir-norse serve`` does at its
start. Idempotent: a second run changes nothing and says so. Then it prints what it loaded and the pages a
newcomer opens (the caseload and the reports of Sonja and Harald).

Development mode only (``FHIR_NORSE_MODE=development``): the demo's patients are invented, and a
production database is no place for them. ``FHIR_NORSE_DEMO_ON_EMPTY=1`` loads the same clinic when a
development server starts on a database without patients (``make serve``).

Exit codes: 0 loaded (or already loaded), 1 an interaction failed, 2 refused (production mode, content
missing or in conflict, bad settings).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

__all__ = ["COMMANDS", "register_commands", "run_command"]

COMMANDS = frozenset({"demo"})


def register_commands(subparsers: Any) -> None:
    """Add ``demo`` to the ``fhir-norse`` subcommands (dest ``command``)."""
    parser = subparsers.add_parser(
        "demo",
        help="load the demo clinic (patients, a clinician, care teams) into a development database",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL (env FHIR_NORSE_DATABASE_URL)")


def run_command(args: argparse.Namespace, settings: Any) -> int:
    """Run ``demo``; the exit code."""
    from fhir_norse.compose import build_service
    from fhir_norse.outcomes import FhirError
    from fhir_norse.rom.demo import DemoError, load_demo, site_root
    from fhir_norse.server.content import ContentConflict, publish_content
    from fhir_norse.store import migrate as migrations
    from fhir_norse.store.db import create_engine

    if settings.mode != "development":
        print(
            "fhir-norse demo: the demo clinic's patients are invented; load them into a development "
            "database only (FHIR_NORSE_MODE=development)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    engine = create_engine(settings.database_url)
    migrations.upgrade(engine)
    engine.dispose()
    service = build_service(settings)
    try:
        if settings.publish_content:
            publish_content(service, settings.content_dir)
        started = time.monotonic()
        result = load_demo(service, base_url=settings.fhir_base_url(), timezone=settings.messaging_timezone)
        seconds = time.monotonic() - started
    except (DemoError, ContentConflict) as error:
        print(f"fhir-norse demo: {error}", file=sys.stderr)
        return 2
    except FhirError as error:
        print(f"fhir-norse demo: {error.status}: {error.message}", file=sys.stderr)
        return 1
    finally:
        service.storage.engine.dispose()
    for line in result.describe(site_root(settings.fhir_base_url())):
        print(line)
    print(f"({seconds:.1f} s)", file=sys.stderr)
    return 0
