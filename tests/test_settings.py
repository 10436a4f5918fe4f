"""Settings refuse empty or default secrets outside an explicit development mode; every setting the
code reads is a typed field that the environment (``FHIR_NORSE_<NAME>``) sets."""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError

from fhir_norse.api.auth_setup import install_auth
from fhir_norse.auth.keys import passphrase_from
from fhir_norse.cli import auth as cli_auth
from fhir_norse.config import Settings
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine


def test_production_is_the_default_and_needs_a_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FHIR_NORSE_MODE", raising=False)
    monkeypatch.delenv("FHIR_NORSE_KEY_PASSPHRASE", raising=False)
    with pytest.raises(ValidationError, match="KEY_PASSPHRASE must be set"):
        Settings()


@pytest.mark.parametrize("weak", ["changeme", "fhir-norse-development-only-key-passphrase", "short"])
def test_default_or_short_passphrases_are_refused(weak: str) -> None:
    with pytest.raises(ValidationError, match="default or shorter"):
        Settings(mode="production", key_passphrase=SecretStr(weak))


def test_a_real_passphrase_and_development_mode_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        Settings(mode="production", key_passphrase=SecretStr("a long hospital-specific secret")).mode
        == "production"
    )
    monkeypatch.setenv("FHIR_NORSE_MODE", "development")
    assert Settings().key_passphrase.get_secret_value() == ""


# -- every setting the code reads is a typed field, settable from the environment -----------------
AUTH_ENVIRONMENT = {
    "FHIR_NORSE_MODE": "production",
    "FHIR_NORSE_KEY_PASSPHRASE": "a long hospital-specific secret",
    "FHIR_NORSE_TOKEN_TTL_SECONDS": "120",
    "FHIR_NORSE_MINT_MAX_TTL_SECONDS": "7200",
    "FHIR_NORSE_AUTH_CACHE_SECONDS": "4.5",
    "FHIR_NORSE_TOKEN_ISSUER": "https://fhir.example.no/issuer",
    "FHIR_NORSE_TOKEN_RATE_PER_MINUTE": "7",
    "FHIR_NORSE_AUTH_FAILURE_LIMIT_PER_MINUTE": "3",
    "FHIR_NORSE_OIDC_ISSUER": "https://idp.hospital.example",
    "FHIR_NORSE_OIDC_AUDIENCE": "fhir-norse",
    "FHIR_NORSE_BASE_URL": "https://fhir.example.no/fhir",
}


def test_auth_settings_from_the_environment_reach_the_objects_that_use_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    jwks_file = tmp_path / "idp.jwks.json"
    jwks_file.write_text(json.dumps({"keys": []}), encoding="utf-8")
    for name, value in AUTH_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FHIR_NORSE_OIDC_JWKS_FILE", str(jwks_file))
    monkeypatch.setenv("FHIR_NORSE_DATABASE_URL", f"sqlite:///{tmp_path / 'auth.sqlite3'}")

    settings = Settings()
    assert (settings.token_ttl_seconds, settings.mint_max_ttl_seconds, settings.auth_cache_seconds) == (
        120,
        7200,
        4.5,
    )
    assert passphrase_from(settings) == "a long hospital-specific secret"

    engine = create_engine(settings.database_url)
    try:
        migrate.upgrade(engine)
        app = FastAPI()
        install_auth(app, settings, engine)
    finally:
        engine.dispose()
    state = app.state
    # Retired keys stay published for the longest token: the minted ones here.
    assert state.key_store.max_token_lifetime == 7200
    assert state.key_store.refresh_seconds == 4.5
    assert state.clients.refresh_seconds == 4.5
    assert state.token_service.token_ttl == 120
    assert state.token_service.issuer == "https://fhir.example.no/issuer"
    assert state.token_verifier.issuer == "https://fhir.example.no/issuer"
    assert state.token_service.client_limiter.limit == 7
    assert state.token_rate_limiter.limit == 7
    assert state.auth_failure_limiter.limit == 3
    assert state.authenticator.failures is state.auth_failure_limiter
    oidc = state.token_verifier.oidc
    assert oidc is not None and (oidc.issuer, oidc.audience) == ("https://idp.hospital.example", "fhir-norse")

    # The operator command mints tokens no longer than mint_max_ttl_seconds.
    with pytest.raises(ValueError, match="between 1 and 7200 seconds"):
        cli_auth.mint_token(settings, "system/*.rs", ttl=7201)
    assert cli_auth.mint_token(settings, "system/*.rs", ttl=7200).count(".") == 2


def test_the_auth_defaults_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*AUTH_ENVIRONMENT, "FHIR_NORSE_OIDC_JWKS_FILE"]:
        monkeypatch.delenv(name, raising=False)
    settings = Settings(mode="development")
    assert settings.token_ttl_seconds == 300
    assert settings.mint_max_ttl_seconds == 24 * 3600
    assert settings.auth_cache_seconds == 30.0
    assert settings.token_rate_per_minute == 30
    assert settings.auth_failure_limit_per_minute == 20
    assert settings.token_issuer is None and settings.oidc_issuer is None


def _settings_reads(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """``(line, name)`` of every ``<...>settings.<name>`` and ``getattr(<...>settings, "<name>")``."""

    def is_settings(node: ast.expr) -> bool:
        return (isinstance(node, ast.Name) and node.id == "settings") or (
            isinstance(node, ast.Attribute) and node.attr == "settings"
        )

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_settings(node.value):
            yield node.lineno, node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and node.args
            and is_settings(node.args[0])
        ):
            yield node.lineno, f"{node.func.id}(settings, ...)"


def test_the_code_reads_only_typed_settings() -> None:
    """Every ``settings.<name>`` in the package is a field (or method) of Settings, read as an
    attribute: a name read with ``getattr(settings, name, default)`` could never be set."""
    allowed = set(Settings.model_fields) | {n for n in dir(Settings) if not n.startswith("_")}
    package = Path(__file__).resolve().parents[1] / "fhir_norse"
    unknown = [
        f"{path.relative_to(package.parent)}:{line}: {name}"
        for path in sorted(package.rglob("*.py"))
        for line, name in _settings_reads(ast.parse(path.read_text(encoding="utf-8")))
        if name not in allowed
    ]
    assert unknown == []
