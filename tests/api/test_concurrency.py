"""Concurrent writers: nothing lost, nothing half-written, no 500s.

Runs the interactions from several threads at once against the same database (SQLite and
PostgreSQL), as several server threads would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from fhir_norse.auth.caller import Caller
from fhir_norse.compose import build_service
from fhir_norse.config import Settings
from fhir_norse.outcomes import FhirError
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.store.tables import TokenIndex

CTX = RequestContext(caller=Caller.operator(), base_url="http://testserver/fhir")


@pytest.fixture
def service(settings: Settings) -> Iterator[FhirService]:
    svc = build_service(settings)
    yield svc
    svc.storage.engine.dispose()


def run_threads(count: int, work: Callable[[int], None]) -> None:
    barrier = threading.Barrier(count, timeout=30)

    def body(i: int) -> None:
        barrier.wait()
        work(i)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_concurrent_updates_are_serialised_without_loss(service: FhirService) -> None:
    service.update(CTX, "Patient", "shared", {"resourceType": "Patient", "id": "shared"})
    errors: list[BaseException] = []

    def work(i: int) -> None:
        for j in range(5):
            try:
                service.update(
                    CTX,
                    "Patient",
                    "shared",
                    {
                        "resourceType": "Patient",
                        "id": "shared",
                        "gender": "male" if (i + j) % 2 else "female",
                    },
                )
            except BaseException as exc:  # any failure is a finding
                errors.append(exc)

    run_threads(6, work)
    assert errors == []
    with service.storage.read() as view:
        assert view.current("Patient", "shared").version == 31  # type: ignore[union-attr]
        assert view.history_count(res_type="Patient", res_id="shared") == 31
        table = TokenIndex.__table__  # type: ignore[attr-defined]
        genders = view.conn.execute(
            sa.select(sa.func.count()).select_from(table).where(table.c.param == "gender")
        ).scalar_one()
    assert genders == 1  # exactly the current version's index rows


def test_concurrent_if_match_lets_exactly_one_writer_win(service: FhirService) -> None:
    service.update(CTX, "Patient", "race", {"resourceType": "Patient", "id": "race"})
    statuses: list[int] = []
    lock = threading.Lock()

    def work(_i: int) -> None:
        try:
            result = service.update(
                CTX,
                "Patient",
                "race",
                {"resourceType": "Patient", "id": "race", "gender": "other"},
                if_match='W/"1"',
            )
            status = result.status
        except FhirError as error:
            status = error.status
        with lock:
            statuses.append(status)

    run_threads(5, work)
    assert sorted(statuses) == [200, 412, 412, 412, 412]


def test_concurrent_conditional_creates_make_one_resource(service: FhirService) -> None:
    ident = "identifier=http://hospital.example/mrn|C-1"
    statuses: list[int] = []
    lock = threading.Lock()

    def work(_i: int) -> None:
        body = {
            "resourceType": "Patient",
            "identifier": [{"system": "http://hospital.example/mrn", "value": "C-1"}],
        }
        try:
            status = service.create(CTX, "Patient", body, if_none_exist=ident).status
        except FhirError as error:
            status = error.status
        with lock:
            statuses.append(status)

    run_threads(4, work)
    assert sorted(statuses) == [200, 200, 200, 201]
    with service.storage.read() as view:
        assert view.history_count(res_type="Patient") == 1
