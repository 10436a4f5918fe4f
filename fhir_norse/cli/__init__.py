"""The ``fhir-norse`` command: ``serve``, ``migrate``, ``score``, ``calibrate``, ``reindex`` and
the authorization commands."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from fhir_norse.cli import auth as auth_cli
from fhir_norse.cli import calibrate as calibrate_cli
from fhir_norse.cli import reindex as reindex_cli
from fhir_norse.cli import score as score_command
from fhir_norse.config import load_settings

# Bytes of request headers the HTTP server takes besides the request line (h11 only).
HEADER_ROOM = 64 * 1024


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
    serve.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDRESS",
        help="a reverse proxy (IP address or CIDR network) whose X-Forwarded-For is believed; repeat "
        "for several (env FHIR_NORSE_TRUSTED_PROXIES, a JSON list; default: none)",
    )

    migrate = sub.add_parser("migrate", help="upgrade the database schema to the newest revision")
    _common(migrate)
    auth_cli.register_commands(sub)
    calibrate_cli.register_commands(sub)
    reindex_cli.register_commands(sub)
    score_command.register_commands(sub)

    args = parser.parse_args(argv)
    if args.command in score_command.COMMANDS:
        return score_command.run_command(args)
    try:
        settings = load_settings(
            database_url=args.database_url,
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
            trusted_proxies=getattr(args, "trusted_proxy", None),
        )
    except ValidationError as exc:
        print(f"fhir-norse: invalid settings: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    if args.command in auth_cli.COMMANDS:
        return auth_cli.run_command(args, settings)
    if args.command in calibrate_cli.COMMANDS:
        return calibrate_cli.run_command(args, settings)
    if args.command in reindex_cli.COMMANDS:
        return reindex_cli.run_command(args, settings)

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
    if settings.mode != "development" and not settings.base_url:
        print(
            f"access tokens must name {settings.fhir_base_url()} as their audience; set "
            "FHIR_NORSE_BASE_URL to the address clients use (behind a reverse proxy above all)",
            file=sys.stderr,
        )
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
        # X-Forwarded-For is believed only from trusted_proxies, by the app itself (create_app);
        # uvicorn's own default would believe it from any local process.
        proxy_headers=False,
        # Room for a request target up to max_url_length and the headers, so that a longer URL gets
        # the app's 414 OperationOutcome rather than the HTTP parser's plain-text 400 (when h11 is
        # the parser; httptools has no such limit below 64 KiB).
        h11_max_incomplete_event_size=settings.max_url_length + HEADER_ROOM,
    )
    return 0
