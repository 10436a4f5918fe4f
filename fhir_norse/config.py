"""Settings from the environment (prefix ``FHIR_NORSE_``) and CLI flags.

Built by :func:`load_settings`, never as an import-time singleton, so tests and the CLI
each make their own.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SQLITE_PATH = Path("var") / "fhir-norse.sqlite3"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FHIR_NORSE_", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_SQLITE_PATH}",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db",
    )
    host: str = "127.0.0.1"
    port: int = 8080
    # The absolute base URL clients use, for fullUrl, Location and links, and the audience every
    # access token must name. When unset: http://<host>:<port>/fhir in production, never the request's
    # Host header; derived from the request in development mode only. Set it behind a reverse proxy.
    base_url: str | None = None
    max_body_bytes: int = 10 * 1024 * 1024
    # The longest request target (path and query) answered; longer ones get 414. httptools, the HTTP
    # parser uvicorn uses, refuses request lines past 64 KiB itself, hence the upper bound.
    max_url_length: int = Field(default=16 * 1024, ge=1024, le=60 * 1024)
    default_count: int = 50
    max_count: int = 1000
    # Bounds on one search (README, "Limits"): name=value pairs, values of all criteria together
    # (comma-separated alternatives count one each), and the database time a search may take.
    search_max_parameters: int = Field(default=50, gt=0)
    search_max_values: int = Field(default=200, gt=0)
    search_timeout_seconds: float = Field(default=10.0, gt=0)
    # R4 search parameters indexed and answered on top of the advertised ones
    # (fhir_norse/store/search/advertised.py), comma-separated Type.code: "Observation.combo-code,...".
    # Run `fhir-norse reindex --type <Type>` after adding one so resources stored before are found.
    search_extra_parameters: str = ""
    # SQLite durability: FULL syncs the WAL on every commit, so a committed write survives a
    # power cut; NORMAL is faster but may lose the last commits on power loss.
    sqlite_synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    sqlite_busy_timeout_ms: int = 30_000
    # Connections per server process (and as many more under a burst): `serve` runs one process per core.
    db_pool_size: int = Field(default=5, ge=1)
    # PostgreSQL: analyze tables whose rows changed by more than 10 % since their statistics were taken
    # (fhir_norse/store/maintenance.py), checked every this many seconds; 0 turns the check off.
    db_statistics_interval_s: float = Field(default=60.0, ge=0)
    log_level: str = "INFO"
    # Server processes of `fhir-norse serve` (each with its own app and connection pool; migrations
    # run once before they start). None: one per core (os.cpu_count()); 1: a single process.
    workers: int | None = Field(default=None, ge=1, le=256)
    # Production unless development is chosen explicitly: development accepts a built-in key
    # passphrase, production refuses to start without a real one.
    mode: Literal["development", "production"] = "production"

    # --- authorization (SMART on FHIR backend services) ---
    # Encrypts the server's private signing keys at rest. Required outside development mode.
    key_passphrase: SecretStr = SecretStr("")
    # The issuer of our access tokens; derived from base_url when unset.
    token_issuer: str | None = None
    # Lifetime of the access tokens POST /auth/token issues.
    token_ttl_seconds: int = Field(default=300, gt=0)
    # The longest lifetime of a token `fhir-norse token` mints; retired signing keys stay published
    # for the longest lifetime a token may have.
    mint_max_ttl_seconds: int = Field(default=24 * 3600, gt=0)
    # Token requests per client address and minute (POST /auth/token).
    token_rate_per_minute: int = 30
    # Failed FHIR authentications per minute, per address and per presented token, before further
    # failing attempts get 429 for a while (a valid token is always accepted).
    auth_failure_limit_per_minute: int = 20
    # Refused requests without a verified credential (401, 429, refused token requests) are audited
    # once per address, kind and window: the first in full, the rest as one event with a count.
    refusal_audit_window_seconds: float = Field(default=60.0, gt=0)
    # Reverse proxies (IP addresses or CIDR networks) whose X-Forwarded-For and X-Forwarded-Proto
    # are believed; empty (the default): none, the peer address is the client's.
    trusted_proxies: list[str] = Field(default_factory=list)
    # How stale the in-memory signing key set and revoked-client set may get (seconds).
    auth_cache_seconds: float = Field(default=30.0, ge=0)
    # A hospital identity provider whose tokens are accepted too (JWKS from a file; no network).
    oidc_issuer: str | None = None
    oidc_jwks_file: str | None = None
    oidc_audience: str | None = None
    # The content pack (questionnaires/, profiles/): this checkout unless another pack is named.
    content_dir: Path = PROJECT_ROOT
    # Publish the content pack at start-up (tests that do not need it turn this off).
    publish_content: bool = True
    # Browser origins allowed by CORS; empty (the default) turns CORS off.
    cors_origins: list[str] = Field(default_factory=list)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: list[str]) -> list[str]:
        """Addresses or networks only (a host name or ``*`` would trust what anyone can claim),
        written as networks: ``10.0.0.1`` is ``10.0.0.1/32``."""
        try:
            return [str(ipaddress.ip_network(entry.strip(), strict=False)) for entry in value]
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: not an IP address or network ({exc})") from None

    def worker_count(self) -> int:
        """The number of server processes: ``workers``, else one per core."""
        return self.workers or os.cpu_count() or 1

    def fhir_base_url(self) -> str:
        """The FHIR base URL from configuration alone: ``base_url``, else this server's own address."""
        return (self.base_url or f"http://{self.host}:{self.port}/fhir").rstrip("/")

    @model_validator(mode="after")
    def _refuse_weak_secrets(self) -> Settings:
        """Outside development mode, secrets must be set and must not be the published defaults."""
        if self.mode == "development":
            return self
        passphrase = self.key_passphrase.get_secret_value()
        if not passphrase:
            raise ValueError(
                "FHIR_NORSE_KEY_PASSPHRASE must be set in production (or set FHIR_NORSE_MODE=development)"
            )
        if passphrase in _KNOWN_DEFAULTS or len(passphrase) < 16:
            raise ValueError("FHIR_NORSE_KEY_PASSPHRASE is a default or shorter than 16 characters")
        return self


# Values published in this repository (documentation, development mode) that must never guard real keys.
_KNOWN_DEFAULTS = frozenset(
    {
        "changeme",
        "change-me",
        "secret",
        "password",
        "development",
        "fhir-norse-development-only-key-passphrase",
    }
)


def load_settings(**overrides: object) -> Settings:
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)  # type: ignore[arg-type]
