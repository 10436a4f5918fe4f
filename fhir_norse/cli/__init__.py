"""The ``fhir-norse`` command: ``serve``, ``migrate``, ``score``, ``calibrate`` and
the authorization commands."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from fhir_norse.cli import auth as auth_cli
from fhir_norse.cli import calibrate as calibrate_cli
from fhir_norse.cli import score as score_command
from fhir_norse.config import load_settings


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL (env FHIR_NORSE_DATABASE_URL); default: SQLite file under ./var/",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fhir-norse", description="fhir-norse FHIR R4 server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    _common(serve)
    serve.add_argument("--host", help="interface to bind (env FHIR_NORSE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env FHIR_NORSE_PORT, default 8080)")
    serve.add_argument("--no-migrate", action="store_true", help="do not upgrade the schema on start")

    migrate = sub.add_parser("migrate", help="upgrade the database schema to the newest revision")
    _common(migrate)
    auth_cli.register_commands(sub)
    calibrate_cli.register_commands(sub)
    score_command.register_commands(sub)

    args = parser.parse_args(argv)
    if args.command in score_command.COMMANDS:
        return score_command.run_command(args)
    try:
        settings = load_settings(
            database_url=args.database_url, host=getattr(args, "host", None), port=getattr(args, "port", None)
        )
    except ValidationError as exc:
        print(f"fhir-norse: invalid settings: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    if args.command in auth_cli.COMMANDS:
        return auth_cli.run_command(args, settings)
    if args.command in calibrate_cli.COMMANDS:
        return calibrate_cli.run_command(args, settings)

    from fhir_norse.store import migrate as migrations
    from fhir_norse.store.db import create_engine

    if args.command == "migrate" or (args.command == "serve" and not args.no_migrate):
        engine = create_engine(settings.database_url)
        migrations.upgrade(engine)
        print(f"database at revision {migrations.current_revision(engine)}", file=sys.stderr)
        engine.dispose()
        if args.command == "migrate":
            return 0

    import uvicorn

    from fhir_norse.api.app import configure_logging, create_app, freeze_startup_objects

    configure_logging(settings.log_level)
    print(f"fhir-norse serving FHIR R4 at http://{settings.host}:{settings.port}/fhir", file=sys.stderr)
    mode = "FHIR_NORSE_MODE=development " if settings.mode == "development" else ""
    print(
        f"get an access token with: {mode}.venv/bin/fhir-norse token --scope 'system/*.cruds' "
        "(add --database-url if you gave one), then send 'Authorization: Bearer <token>'",
        file=sys.stderr,
    )
    from fhir_norse.server.content import ContentConflict

    try:
        app = create_app(settings)
    except ContentConflict as exc:
        print(f"fhir-norse: content refused: {exc}", file=sys.stderr)
        return 2
    freeze_startup_objects()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )
    return 0
