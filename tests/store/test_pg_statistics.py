"""PostgreSQL plans that do not depend on fresh statistics, and the server's statistics upkeep (issue 14,
lever 5). The plan tests run on PostgreSQL only (skipped without FHIR_NORSE_TEST_POSTGRES_URL)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from fhir_norse.server.search.extract import default_extractor
from fhir_norse.server.search.typed import Where, to_request
from fhir_norse.store.db import create_engine
from fhir_norse.store.maintenance import LOCK_KEY, StatisticsKeeper, analyze_stale, stale_tables
from fhir_norse.store.search import engine as search_engine
from fhir_norse.store.search.params import default_registry
from fhir_norse.store.storage import Storage


@pytest.fixture
def pg_engine(database_url: str) -> Iterator[sa.Engine]:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def _observation(patient: str, i: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": str(uuid.uuid4()),
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": f"{8000 + i % 30}-1"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T10:00:00Z",
        "valueQuantity": {
            "value": i % 100,
            "unit": "kg",
            "system": "http://unitsofmeasure.org",
            "code": "kg",
        },
    }


def _store(engine: sa.Engine, patients: list[str], per_patient: int) -> None:
    storage = Storage(engine)
    extractor = default_extractor()
    with storage.write() as uow:
        for i in range(per_patient):
            for patient in patients:
                body = _observation(patient, i)
                uow.save(
                    res_type="Observation",
                    res_id=body["id"],
                    body=body,
                    version=1,
                    last_updated=datetime.now(UTC).replace(tzinfo=None),
                    method="create",
                    previous=None,
                    index_rows=extractor.extract(body),
                )


def _analyze(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def _lookup_plan(engine: sa.Engine, patient: str) -> tuple[list[dict[str, Any]], int]:
    """The plan of the per-patient lookup the scoring runs (``find_versions`` of the patient's
    Observations: the SQL the server sends, EXPLAINed with its parameters), and the rows it returns."""
    request = to_request(
        Where("Observation", references={"subject": f"Patient/{patient}"}), default_registry()
    )
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_rest: Any) -> None:
        seen.append((statement, params))

    with engine.connect() as conn:
        sa.event.listen(engine, "before_cursor_execute", capture)
        try:
            found = search_engine.find_versions(conn, request, 100_000)
        finally:
            sa.event.remove(engine, "before_cursor_execute", capture)
        statement, params = seen[-1]
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cur = raw.cursor()
        try:
            cur.execute("EXPLAIN (FORMAT JSON) " + statement, params)
            row = cur.fetchone()
            assert row is not None
            document = row[0]
        finally:
            cur.close()
        conn.rollback()
    return list(_plan_nodes(document[0]["Plan"])), len(found)


def test_patient_lookup_uses_indexes_when_statistics_claim_the_tables_are_tiny(pg_engine: sa.Engine) -> None:
    patients = [f"p{k}" for k in range(40)]
    _store(pg_engine, patients[:1], 2)
    _analyze(pg_engine)  # the statistics now describe two Observations of one patient
    _store(pg_engine, patients, 60)  # 2,400 Observations of 40 patients, not analyzed
    nodes, found = _lookup_plan(pg_engine, "p7")
    assert found == 60
    scanned = {n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"}
    assert not scanned & {"resource", "idx_reference"}, nodes
    assert any(n["Node Type"].startswith(("Index", "Bitmap")) for n in nodes)


def test_patient_lookup_uses_indexes_when_statistics_claim_one_patient(pg_engine: sa.Engine) -> None:
    # Analyzed while a single patient had every row: target_id has one value, so an equality on it
    # looks as if it matched the whole table.
    _store(pg_engine, ["only"], 300)
    _analyze(pg_engine)
    _store(pg_engine, [f"q{k}" for k in range(30)], 60)
    nodes, found = _lookup_plan(pg_engine, "q3")
    assert found == 60
    scanned = {n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"}
    assert not scanned & {"resource", "idx_reference"}, nodes


def _wait_stale(engine: sa.Engine, table: str, expected: bool) -> bool:
    """Whether ``table`` is (not) listed stale within a few seconds (statistics reach the shared
    counters up to a second after a transaction ends)."""
    deadline = time.monotonic() + 10
    while True:
        with engine.connect() as conn:
            listed = table in stale_tables(conn, base=100)
        if listed == expected or time.monotonic() > deadline:
            return listed == expected
        time.sleep(0.3)


def test_analyze_stale_refreshes_changed_tables_only(pg_engine: sa.Engine) -> None:
    _analyze(pg_engine)
    _store(pg_engine, [f"s{k}" for k in range(10)], 30)
    assert _wait_stale(pg_engine, "idx_reference", True)
    analyzed = analyze_stale(pg_engine, base=100)
    assert analyzed is not None
    assert {"resource", "idx_reference"} <= set(analyzed)
    assert "alembic_version" not in analyzed
    with pg_engine.connect() as conn:
        assert "idx_reference" not in stale_tables(conn, base=100)
        estimate = conn.exec_driver_sql(
            "SELECT reltuples FROM pg_class WHERE oid = 'resource'::regclass"
        ).scalar()
    assert estimate == 300


def test_analyze_stale_skips_while_another_process_checks(pg_engine: sa.Engine) -> None:
    _store(pg_engine, ["t"], 200)
    with pg_engine.connect() as other:
        other.exec_driver_sql(f"SELECT pg_advisory_lock({LOCK_KEY})")
        try:
            assert analyze_stale(pg_engine, base=0) is None
        finally:
            other.exec_driver_sql(f"SELECT pg_advisory_unlock({LOCK_KEY})")
            other.commit()


def test_keeper_analyzes_in_the_background_and_stops(pg_engine: sa.Engine) -> None:
    _analyze(pg_engine)
    _store(pg_engine, [f"k{k}" for k in range(10)], 30)
    assert _wait_stale(pg_engine, "resource", True)
    keeper = StatisticsKeeper(pg_engine, interval=0.2, base=100)
    keeper.start()
    try:
        deadline = time.monotonic() + 15
        while True:
            with pg_engine.connect() as conn:
                done = conn.exec_driver_sql(
                    "SELECT n_mod_since_analyze FROM pg_stat_user_tables "
                    "WHERE schemaname = current_schema() AND relname = 'resource'"
                ).scalar_one()
            if done == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert done == 0
    finally:
        keeper.stop()
    assert keeper._thread is not None and not keeper._thread.is_alive()


def test_nothing_to_do_on_sqlite(tmp_path: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        assert analyze_stale(engine) is None
        keeper = StatisticsKeeper(engine, interval=0.01).start()
        assert keeper._thread is None
    finally:
        engine.dispose()


def _index_names(nodes: list[dict[str, Any]]) -> set[str]:
    return {str(n["Index Name"]) for n in nodes if "Index Name" in n}


def _stale_type_lookup(pg_engine: sa.Engine) -> list[dict[str, Any]]:
    # Analyzed before any Observation existed: (res_type, param) = ('Observation', 'subject') looks
    # like one row, so the narrow (res_type, param, url) index seems as good as the target index;
    # on 2,300 responses that plan read every Flag row of the server per lookup (243 ms seen).
    _store(pg_engine, [], 0)
    _analyze(pg_engine)
    _store(pg_engine, [f"u{k}" for k in range(40)], 60)
    nodes, found = _lookup_plan(pg_engine, "u5")
    assert found == 60
    return nodes


def test_analyze_stale_restores_the_target_index_plan(pg_engine: sa.Engine) -> None:
    _stale_type_lookup(pg_engine)
    assert _wait_stale(pg_engine, "idx_reference", True)
    assert analyze_stale(pg_engine) is not None
    nodes, _found = _lookup_plan(pg_engine, "u5")
    assert "ix_reference_hash_url" not in _index_names(nodes)
    assert _index_names(nodes) & {"ix_reference_hash_target", "ix_reference_reverse"}
