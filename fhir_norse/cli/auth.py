"""Operator commands of the authorization server, for ``fhir_norse.cli``:

- ``fhir-norse clients add --name NAME --jwks FILE --scope SCOPES`` registers a backend client and
  prints the new client_id; with ``--redirect-uri URI`` (repeatable) it registers a SMART App Launch
  app instead: public with ``--public`` (PKCE only), else confidential-asymmetric with ``--jwks``;
  ``--launch ehr|standalone`` (repeatable or a comma list; default both) names its launches;
- ``fhir-norse clients list`` (kind, scopes, keys, redirect URIs, launches) and
  ``fhir-norse clients revoke CLIENT_ID``;
- ``fhir-norse token --scope SCOPES [--patient ID] [--practitioner ID] [--ttl SECONDS]`` prints an
  access token signed with the server key (``sub`` ``local-operator``, ``aud`` the FHIR base URL);
- ``fhir-norse keys rotate [--retire-now]`` and ``fhir-norse keys list``.

Wire with ``register_commands(subparsers)`` and, for ``args.command in COMMANDS``,
``run_command(args, settings)``. Each command upgrades the schema first (as ``serve`` does).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from fhir_norse.auth.build import build_key_store, build_token_service
from fhir_norse.auth.clients import (
    CONFIDENTIAL,
    LAUNCH_TYPES,
    PUBLIC,
    ClientRegistry,
    is_scope_token,
    parse_resource_scope,
)
from fhir_norse.auth.keys import StoredKey
from fhir_norse.auth.tokens import server_root
from fhir_norse.config import Settings

COMMANDS = frozenset({"clients", "token", "keys"})
OPERATOR = "local-operator"
DEFAULT_MINT_TTL_SECONDS = 3600
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@contextmanager
def _engine(settings: Settings) -> Iterator[sa.Engine]:
    from fhir_norse.store import migrate
    from fhir_norse.store.db import create_engine

    engine = create_engine(
        settings.database_url,
        synchronous=settings.sqlite_synchronous,
        busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        pool_size=2,
    )
    try:
        migrate.upgrade(engine)
        yield engine
    finally:
        engine.dispose()


def fhir_base_url(settings: Settings) -> str:
    """The audience of the tokens minted here: the one the server checks (Settings.fhir_base_url)."""
    return settings.fhir_base_url()


@dataclass(frozen=True, slots=True)
class ClientListing:
    client_id: str
    name: str
    scopes: str
    kids: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    kind: str = "backend"
    redirect_uris: tuple[str, ...] = ()
    launch_types: tuple[str, ...] = ()


def clients_add(settings: Settings, name: str, jwks_path: str | Path, scopes: str) -> str:
    """Register a backend client from a JWK Set file of its public keys; returns its client_id."""
    jwks = json.loads(Path(jwks_path).read_text(encoding="utf-8"))
    with _engine(settings) as engine:
        return ClientRegistry(engine).add(name, jwks, scopes).client_id


def apps_add(
    settings: Settings,
    name: str,
    scopes: str,
    redirect_uris: list[str],
    *,
    public: bool = False,
    jwks_path: str | Path | None = None,
    launch_types: list[str] | None = None,
) -> str:
    """Register a SMART App Launch app (public, or confidential-asymmetric with a JWK Set file);
    returns its client_id."""
    if public and jwks_path is not None:
        raise ValueError("a public app has no keys: give --public or --jwks, not both")
    if not public and jwks_path is None:
        raise ValueError("an app is --public, or confidential with --jwks FILE of its public keys")
    jwks = json.loads(Path(jwks_path).read_text(encoding="utf-8")) if jwks_path is not None else None
    with _engine(settings) as engine:
        client = ClientRegistry(engine).add_app(
            name,
            kind=PUBLIC if public else CONFIDENTIAL,
            redirect_uris=redirect_uris,
            scopes=scopes,
            launch_types=launch_types or list(LAUNCH_TYPES),
            jwks=jwks,
        )
        return client.client_id


def clients_list(settings: Settings) -> list[ClientListing]:
    with _engine(settings) as engine:
        return [
            ClientListing(
                c.client_id,
                c.name,
                " ".join(c.scopes),
                tuple(str(k.get("kid")) for k in c.jwks.get("keys", ())),
                c.created_at,
                c.revoked_at,
                c.kind,
                c.redirect_uris,
                c.launch_types,
            )
            for c in ClientRegistry(engine).list()
        ]


def clients_revoke(settings: Settings, client_id: str) -> None:
    """Revoke a client: no new tokens; its live tokens are refused within the server's cache time."""
    with _engine(settings) as engine:
        ClientRegistry(engine).revoke(client_id)


def mint_token(
    settings: Settings,
    scopes: str,
    patient: str | None = None,
    practitioner: str | None = None,
    ttl: int | None = None,
) -> str:
    """An access token for operators and tests, signed with the server key."""
    items = list(dict.fromkeys(scopes.split()))
    if not items:
        raise ValueError("give at least one scope")
    bad = [s for s in items if not is_scope_token(s)]
    if bad:
        raise ValueError(f"not a scope: {' '.join(bad)}")
    contexts = {p.context for s in items if (p := parse_resource_scope(s)) is not None}
    for value, what in ((patient, "patient"), (practitioner, "practitioner")):
        if value is not None and not _FHIR_ID.match(value):
            raise ValueError(f"--{what} must be a FHIR resource id")
    if "patient" in contexts and patient is None:
        raise ValueError("patient/ scopes need --patient ID")
    if "user" in contexts and practitioner is None:
        raise ValueError("user/ scopes need --practitioner ID")
    longest = settings.mint_max_ttl_seconds
    lifetime = DEFAULT_MINT_TTL_SECONDS if ttl is None else int(ttl)
    if not 1 <= lifetime <= longest:
        raise ValueError(f"--ttl must be between 1 and {longest} seconds")
    with _engine(settings) as engine:
        service = build_token_service(settings, engine)
        token, _jti = service.issue(
            subject=OPERATOR,
            client_id=OPERATOR,
            scope=" ".join(items),
            audience=fhir_base_url(settings),
            ttl=min(lifetime, longest),
            patient=patient,
            practitioner=practitioner,
        )
        return token


def keys_rotate(settings: Settings, retire_now: bool = False) -> str:
    """Make a new signing key; returns its kid. Servers pick it up within their key cache time."""
    with _engine(settings) as engine:
        store = build_key_store(settings, engine)
        store.ensure()
        return store.rotate(retire_now=retire_now)


def keys_list(settings: Settings) -> list[StoredKey]:
    with _engine(settings) as engine:
        return build_key_store(settings, engine).list_keys()


# -- argparse -----------------------------------------------------------------------------------
def register_commands(subparsers: Any) -> None:
    """Add ``clients``, ``token`` and ``keys`` to the ``fhir-norse`` subcommands (dest ``command``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", help="SQLAlchemy URL (env FHIR_NORSE_DATABASE_URL)")

    clients = subparsers.add_parser(
        "clients", help="register, list and revoke SMART backend clients and apps"
    )
    sub = clients.add_subparsers(dest="clients_command", required=True)
    add = sub.add_parser("add", parents=[common], help="register a client or app; prints its client_id")
    add.add_argument("--name", required=True, help="a name for people (shown on the consent page)")
    add.add_argument("--jwks", help="JWK Set file of the client's public keys (RS384/ES384)")
    add.add_argument(
        "--scope",
        required=True,
        help='allowed scopes, e.g. "system/Observation.rs" (backend) or "launch/patient openid fhirUser '
        'patient/*.rs" (app)',
    )
    add.add_argument(
        "--redirect-uri",
        action="append",
        default=[],
        help="an app's redirect URI (repeatable; https, or http on 127.0.0.1/localhost): registers an app",
    )
    add.add_argument("--public", action="store_true", help="a public app (PKCE, no keys)")
    add.add_argument(
        "--launch",
        action="append",
        default=[],
        help="the app's launches: ehr, standalone (repeatable or comma list; default both)",
    )
    sub.add_parser("list", parents=[common], help="list clients")
    revoke = sub.add_parser("revoke", parents=[common], help="revoke a client")
    revoke.add_argument("client_id")

    token = subparsers.add_parser(
        "token", parents=[common], help="mint an access token for operators and tests"
    )
    token.add_argument("--scope", required=True, help='scopes, e.g. "system/*.rs" or "patient/*.rs"')
    token.add_argument("--patient", help="Patient id (patient context; needed for patient/ scopes)")
    token.add_argument("--practitioner", help="Practitioner id (needed for user/ scopes)")
    token.add_argument("--ttl", type=int, help=f"lifetime in seconds (default {DEFAULT_MINT_TTL_SECONDS})")

    keys = subparsers.add_parser("keys", help="the server's token signing keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    rotate = ksub.add_parser("rotate", parents=[common], help="make a new signing key (old ones stay valid)")
    rotate.add_argument(
        "--retire-now", action="store_true", help="invalidate every older key at once (after a compromise)"
    )
    ksub.add_parser("list", parents=[common], help="list signing keys")


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") + "Z" if value else "-"


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``clients``/``token``/``keys``; 0 on success, 1 with a message on stderr otherwise."""
    try:
        if args.command == "clients":
            return _clients(args, settings)
        if args.command == "token":
            print(mint_token(settings, args.scope, args.patient, args.practitioner, args.ttl))
            return 0
        if args.command == "keys":
            if args.keys_command == "rotate":
                kid = keys_rotate(settings, retire_now=args.retire_now)
                print(f"new signing key {kid}")
                return 0
            for key in keys_list(settings):
                state = "signing" if key.retire_after is None else f"retires {_when(key.retire_after)}"
                print(f"{key.kid}  {key.alg}  created {_when(key.created_at)}  {state}")
            return 0
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        message = f"unknown client {exc}" if isinstance(exc, KeyError) else str(exc)
        print(f"fhir-norse {args.command}: {message}", file=sys.stderr)
        return 1
    print(f"fhir-norse: unknown command {args.command}", file=sys.stderr)
    return 2


def _clients(args: argparse.Namespace, settings: Settings) -> int:
    if args.clients_command == "add":
        if args.redirect_uri:
            client_id = apps_add(
                settings,
                args.name,
                args.scope,
                args.redirect_uri,
                public=args.public,
                jwks_path=args.jwks,
                launch_types=args.launch,
            )
        elif args.public or args.launch:
            raise ValueError("an app needs --redirect-uri")
        elif not args.jwks:
            raise ValueError("a backend client needs --jwks FILE")
        else:
            client_id = clients_add(settings, args.name, args.jwks, args.scope)
        print(client_id)
        root = server_root(fhir_base_url(settings))
        print(f"registered; token endpoint {root}/auth/token (assertion aud)", file=sys.stderr)
        return 0
    if args.clients_command == "list":
        for c in clients_list(settings):
            status = f"revoked {_when(c.revoked_at)}" if c.revoked_at else "active"
            line = f"{c.client_id}\t{c.name}\t{c.kind}\t{status}\t{c.scopes}\tkids={','.join(c.kids) or '-'}"
            if c.redirect_uris:
                line += f"\tredirect={','.join(c.redirect_uris)}\tlaunch={','.join(c.launch_types)}"
            print(line)
        return 0
    clients_revoke(settings, args.client_id)
    print(f"revoked {args.client_id}", file=sys.stderr)
    return 0
