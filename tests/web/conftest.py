"""The patient form's app: the pack's Questionnaires published, the form installed (tests/web/support.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from tests.intake_support import publish_questionnaires
from tests.web.support import Clock, FormSite, site_of


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(settings: Settings, clock: Clock) -> Iterator[FastAPI]:
    application = create_app(settings, clock=clock)
    publish_questionnaires(application.state.service)
    yield application
    application.state.service.storage.engine.dispose()


@pytest.fixture
def site(app: FastAPI, clock: Clock) -> FormSite:
    return site_of(app, clock)
