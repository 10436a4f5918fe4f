"""Wiring of the authorization server into an app: one call, :func:`install_auth`.

It puts on ``app.state``:

============================  ===============================================================
``key_store``                 :class:`~fhir_norse.auth.keys.KeyStore` (first key generated now)
``clients``                   :class:`~fhir_norse.auth.clients.ClientRegistry`
``token_service``             :class:`~fhir_norse.auth.tokens.TokenService`
``token_verifier``            :class:`~fhir_norse.auth.tokens.TokenVerifier`
``authenticator``             :class:`~fhir_norse.auth.tokens.RequestAuthenticator` (verifier +
                              failed-authentication limit): what ``get_caller`` calls
``token_rate_limiter``        :class:`~fhir_norse.auth.ratelimit.RateLimiter` per client address
                              on ``POST /auth/token``
``auth_failure_limiter``      :class:`~fhir_norse.auth.ratelimit.RateLimiter` per address on
                              failed FHIR authentication
``settings``                  set only if the app has none yet
============================  ===============================================================

and adds the routes of :mod:`fhir_norse.api.auth_routes` *before* the app's other routes, so
``/fhir/.well-known/smart-configuration`` is not taken for a FHIR read.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI

from fhir_norse.auth.clients import ClientRegistry
from fhir_norse.auth.keys import KeyStore, passphrase_from
from fhir_norse.auth.ratelimit import RateLimiter
from fhir_norse.auth.tokens import OidcProvider, RequestAuthenticator, TokenService, TokenVerifier

DEFAULT_TOKEN_TTL_SECONDS = 300
DEFAULT_MINT_MAX_TTL_SECONDS = 24 * 3600
DEFAULT_TOKEN_RATE_PER_MINUTE = 30
DEFAULT_AUTH_FAILURE_LIMIT_PER_MINUTE = 20
# How stale the in-memory key set and revoked-client set may get (seconds).
DEFAULT_AUTH_CACHE_SECONDS = 30.0


def token_ttl(settings: Any) -> int:
    return int(getattr(settings, "token_ttl_seconds", None) or DEFAULT_TOKEN_TTL_SECONDS)


def mint_max_ttl(settings: Any) -> int:
    return int(getattr(settings, "mint_max_ttl_seconds", None) or DEFAULT_MINT_MAX_TTL_SECONDS)


def build_key_store(settings: Any, engine: sa.Engine) -> KeyStore:
    """The key store, with old keys kept for the longest token we may have issued."""
    return KeyStore(
        engine,
        passphrase_from(settings),
        max_token_lifetime=max(token_ttl(settings), mint_max_ttl(settings)),
        refresh_seconds=float(getattr(settings, "auth_cache_seconds", None) or DEFAULT_AUTH_CACHE_SECONDS),
    )


def build_token_service(settings: Any, engine: sa.Engine, key_store: KeyStore | None = None) -> TokenService:
    cache = float(getattr(settings, "auth_cache_seconds", None) or DEFAULT_AUTH_CACHE_SECONDS)
    per_minute = int(getattr(settings, "token_rate_per_minute", DEFAULT_TOKEN_RATE_PER_MINUTE))
    return TokenService(
        key_store or build_key_store(settings, engine),
        ClientRegistry(engine, refresh_seconds=cache),
        token_ttl=token_ttl(settings),
        issuer=getattr(settings, "auth_issuer", None) or None,
        client_limiter=RateLimiter(per_minute),
    )


def install_auth(app: FastAPI, settings: Any, engine: sa.Engine) -> None:
    """Create the authorization objects on ``app.state`` and add the auth routes (see module doc).

    Generates the first signing key if the database has none and checks that the passphrase
    decrypts the current one, so a misconfiguration fails at start-up. ``engine`` must point at a
    database migrated to revision 0002 or later.
    """
    from fhir_norse.api.auth_routes import router

    key_store = build_key_store(settings, engine)
    key_store.ensure()
    key_store.check_passphrase()
    service = build_token_service(settings, engine, key_store)
    verifier = TokenVerifier(
        key_store, service.clients, issuer=service.issuer, oidc=OidcProvider.from_settings(settings)
    )
    failures = RateLimiter(
        int(getattr(settings, "auth_failure_limit_per_minute", DEFAULT_AUTH_FAILURE_LIMIT_PER_MINUTE))
    )

    state = app.state
    if getattr(state, "settings", None) is None:
        state.settings = settings
    state.key_store = key_store
    state.clients = service.clients
    state.token_service = service
    state.token_verifier = verifier
    state.authenticator = RequestAuthenticator(verifier, failures)
    state.token_rate_limiter = RateLimiter(
        int(getattr(settings, "token_rate_per_minute", DEFAULT_TOKEN_RATE_PER_MINUTE))
    )
    state.auth_failure_limiter = failures

    before = len(app.router.routes)
    app.include_router(router)
    added = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[:0] = added
