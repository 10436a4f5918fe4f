"""Grants without HTTP (injected clock): codes, refresh lifetimes, launch handles, the revoked-grant cache,
and what is stored (hashes only)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from fhir_norse.auth.build import build_key_store
from fhir_norse.auth.clients import Client, ClientRegistry
from fhir_norse.auth.grants import CodeGrant, Grants, code_challenge_for
from fhir_norse.auth.smart_tables import AUTH_CODE, AUTH_LAUNCH, AUTH_REFRESH
from fhir_norse.auth.tokens import OAuthError, TokenService
from fhir_norse.config import Settings
from fhir_norse.store.db import create_engine

BASE = "https://fhir.example.no/fhir"
VERIFIER = "v" * 43
REDIRECT = "https://app.example/cb"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(database_url: str) -> Iterator[tuple[Grants, Client, Clock, sa.Engine]]:
    engine = create_engine(database_url)
    clock = Clock()
    clients = ClientRegistry(engine)
    service = TokenService(
        build_key_store(Settings(database_url=database_url, mode="development"), engine), clients, clock=clock
    )
    app = clients.add_app(
        "App",
        kind="public",
        redirect_uris=[REDIRECT],
        scopes="patient/*.rs offline_access",
        launch_types=["ehr"],
    )
    grants = Grants(
        engine, service, code_seconds=60, refresh_days=1, launch_seconds=300, cache_seconds=3600, clock=clock
    )
    yield grants, app, clock, engine
    engine.dispose()


def _grant(app: Client, scope: str = "patient/*.rs offline_access") -> CodeGrant:
    return CodeGrant(
        client_id=app.client_id,
        redirect_uri=REDIRECT,
        code_challenge=code_challenge_for(VERIFIER),
        scope=scope,
        person="Patient/p1",
        patient="p1",
        encounter=None,
        need_patient_banner=False,
        nonce=None,
        auth_time=int(time.time()),
        session_id=None,
    )


def test_codes_expire_and_only_hashes_are_stored(setup: tuple[Grants, Client, Clock, sa.Engine]) -> None:
    grants, app, clock, engine = setup
    code = grants.issue_code(_grant(app))
    clock.now += 61
    with pytest.raises(OAuthError, match="expired"):
        grants.exchange_code(app, code, REDIRECT, VERIFIER, BASE)
    clock.now -= 61
    code = grants.issue_code(_grant(app))
    issued = grants.exchange_code(app, code, REDIRECT, VERIFIER, BASE)
    assert issued.response["need_patient_banner"] is False and issued.person == "Patient/p1"
    refresh = issued.response["refresh_token"]
    with engine.connect() as conn:
        stored = [*conn.execute(sa.select(AUTH_CODE.c.code_hash)).scalars()]
        stored += [*conn.execute(sa.select(AUTH_REFRESH.c.token_hash)).scalars()]
    assert code not in stored and refresh not in stored and all(len(h) == 64 for h in stored)
    # An offline refresh token lives refresh_days from its last rotation.
    clock.now += 86_401
    with pytest.raises(OAuthError, match="expired"):
        grants.refresh(app, refresh, None, BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"code_challenge": "plain-verifier"},
        {"person": "Organization/o1"},
        {"scope": " "},
        {"patient": "not an id"},
    ],
)
def test_issue_code_refuses_malformed_grants(
    setup: tuple[Grants, Client, Clock, sa.Engine], change: dict[str, str]
) -> None:
    grants, app, _, _ = setup
    from dataclasses import replace

    with pytest.raises(ValueError):
        grants.issue_code(replace(_grant(app), **change))  # type: ignore[arg-type]


def test_launch_handles_are_single_use_and_expire(setup: tuple[Grants, Client, Clock, sa.Engine]) -> None:
    grants, app, clock, engine = setup
    handle, lifetime = grants.create_launch(
        created_by="ehr", patient="p1", encounter="e1", client_id=app.client_id
    )
    assert lifetime == 300
    assert grants.resolve_launch(handle, "someone-else") is None
    context = grants.resolve_launch(handle, app.client_id)
    assert context is not None and (context.patient, context.encounter, context.created_by) == (
        "p1",
        "e1",
        "ehr",
    )
    assert grants.resolve_launch(handle, app.client_id) is None
    late, _ = grants.create_launch(created_by="ehr", patient="p1")
    clock.now += 301
    assert grants.resolve_launch(late, app.client_id) is None
    with engine.connect() as conn:
        assert handle not in set(conn.execute(sa.select(AUTH_LAUNCH.c.handle_hash)).scalars())
    with pytest.raises(ValueError):
        grants.create_launch(created_by="ehr", patient="../p1")


def test_revoked_grants_reach_other_workers_through_the_database(
    setup: tuple[Grants, Client, Clock, sa.Engine],
) -> None:
    grants, app, _, engine = setup
    other = Grants(
        engine, grants.tokens, code_seconds=60, refresh_days=1, launch_seconds=300, cache_seconds=0
    )
    issued = grants.exchange_code(app, grants.issue_code(_grant(app)), REDIRECT, VERIFIER, BASE)
    assert issued.grant_id not in grants.revoked_grant_ids()  # loaded now, cached for an hour
    assert other.revoked_grant_ids() == frozenset()
    assert other.revoke_grant(issued.grant_id, "test") is True
    assert other.revoke_grant(issued.grant_id, "again") is False
    assert issued.grant_id in other.revoked_grant_ids()
    assert issued.grant_id not in grants.revoked_grant_ids()  # stale within cache_seconds, by design
    grants.cache_seconds = 0
    assert issued.grant_id in grants.revoked_grant_ids()


def test_authorization_events_render_again_from_their_inputs() -> None:
    from datetime import UTC, datetime

    from fhir_norse.auth.audit import build_authorization_event, render_audit_event

    event = build_authorization_event(
        step="consent",
        outcome="refused",
        client_id="app-1",
        person="Practitioner/dr1",
        patient="Patient/p1",
        scopes="user/*.rs",
        source_address="10.0.0.1",
        recorded=datetime.now(UTC),
        failure_reason="the person declined",
    )
    assert render_audit_event(event.inputs) == event  # type: ignore[attr-defined]
    assert event["subtype"][1]["code"] == "consent" and event["outcome"] == "4"
    assert {"reference": "Practitioner/dr1"} in [a.get("who") for a in event["agent"]]
    assert event["entity"][-1]["what"] == {"reference": "Patient/p1"}
    with pytest.raises(ValueError):
        build_authorization_event(
            step="dance",
            outcome="success",
            client_id=None,
            person=None,
            patient=None,
            scopes=None,
            source_address=None,
            recorded=datetime.now(UTC),
        )
