"""A small clinic for the SMART App Launch tests: this server running for real on a loopback port, a local
OpenID Connect provider standing in for both national logins (``oidc-provider`` on npm: ID-porten for
patients with a client secret, HelseID for clinicians with ``private_key_jwt``), registered apps, and
patients, a clinician, a care team and scores.

People at the login provider (login name -> what the provider says about them):

- ``sonja``: national identity number 13097812345, which is Sonja's ``Patient.identifier``;
- ``ukjent``: a number no Patient has; ``tvilling``: a number two Patients share;
- ``dr-berg``: HPR 9144889, Dr Berg, in Sonja's care team (CareTeam participant);
- ``dr-annen``: HPR 9100001, a Practitioner here, in nobody's care team.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from fhir_norse.api.app import create_app
from fhir_norse.auth.caller import Caller
from fhir_norse.config import Settings
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from tests.support.oidc_provider import LocalOidc, rsa_client_key
from tests.web.browser import free_port, serving

NIN = "urn:oid:2.16.578.1.12.4.1.4.1"
HPR = "urn:oid:2.16.578.1.12.4.1.4.4"
HPR_CLAIM = "helseid://claims/hpr/hpr_number"
PATIENT_LOGIN_CLIENT = "fhir-norse-idporten"
CLINICIAN_LOGIN_CLIENT = "fhir-norse-helseid"
ACCOUNTS: dict[str, dict[str, Any]] = {
    "sonja": {"pid": "13097812345", "name": "Sonja Testesen", "acr": "idporten-loa-high"},
    "ukjent": {"pid": "01019900000", "name": "Ukjent Person", "acr": "idporten-loa-high"},
    "tvilling": {"pid": "02029900000", "name": "Tvilling Testesen", "acr": "idporten-loa-high"},
    "dr-berg": {HPR_CLAIM: "9144889", "name": "Kari Berg"},
    "dr-annen": {HPR_CLAIM: "9100001", "name": "Ola Annen"},
    # The demo clinic's clinicians (fhir_norse/rom/demo/clinic.yaml).
    "kari": {HPR_CLAIM: "999900001", "name": "Kari Berg"},
    "jonas": {HPR_CLAIM: "999900002", "name": "Jonas Lie"},
}
SCORES = 3  # Observations of Sonja's


@dataclass
class Provider:
    """The local login provider and what our server needs to use it."""

    oidc: LocalOidc
    server_port: int
    clinician_key_file: Path


@contextmanager
def login_provider(tmp: Path) -> Iterator[Provider]:
    """One ``oidc-provider`` for a test module; our server will run on ``server_port``."""
    port = free_port()
    callback = f"http://127.0.0.1:{port}/auth/login/callback"
    private, public = rsa_client_key("helseid-client")
    key_file = tmp / "helseid-client.jwk.json"
    key_file.write_text(json.dumps(private))
    clients: list[dict[str, Any]] = [
        {
            "client_id": PATIENT_LOGIN_CLIENT,
            "client_secret": "a-long-enough-test-secret-for-the-patient-login",
            "redirect_uris": [callback],
            "token_endpoint_auth_method": "client_secret_post",
        },
        {
            "client_id": CLINICIAN_LOGIN_CLIENT,
            "jwks": {"keys": [public]},
            "redirect_uris": [callback],
            "token_endpoint_auth_method": "private_key_jwt",
        },
    ]
    with LocalOidc(clients=clients, accounts=ACCOUNTS) as oidc:
        yield Provider(oidc, port, key_file)


@dataclass
class Clinic:
    """The server (live on ``root``), its app registrations and the people in it."""

    app: FastAPI
    root: str
    provider: Provider
    app_origin: str = ""
    sonja: str = ""
    other_patient: str = ""
    encounter: str = ""
    dr_berg: str = ""
    dr_annen: str = ""
    apps: dict[str, str] = field(default_factory=dict)
    app_keys: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"{self.root}/fhir"

    @property
    def service(self) -> FhirService:
        service: FhirService = self.app.state.service
        return service

    def system_token(self, scope: str = "system/*.cruds") -> str:
        token, _jti = self.app.state.token_service.issue(
            subject="test-ehr", client_id="test-ehr", scope=scope, audience=self.base
        )
        return str(token)

    def create(self, resource: dict[str, Any]) -> str:
        ctx = RequestContext(caller=Caller.operator(), base_url=self.base)
        result = self.service.create(ctx, resource["resourceType"], resource)
        body = result.body if result.body is not None else json.loads(result.raw or "{}")
        return str(body["id"])

    def launch(self, *, patient: str, practitioner: str | None, encounter: str | None = None) -> str:
        """What an EHR does before opening an app: ``POST /auth/launch`` with its backend token."""
        body = {"patient": patient, "encounter": encounter, "practitioner": practitioner}
        answer = httpx.post(
            f"{self.root}/auth/launch",
            json={k: v for k, v in body.items() if v},
            headers={"Authorization": f"Bearer {self.system_token('system/Patient.rs system/Encounter.rs')}"},
        )
        assert answer.status_code in (200, 201), answer.text
        return str(answer.json()["launch"])


def _settings(database_url: str, provider: Provider, cors: list[str]) -> Settings:
    root = f"http://127.0.0.1:{provider.server_port}"
    return Settings(
        database_url=database_url,
        base_url=f"{root}/fhir",
        mode="development",
        publish_content=False,
        cors_origins=cors,
        patient_login_issuer=provider.oidc.issuer,
        patient_login_client_id=PATIENT_LOGIN_CLIENT,
        patient_login_client_secret="a-long-enough-test-secret-for-the-patient-login",  # type: ignore[arg-type]
        patient_login_acr_values="idporten-loa-high",
        clinician_login_issuer=provider.oidc.issuer,
        clinician_login_client_id=CLINICIAN_LOGIN_CLIENT,
        clinician_login_client_key_file=provider.clinician_key_file,
        clinician_login_acr_values=None,
    )


def _seed(clinic: Clinic) -> None:
    clinic.sonja = clinic.create(
        {
            "resourceType": "Patient",
            "identifier": [{"system": NIN, "value": "13097812345"}],
            "name": [{"given": ["Sonja"], "family": "Testesen"}],
            "birthDate": "1978-09-13",
        }
    )
    clinic.other_patient = clinic.create(
        {
            "resourceType": "Patient",
            "identifier": [{"system": NIN, "value": "24128012345"}],
            "name": [{"given": ["Harald"], "family": "Testesen"}],
            "birthDate": "1980-12-24",
        }
    )
    for _ in range(2):
        clinic.create(
            {
                "resourceType": "Patient",
                "identifier": [{"system": NIN, "value": "02029900000"}],
                "name": [{"given": ["Tvilling"], "family": "Testesen"}],
            }
        )
    clinic.dr_berg = clinic.create(
        {
            "resourceType": "Practitioner",
            "identifier": [{"system": HPR, "value": "9144889"}],
            "name": [{"given": ["Kari"], "family": "Berg"}],
        }
    )
    clinic.dr_annen = clinic.create(
        {
            "resourceType": "Practitioner",
            "identifier": [{"system": HPR, "value": "9100001"}],
            "name": [{"given": ["Ola"], "family": "Annen"}],
        }
    )
    clinic.create(
        {
            "resourceType": "CareTeam",
            "status": "active",
            "subject": {"reference": f"Patient/{clinic.sonja}"},
            "participant": [{"member": {"reference": f"Practitioner/{clinic.dr_berg}"}}],
        }
    )
    clinic.encounter = clinic.create(
        {
            "resourceType": "Encounter",
            "status": "in-progress",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{clinic.sonja}"},
        }
    )
    for value in range(SCORES):
        clinic.create(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "test score"},
                "subject": {"reference": f"Patient/{clinic.sonja}"},
                "valueInteger": value,
            }
        )


def register_apps(clinic: Clinic, app_origin: str) -> None:
    """A public app and a confidential-asymmetric one, both for EHR and standalone launch."""
    clients = clinic.app.state.clients
    redirect = f"{app_origin}/index.html"
    scopes = (
        "patient/*.rs user/*.rs launch launch/patient launch/encounter openid fhirUser profile "
        "offline_access online_access"
    )
    public = clients.add_app(
        "Mitt skjema (public)",
        kind="public",
        redirect_uris=[redirect],
        scopes=scopes,
        launch_types=["ehr", "standalone"],
    )
    private, public_jwk = rsa_client_key("app-key")
    private["alg"] = public_jwk["alg"] = "RS384"
    confidential = clients.add_app(
        "Behandlerappen (confidential)",
        kind="confidential-asymmetric",
        redirect_uris=[redirect],
        scopes=scopes,
        launch_types=["ehr", "standalone"],
        jwks={"keys": [public_jwk]},
    )
    clinic.apps = {"public": public.client_id, "confidential": confidential.client_id}
    clinic.app_keys = {"confidential": private}


@contextmanager
def running_clinic(database_url: str, provider: Provider, app_origin: str) -> Iterator[Clinic]:
    """The clinic's server on ``provider.server_port`` for one test."""
    settings = _settings(database_url, provider, [app_origin])
    app = create_app(settings)
    clinic = Clinic(
        app=app, root=f"http://127.0.0.1:{provider.server_port}", provider=provider, app_origin=app_origin
    )
    with ExitStack() as stack:
        stack.callback(app.state.service.storage.engine.dispose)
        _seed(clinic)
        register_apps(clinic, app_origin)
        stack.enter_context(serving(app, provider.server_port))
        yield clinic
