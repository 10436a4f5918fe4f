"""Concurrent writers: nothing lost, nothing half-written, no 500s.

Runs the interactions from several threads at once, released together by a barrier, against the same
database (SQLite and PostgreSQL), as several server threads would. Issue 12: a transaction's
``ifNoneExist`` locks its criteria (item 10), equal criteria written differently share the lock (item
11), and on SQLite a slow read holds up no write while its AuditEvent is still written (item 19).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.auth.caller import Caller
from fhir_norse.compose import build_service
from fhir_norse.config import Settings
from fhir_norse.outcomes import FhirError
from fhir_norse.server.bundles import BundleProcessor
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import INTERACTIONS, FhirService, InteractionRequest
from fhir_norse.server.search.parse import parse_search
from fhir_norse.store.audit_tables import AUDIT_LOG
from fhir_norse.store.search import engine
from fhir_norse.store.search.request import SearchRequest
from fhir_norse.store.tables import TokenIndex
from tests.intake_support import NF21_STATIC, nf21_answers, publish_questionnaires, response

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


# --- issue 12 --------------------------------------------------------------------------------------

MRN = "http://hospital.example/mrn"
THREADS = 12
FHIR = {"Content-Type": "application/fhir+json"}
SEARCH = next(i for i in INTERACTIONS if i.method == "GET" and i.path == "/{res_type}")


def criteria(query: str) -> SearchRequest:
    return parse_search("Patient", parse_qsl(query), strict=True)


def run_search(service: FhirService, res_type: str, params: list[tuple[str, str]]) -> Result:
    return service.perform(CTX, SEARCH, InteractionRequest(res_type, params=params))


def statuses(count: int, call: Callable[[int], Result]) -> list[int]:
    """The status of ``call(i)`` for ``count`` threads started together (a FhirError's own status)."""
    out: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            status = call(i).status
        except FhirError as error:
            status = error.status
        with lock:
            out.append(status)

    run_threads(count, work)
    return sorted(out)


def patients_with(service: FhirService, mrn_value: str) -> list[str]:
    """The Patients indexed with the hospital number ``mrn_value``."""
    with service.storage.read() as view:
        table = TokenIndex.__table__  # type: ignore[attr-defined]
        rows = view.conn.execute(
            sa.select(table.c.resource_pk).where(
                table.c.res_type == "Patient", table.c.param == "identifier", table.c.code == mrn_value
            )
        )
        return [str(pk) for (pk,) in rows]


def test_concurrent_transactions_with_if_none_exist_make_one_resource(service: FhirService) -> None:
    """Item 10: the ifNoneExist of a transaction entry locks its criteria, as a conditional create does
    (PostgreSQL made 9-12 Patients of 12 identical transactions); every Observation of the twelve
    transactions refers to the one Patient."""
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:2f5c8a52-6a43-4d8c-9f55-0c7e1e0d6a10",
                "resource": {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "T-10"}]},
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MRN}|T-10"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "weight"},
                    "subject": {"reference": "urn:uuid:2f5c8a52-6a43-4d8c-9f55-0c7e1e0d6a10"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    answers: list[dict[str, Any]] = []

    def transaction(_i: int) -> Result:
        result = BundleProcessor(service).process(CTX, bundle)
        answers.append(orjson.loads(result.raw or "{}"))
        return result

    assert statuses(THREADS, transaction) == [200] * THREADS
    created = sorted(a["entry"][0]["response"]["status"] for a in answers)
    assert created == ["200 OK"] * (THREADS - 1) + ["201 Created"]
    assert len(patients_with(service, "T-10")) == 1
    (patient,) = {a["entry"][0]["response"]["location"].split("/_history")[0] for a in answers}
    with service.storage.read() as view:
        assert view.history_count(res_type="Patient") == 1
        assert view.history_count(res_type="Observation") == THREADS
    page = run_search(service, "Observation", [("subject", patient), ("_count", "50")])
    assert len(orjson.loads(page.raw or "{}")["entry"]) == THREADS


# Four spellings of one criterion: percent-encoding and the order of the parameters differ.
EQUIVALENT = (
    f"identifier={MRN}|E-11&gender=female",
    "gender=female&identifier=http%3A%2F%2Fhospital.example%2Fmrn%7CE-11",
    "identifier=http%3A//hospital.example/mrn%7CE-11&gender=female",
    f"gender=female&identifier={MRN}%7CE-11",
)


def test_equivalent_criteria_share_one_key() -> None:
    """Item 11: the lock key is the parsed criteria, not the text; other criteria get other keys."""
    keys = {criteria(query).criteria_key for query in EQUIVALENT}
    assert len(keys) == 1
    assert criteria("identifier=a|1,b|2").criteria_key == criteria("identifier=b|2,a|1").criteria_key
    others = (
        f"identifier={MRN}|E-12&gender=female",
        f"identifier={MRN}|E-11",
        f"identifier={MRN}|E-11&gender=male",
    )
    assert len({criteria(query).criteria_key for query in others} | keys) == 4


def test_conditional_creates_with_equivalent_criteria_make_one_resource(service: FhirService) -> None:
    """Item 11: conditional creates whose criteria are written differently (PostgreSQL made 5-6 of 12),
    over REST and in transactions alike, create one Patient."""
    body = {
        "resourceType": "Patient",
        "gender": "female",
        "identifier": [{"system": MRN, "value": "E-11"}],
    }

    def create(i: int) -> Result:
        query = EQUIVALENT[i % len(EQUIVALENT)]
        if i % 2:
            return service.create(CTX, "Patient", body, if_none_exist=query)
        entry = {"resource": body, "request": {"method": "POST", "url": "Patient", "ifNoneExist": query}}
        return BundleProcessor(service).process(
            CTX, {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
        )

    answers = statuses(THREADS, create)
    assert answers.count(201) <= 1 and set(answers) <= {200, 201}
    assert len(patients_with(service, "E-11")) == 1
    with service.storage.read() as view:
        assert view.history_count(res_type="Patient") == 1


def test_concurrent_patches_with_if_match_let_exactly_one_win(
    app: FastAPI, system_client: TestClient
) -> None:
    """Twelve PATCHes of version 1 at once, over HTTP: one applies, eleven answer 412."""
    created = system_client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR)
    assert created.status_code == 201
    patient = created.json()["id"]
    headers = {"Content-Type": "application/json-patch+json", "If-Match": 'W/"1"'}

    def patch(i: int) -> Result:
        document = [{"op": "add", "path": "/gender", "value": "male" if i % 2 else "female"}]
        answer = system_client.patch(
            f"/fhir/Patient/{patient}", content=orjson.dumps(document), headers=headers
        )
        return Result(answer.status_code)

    assert statuses(THREADS, patch) == [200] + [412] * (THREADS - 1)
    assert system_client.get(f"/fhir/Patient/{patient}").json()["meta"]["versionId"] == "2"


def test_a_response_submitted_concurrently_is_stored_and_scored_once(service: FhirService) -> None:
    """The same QuestionnaireResponse (one identifier) POSTed by twelve clients at once: one is stored
    and scored, the others answer 200 with it."""
    publish_questionnaires(service)
    patient = service.create(CTX, "Patient", {"resourceType": "Patient"}).headers["Location"].split("/")[-3]
    body = response(
        NF21_STATIC, nf21_answers({"suicide": 7}), patient=patient, identifier="urn:uuid:resubmit"
    )
    ids: set[str] = set()

    def submit(_i: int) -> Result:
        result = service.create(CTX, "QuestionnaireResponse", orjson.loads(orjson.dumps(body)))
        ids.add(result.headers["Location"].split("/")[-3])
        return result

    assert statuses(THREADS, submit) == [200] * (THREADS - 1) + [201]
    assert len(ids) == 1
    with service.storage.read() as view:
        assert view.history_count(res_type="QuestionnaireResponse") == 1
        assert view.history_count(res_type="DiagnosticReport") == 1


def _audit_rows(view: Any) -> int:
    """Events in the audit log (issue 14: narrow rows, not AuditEvent resources)."""
    return int(view.conn.execute(sa.select(sa.func.count()).select_from(AUDIT_LOG)).scalar_one())


def test_a_slow_search_holds_up_no_write_and_is_still_audited(
    service: FhirService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 19: a search runs in a read-only transaction, so on SQLite a create goes ahead while the
    search is still running (it waited for the search's write lock before, 16.8 s in the issue); the
    search's AuditEvent is written before its answer comes back."""
    inside, release = threading.Event(), threading.Event()
    original = engine.execute_search

    def slow_search(conn: sa.Connection, request: Any) -> Any:
        inside.set()
        release.wait(30)
        return original(conn, request)

    monkeypatch.setattr(engine, "execute_search", slow_search)
    with service.storage.read() as view:
        audits_before = _audit_rows(view)
    searched: list[Result] = []
    search = threading.Thread(
        target=lambda: searched.append(run_search(service, "Patient", [("gender", "male")]))
    )
    search.start()
    assert inside.wait(10)
    created: list[Result] = []
    started = time.monotonic()
    create = threading.Thread(
        target=lambda: created.append(service.create(CTX, "Patient", {"resourceType": "Patient"}))
    )
    create.start()
    create.join(10)
    waited = time.monotonic() - started
    release.set()
    search.join(30)
    assert [r.status for r in created] == [201], f"the create waited {waited:.1f} s for the search"
    assert waited < 5
    assert [r.status for r in searched] == [200]
    with service.storage.read() as view:
        # The create's event and the search's.
        assert _audit_rows(view) == audits_before + 2


def test_a_read_only_transaction_refuses_writes(service: FhirService) -> None:
    """Item 19: the reads' transaction is read-only in the database itself (SQLite query_only,
    PostgreSQL READ ONLY), and a write transaction afterwards on the same pooled connection is not."""
    with pytest.raises(sa.exc.DBAPIError), service.storage.read_only() as uow:
        uow.conn.execute(sa.text("CREATE TABLE should_not_exist (x INTEGER)"))
    assert service.create(CTX, "Patient", {"resourceType": "Patient"}).status == 201


def test_writes_handed_in_together_share_transactions_and_all_commit(service: FhirService) -> None:
    """Item 19: the AuditEvents of reads answered at the same moment are written with group commit:
    fewer transactions than reads, every one committed before its caller goes on, and a failed
    transaction fails every caller in it (none is told its event was written when it was not)."""
    transactions: list[int] = []
    lock = threading.Lock()

    def work(uow: Any) -> None:
        time.sleep(0.05)  # a write long enough for the others to queue behind it
        uow.conn.execute(sa.text("SELECT 1"))
        with lock:
            transactions.append(id(uow))

    run_threads(THREADS, lambda _i: service.storage.write_together(work))
    assert len(transactions) == THREADS
    assert len(set(transactions)) < THREADS / 2

    # A write under way; two more queue behind it and share the next transaction, which fails.
    release = threading.Event()
    outcomes: dict[str, BaseException | None] = {}

    def hand_in(name: str, work: Callable[[Any], None]) -> threading.Thread:
        def body() -> None:
            try:
                service.storage.write_together(work)
                outcomes[name] = None
            except RuntimeError as error:
                outcomes[name] = error

        thread = threading.Thread(target=body)
        thread.start()
        return thread

    def failing(uow: Any) -> None:
        raise RuntimeError("disk full")

    def held(uow: Any) -> None:
        release.wait(30)

    first = hand_in("first", held)
    deadline = time.monotonic() + 10
    while not service.storage._group.writing and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = [hand_in("failing", failing), hand_in("innocent", work)]
    while len(service.storage._group.queued) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in (first, *queued):
        thread.join(30)
    assert outcomes["first"] is None
    assert isinstance(outcomes["failing"], RuntimeError) and outcomes["innocent"] is outcomes["failing"]
