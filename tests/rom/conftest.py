"""Apps for intake and scoring tests: the pack's Questionnaires are published in every database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from tests.intake_support import publish_questionnaires


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    application = create_app(settings)
    publish_questionnaires(application.state.service)
    yield application
    application.state.service.storage.engine.dispose()
