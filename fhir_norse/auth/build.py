"""The authorization server's objects built from :class:`~fhir_norse.config.Settings`, without HTTP.

Shared by the API (:mod:`fhir_norse.api.auth_setup` puts them on the app) and the operator commands
(:mod:`fhir_norse.cli.auth` mints tokens and rotates keys with the same settings).
"""

from __future__ import annotations

import sqlalchemy as sa

from fhir_norse.auth.clients import ClientRegistry
from fhir_norse.auth.grants import Grants
from fhir_norse.auth.keys import KeyStore, passphrase_from
from fhir_norse.auth.ratelimit import SharedRateLimiter
from fhir_norse.auth.tokens import TokenService
from fhir_norse.config import Settings

__all__ = ["build_grants", "build_key_store", "build_token_service"]


def build_key_store(settings: Settings, engine: sa.Engine) -> KeyStore:
    """The key store, with old keys kept for the longest token we may have issued."""
    return KeyStore(
        engine,
        passphrase_from(settings),
        max_token_lifetime=max(settings.token_ttl_seconds, settings.mint_max_ttl_seconds),
        refresh_seconds=settings.auth_cache_seconds,
    )


def build_token_service(
    settings: Settings, engine: sa.Engine, key_store: KeyStore | None = None
) -> TokenService:
    """The token endpoint's service (``POST /auth/token``, and ``fhir-norse token``)."""
    return TokenService(
        key_store or build_key_store(settings, engine),
        ClientRegistry(engine, refresh_seconds=settings.auth_cache_seconds),
        token_ttl=settings.token_ttl_seconds,
        issuer=settings.token_issuer or None,
        client_limiter=SharedRateLimiter(engine, "token-client", settings.token_rate_per_minute),
    )


def build_grants(settings: Settings, engine: sa.Engine, token_service: TokenService) -> Grants:
    """SMART App Launch codes, refresh tokens, grants and launch handles (``/auth/token``, the
    browser's consent step, ``/auth/revoke``, ``/auth/introspect``, ``/auth/launch``)."""
    return Grants(
        engine,
        token_service,
        code_seconds=settings.authorization_code_seconds,
        refresh_days=settings.refresh_token_days,
        launch_seconds=settings.launch_seconds,
        session_minutes=settings.signin_session_minutes,
        cache_seconds=settings.auth_cache_seconds,
    )
