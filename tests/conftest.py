"""Shared fixtures: every database-backed test runs on SQLite and, when
``FHIR_NORSE_TEST_POSTGRES_URL`` is set, on PostgreSQL too (each test session in its own schema).

With ``FHIR_NORSE_REQUIRE_POSTGRES=1`` (CI) an unreachable PostgreSQL is an error, not a skip,
and the number of PostgreSQL tests that passed is written to ``var/postgres-lane.txt``.
"""

from __future__ import annotations

import gc
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

# Their tables are on METADATA (emptied between PostgreSQL tests).
import fhir_norse.auth.link_tables
import fhir_norse.auth.smart_tables
import fhir_norse.auth.tables
import fhir_norse.store.audit_tables
import fhir_norse.store.bulk_tables
import fhir_norse.store.document_tables
import fhir_norse.store.scheduling_tables
import fhir_norse.store.subscription_tables  # noqa: F401
from fhir_norse.api.app import create_app
from fhir_norse.api.auth_setup import build_key_store
from fhir_norse.config import Settings
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from fhir_norse.store.tables import METADATA
from tests.fhir_r4_client import check_response
from tests.tokens import bearer

# No app built by a test runs the administration scheduler in the background (it would write Tasks and
# send messages between a test's steps); the scheduler's tests tick it themselves or turn it on.
os.environ.setdefault("FHIR_NORSE_SCHEDULER_INTERVAL_S", "0")
# Nor does a tick render the feedback report's PDFs (about a second each) unless a test asks for it
# (tests/web/test_report_documents.py).
os.environ.setdefault("FHIR_NORSE_REPORT_DOCUMENTS", "0")
# Nor do export jobs run in a background thread: tests/api/test_bulk_export.py runs them itself.
os.environ.setdefault("FHIR_NORSE_BULK_EXPORT_INTERVAL_S", "0")
# Nor does the Subscription delivery worker run in the background: its tests call tick() themselves.
os.environ.setdefault("FHIR_NORSE_SUBSCRIPTION_INTERVAL_S", "0")

PG_URL = os.environ.get("FHIR_NORSE_TEST_POSTGRES_URL")
REQUIRE_PG = os.environ.get("FHIR_NORSE_REQUIRE_POSTGRES") == "1"
LANE_FILE = Path(__file__).resolve().parents[1] / "var" / "postgres-lane.txt"
_pg_passed = 0


# The longest test files (browsers, server processes), longest first, start before all others: pytest-xdist
# hands out whole files in collection order, and one of these at the end would leave the other process
# idle for minutes.
_LONG_FIRST = (
    "tests/web/test_form_browser.py",
    "tests/web/test_journey_browser.py",
    "tests/smart/",
    "tests/web/",
    "tests/api/test_workers.py",
    "tests/cli/test_cli.py",
)


def _long_first(item: pytest.Item) -> int:
    path = item.path.relative_to(Path(__file__).resolve().parents[1]).as_posix()
    return next(
        (rank for rank, prefix in enumerate(_LONG_FIRST) if path.startswith(prefix)), len(_LONG_FIRST)
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_long_first)  # stable: the order within each group stays
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any("postgres" in str(v) for v in callspec.params.values()):
            item.add_marker(pytest.mark.postgres)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _pg_passed
    if report.when == "call" and report.passed and "postgres" in report.keywords:
        _pg_passed += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Under pytest-xdist the controller sees every worker's reports (pytest_runtest_logreport above) and
    # writes the count; a worker, which saw only its own, does not.
    if PG_URL and not hasattr(session.config, "workerinput"):
        LANE_FILE.parent.mkdir(parents=True, exist_ok=True)
        LANE_FILE.write_text(f"{_pg_passed}\n")


@pytest.fixture(scope="module", autouse=True)
def _collect_garbage_per_file() -> Iterator[None]:
    """Collect garbage after each test file, so an object it left open (a socket, a file) is reported
    as a ResourceWarning in that file, not in whichever later test the collector happens to run in."""
    yield
    gc.collect()


def _with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def pg_schema_url() -> Iterator[str]:
    if not PG_URL:
        if REQUIRE_PG:
            pytest.fail("FHIR_NORSE_REQUIRE_POSTGRES=1 but FHIR_NORSE_TEST_POSTGRES_URL is not set")
        pytest.skip("PostgreSQL lane: set FHIR_NORSE_TEST_POSTGRES_URL to run it")
    schema = f"fhir_norse_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL at {PG_URL} is not reachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    url = _with_search_path(PG_URL, schema)
    _migrate_with_key(url)
    # The session's signing key, restored before every test: a test that rotates keys or stores one
    # under another passphrase must not leave it to the next.
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}_keys"')
        conn.exec_driver_sql(
            f'CREATE TABLE "{schema}_keys".auth_signing_key AS SELECT * FROM "{schema}".auth_signing_key'
        )
    yield url
    with admin.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}_keys" CASCADE')
    admin.dispose()


def _migrate_with_key(url: str) -> None:
    """Migrate, and generate the server's signing key once (RSA generation is slow per test)."""
    engine = create_engine(url)
    migrate.upgrade(engine)
    build_key_store(Settings(database_url=url, mode="development"), engine).ensure()
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.sqlite3"
    _migrate_with_key(f"sqlite:///{path}")
    return path


# Emptied between PostgreSQL tests: every table of the schema (so a new one cannot carry rows from one
# test into the next); the signing key is restored (as a restarted server keeps it).
_ALL_TABLES = [t for t in METADATA.sorted_tables if t.name != "auth_signing_key"]


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a fresh SQLite file, or the session's PostgreSQL schema emptied."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "fhir.sqlite3"
        shutil.copy(template, path)
        yield f"sqlite:///{path}"
        return
    url: str = request.getfixturevalue("pg_schema_url")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in _ALL_TABLES)
        conn.exec_driver_sql(f"TRUNCATE {names}, auth_signing_key RESTART IDENTITY CASCADE")
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
        conn.exec_driver_sql(f'INSERT INTO auth_signing_key SELECT * FROM "{schema}_keys".auth_signing_key')
    engine.dispose()
    yield url


@pytest.fixture
def settings(database_url: str) -> Settings:
    # Content publishing is tested on its own (tests/api/test_content_publish.py); it would slow every app.
    return Settings(
        database_url=database_url,
        base_url="http://testserver/fhir",
        mode="development",
        publish_content=False,
    )


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    application = create_app(settings)
    yield application
    application.state.service.storage.engine.dispose()


@pytest.fixture
def system_client(app: FastAPI) -> Iterator[TestClient]:
    """A client with a ``system/*.cruds`` token: every interaction, no compartment."""
    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.headers.update(bearer(app))
        test_client.event_hooks["response"] = [check_response]
        yield test_client
