"""The ``fhir-norse`` command: ``serve``, ``migrate``, ``score``, ``calibrate``, ``reindex`` and
the authorization commands."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pydantic import ValidationError

from fhir_norse.cli import auth as auth_cli
from fhir_norse.cli import calibrate as calibrate_cli
from fhir_norse.cli import demo as demo_cli
from fhir_norse.cli import invite as invite_cli
from fhir_norse.cli import reindex as reindex_cli
from fhir_norse.cli import score as score_command
from fhir_norse.config import Settings, load_settings

# Bytes of request headers the HTTP server takes besides the request line (h11 only).
HEADER_ROOM = 64 * 1024
# What each worker of `serve --workers N` builds its app with (uvicorn calls it in every worker).
APP_FACTORY = "fhir_norse.api.app:app_from_environment"


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
        "--workers",
        type=int,
        help="server processes (env FHIR_NORSE_WORKERS; default: one per core; 1: a single process)",
    )
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
    invite_cli.register_commands(sub)
    demo_cli.register_commands(sub)

    args = parser.parse_args(argv)
    if args.command in score_command.COMMANDS:
        return score_command.run_command(args)
    try:
        settings = load_settings(
            database_url=args.database_url,
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
            trusted_proxies=getattr(args, "trusted_proxy", None),
            workers=getattr(args, "workers", None),
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
    if args.command in invite_cli.COMMANDS:
        return invite_cli.run_command(args, settings)
    if args.command in demo_cli.COMMANDS:
        return demo_cli.run_command(args, settings)

    from fhir_norse.store import migrate as migrations
    from fhir_norse.store.db import create_engine
    from fhir_norse.store.maintenance import analyze_stale

    if args.command == "migrate" or (args.command == "serve" and not args.no_migrate):
        engine = create_engine(settings.database_url)
        migrations.upgrade(engine)
        print(f"database at revision {migrations.current_revision(engine)}", file=sys.stderr)
        analyze_stale(engine)  # PostgreSQL: statistics of the tables changed since their last ANALYZE
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
    server_options: dict[str, object] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "access_log": False,
        # X-Forwarded-For is believed only from trusted_proxies, by the app itself (create_app);
        # uvicorn's own default would believe it from any local process.
        "proxy_headers": False,
        # Room for a request target up to max_url_length and the headers, so that a longer URL gets
        # the app's 414 OperationOutcome rather than the HTTP parser's plain-text 400 (when h11 is
        # the parser; httptools has no such limit below 64 KiB).
        "h11_max_incomplete_event_size": settings.max_url_length + HEADER_ROOM,
    }
    workers = settings.worker_count()
    if workers == 1:
        freeze_startup_objects()
        uvicorn.run(app, **server_options)  # type: ignore[arg-type]
        return 0
    # Several processes on one socket, each building its own app from the same settings. The app
    # built above checked them (the key passphrase, the content pack) and published the content
    # once; the workers do neither again, and share what must be shared through the database.
    app.state.service.storage.engine.dispose()
    del app
    _export_settings(settings)
    print(f"fhir-norse starting {workers} worker processes", file=sys.stderr)
    uvicorn.run(APP_FACTORY, factory=True, workers=workers, **server_options)  # type: ignore[arg-type]
    return 0


def _export_settings(settings: Settings) -> None:
    """Put the settings the command line gave into the environment the workers start with (they
    read :class:`Settings` from it, as this process did), and turn content publishing off there."""
    os.environ.update(
        {
            "FHIR_NORSE_DATABASE_URL": settings.database_url,
            "FHIR_NORSE_HOST": settings.host,
            "FHIR_NORSE_PORT": str(settings.port),
            "FHIR_NORSE_TRUSTED_PROXIES": json.dumps(settings.trusted_proxies),
            "FHIR_NORSE_WORKERS": str(settings.worker_count()),
            "FHIR_NORSE_PUBLISH_CONTENT": "false",
            # Workers end with this process (fhir_norse.api.app._exit_with_parent).
            "FHIR_NORSE_SUPERVISOR_PID": str(os.getpid()),
        }
    )
