"""Settings refuse empty or default secrets outside an explicit development mode."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from fhir_norse.config import Settings


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
