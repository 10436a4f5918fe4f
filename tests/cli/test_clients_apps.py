"""``fhir-norse clients add`` for SMART App Launch apps: public and confidential-asymmetric apps, their
redirect URIs and launches, refused redirect URIs, and ``list``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from fhir_norse.cli import auth as cli
from fhir_norse.config import Settings

SCOPES = "launch/patient openid fhirUser offline_access patient/*.rs"


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, base_url="http://fhir.example.no/fhir", mode="development")


def _run(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="fhir-norse")
    cli.register_commands(parser.add_subparsers(dest="command", required=True))
    code = cli.run_command(parser.parse_args(argv), settings)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_public_and_confidential_apps(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True)
    jwks = tmp_path / "app.jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "app-1"}]}))
    add = ("clients", "add", "--scope", SCOPES)
    code, out, _ = _run(
        settings, capsys, *add, "--name", "Diary", "--public", "--redirect-uri", "http://127.0.0.1:8765/cb"
    )
    public_id = out.strip()
    assert code == 0 and public_id
    code, out, _ = _run(
        settings,
        capsys,
        *add,
        "--name",
        "Clinic",
        "--jwks",
        str(jwks),
        "--redirect-uri",
        "https://clinic.example/cb",
        "--redirect-uri",
        "https://clinic.example/cb2",
        "--launch",
        "ehr",
    )
    confidential_id = out.strip()
    assert code == 0
    listed = {row.client_id: row for row in cli.clients_list(settings)}
    assert listed[public_id].kind == "public" and listed[public_id].launch_types == ("ehr", "standalone")
    assert listed[confidential_id].kind == "confidential-asymmetric" and listed[confidential_id].kids == (
        "app-1",
    )
    assert listed[confidential_id].redirect_uris == (
        "https://clinic.example/cb",
        "https://clinic.example/cb2",
    )
    code, out, _ = _run(settings, capsys, "clients", "list")
    assert "public" in out and "redirect=http://127.0.0.1:8765/cb" in out and "launch=ehr" in out
    assert _run(settings, capsys, "clients", "revoke", public_id)[0] == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--redirect-uri", "http://app.example/cb"], "https"),
        (["--redirect-uri", "https://app.example/cb#frag"], "fragment"),
        (["--redirect-uri", "/cb"], "absolute"),
        (["--redirect-uri", "https://app.example/cb", "--launch", "sideways"], "launch"),
        (["--redirect-uri", "https://app.example/cb", "--scope", "system/*.rs"], "not system"),
        (["--launch", "ehr"], "redirect-uri"),
    ],
)
def test_bad_apps_are_refused(
    settings: Settings, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["clients", "add", "--name", "Bad", "--public", "--scope", SCOPES, *extra]
    code, _, err = _run(settings, capsys, *argv)
    assert code == 1 and message in err
    assert cli.clients_list(settings) == []
