"""Settings from the environment (prefix ``FHIR_NORSE_``) and CLI flags.

Built by :func:`load_settings`, never as an import-time singleton, so tests and the CLI
each make their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SQLITE_PATH = Path("var") / "fhir-norse.sqlite3"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FHIR_NORSE_", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_SQLITE_PATH}",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db",
    )
    host: str = "127.0.0.1"
    port: int = 8080
    # The absolute base URL clients use, for fullUrl, Location and links. Derived from the
    # request when unset (set it behind a reverse proxy).
    base_url: str | None = None
    max_body_bytes: int = 10 * 1024 * 1024
    default_count: int = 50
    max_count: int = 1000
    # SQLite durability: FULL syncs the WAL on every commit, so a committed write survives a
    # power cut; NORMAL is faster but may lose the last commits on power loss.
    sqlite_synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    sqlite_busy_timeout_ms: int = 30_000
    db_pool_size: int = 10
    log_level: str = "INFO"
    # development turns on conveniences that must never run in production.
    mode: Literal["development", "production"] = "development"


def load_settings(**overrides: object) -> Settings:
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)  # type: ignore[arg-type]
