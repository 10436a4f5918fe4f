"""Fixtures of the SMART App Launch tests: one local login provider per module, and the clinic's server
running for real for each test (over SQLite and PostgreSQL, as ``database_url`` gives)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.smart.site import Clinic, Provider, login_provider, running_clinic
from tests.support.oidc_provider import require_node

# The test app's origin for the HTTP tests (nothing listens there: the flow stops at its redirect URI).
APP_ORIGIN = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    require_node()
    tmp: Path = tmp_path_factory.mktemp("oidc")
    with login_provider(tmp) as found:
        yield found


@pytest.fixture
def clinic(database_url: str, provider: Provider) -> Iterator[Clinic]:
    with running_clinic(database_url, provider, APP_ORIGIN) as running:
        yield running
