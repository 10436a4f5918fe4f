"""Wiring of the authorization server into an app: one call, :func:`install_auth`.

It puts on ``app.state``:

==============================  ===============================================================
``key_store``                   :class:`~fhir_norse.auth.keys.KeyStore` (first key generated now)
``clients``                     :class:`~fhir_norse.auth.clients.ClientRegistry`
``token_service``               :class:`~fhir_norse.auth.tokens.TokenService`
``grants``                      :class:`~fhir_norse.auth.grants.Grants` (SMART App Launch: codes,
                                refresh tokens, revocation, introspection, EHR launch handles)
``token_verifier``              :class:`~fhir_norse.auth.tokens.TokenVerifier`
``authenticator``               :class:`~fhir_norse.auth.tokens.RequestAuthenticator` (verifier +
                                failed-authentication limits): what ``get_caller`` calls
``token_rate_limiter``          :class:`~fhir_norse.auth.ratelimit.SharedRateLimiter` per client
                                address on ``POST /auth/token`` (counted in the database, so
                                across all workers)
``auth_failure_limiter``        :class:`~fhir_norse.auth.ratelimit.SharedRateLimiter` per address on
                                failed FHIR authentication
``credential_failure_limiter``  the same per presented token
``settings``                    set only if the app has none yet
==============================  ===============================================================

and adds the routes of :mod:`fhir_norse.api.auth_routes` *before* the app's other routes, so
``/fhir/.well-known/smart-configuration`` is not taken for a FHIR read.
"""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import FastAPI

from fhir_norse.auth.build import build_grants, build_key_store, build_token_service
from fhir_norse.auth.ratelimit import SharedRateLimiter
from fhir_norse.auth.tokens import OidcProvider, RequestAuthenticator, TokenVerifier
from fhir_norse.config import Settings

# The builders live in fhir_norse.auth.build (the CLI uses them too); re-exported for existing callers.
__all__ = ["build_grants", "build_key_store", "build_token_service", "install_auth"]


def install_auth(app: FastAPI, settings: Settings, engine: sa.Engine) -> None:
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
    grants = build_grants(settings, engine, service)
    verifier = TokenVerifier(
        key_store,
        service.clients,
        issuer=service.issuer,
        oidc=OidcProvider.from_settings(settings),
        revoked_grants=grants.revoked_grant_ids,
    )
    # In the database: every worker of `fhir-norse serve --workers N` counts against the same limits.
    failures = SharedRateLimiter(engine, "auth-address", settings.auth_failure_limit_per_minute)
    credential_failures = SharedRateLimiter(engine, "auth-token", settings.auth_failure_limit_per_minute)

    state = app.state
    if getattr(state, "settings", None) is None:
        state.settings = settings
    state.key_store = key_store
    state.clients = service.clients
    state.token_service = service
    state.grants = grants
    state.token_verifier = verifier
    state.authenticator = RequestAuthenticator(verifier, failures, credential_failures)
    state.token_rate_limiter = SharedRateLimiter(engine, "token-address", settings.token_rate_per_minute)
    state.auth_failure_limiter = failures
    state.credential_failure_limiter = credential_failures

    before = len(app.router.routes)
    app.include_router(router)
    added = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[:0] = added
