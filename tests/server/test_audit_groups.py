"""The AuditEvents of reads answered at the same moment are written together
(:class:`fhir_norse.server.audit_log.EventGroups`): one shared write per group, every event committed
before its read returns, and a failed write fails every read whose events were in it (issue 14)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from fhir_norse.auth.audit import build_audit_event
from fhir_norse.auth.caller import Caller
from fhir_norse.server.audit_log import EventGroups
from fhir_norse.store.db import create_engine
from fhir_norse.store.storage import Storage, UnitOfWork


def _event(res_id: str) -> dict[str, Any]:
    return build_audit_event(
        interaction="read",
        outcome="success",
        caller=Caller(client_id="c"),
        resource_type="Observation",
        resource_id=res_id,
        patients=["p1"],
        recorded=datetime(2026, 1, 2, tzinfo=UTC),
    )


class _Gated:
    """A storage whose shared writes wait for ``gate`` and are counted."""

    def __init__(self, storage: Storage, fail: bool = False) -> None:
        self.storage = storage
        self.gate = threading.Event()
        self.calls = 0
        self.fail = fail

    def write_together(self, work: Callable[[UnitOfWork], None]) -> None:
        self.calls += 1
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("disk full")
        self.storage.write_together(work)


def _run_three(groups: EventGroups, gated: _Gated) -> dict[str, BaseException | None]:
    results: dict[str, BaseException | None] = {}

    def read(name: str) -> None:
        try:
            groups.write(gated, [_event(name)])  # type: ignore[arg-type]
            results[name] = None
        except BaseException as exc:
            results[name] = exc

    first = threading.Thread(target=read, args=("a",))
    first.start()
    while gated.calls < 1:  # "a" is writing (held at the gate)
        time.sleep(0.005)
    others = [threading.Thread(target=read, args=(n,)) for n in ("b", "c")]
    for t in others:
        t.start()
    while len(groups.handed) < 2:  # "b" and "c" wait for "a"'s write to end
        time.sleep(0.005)
    gated.gate.set()
    for t in (first, *others):
        t.join(10)
    return results


def test_events_handed_in_during_a_write_go_in_the_next_one_together(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        gated = _Gated(Storage(engine))
        results = _run_three(EventGroups(), gated)
        assert results == {"a": None, "b": None, "c": None}
        assert gated.calls == 2  # "a" alone, then "b" and "c" in one write
        with engine.connect() as conn:
            ids = conn.execute(sa.text("SELECT entity_id FROM audit_log")).scalars().all()
            patients = conn.execute(sa.text("SELECT count(*) FROM audit_patient")).scalar_one()
        assert sorted(ids) == ["a", "b", "c"]
        assert patients == 3
    finally:
        engine.dispose()


def test_a_failed_write_fails_every_read_in_it(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        gated = _Gated(Storage(engine), fail=True)
        results = _run_three(EventGroups(), gated)
        assert all(isinstance(error, RuntimeError) for error in results.values()), results
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM audit_log")).scalar_one() == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("count", [1, 5])
def test_reads_in_the_server_record_their_events(system_client: Any, database_url: str, count: int) -> None:
    created = system_client.post(
        "/fhir/Patient", json={"resourceType": "Patient"}, headers={"Content-Type": "application/fhir+json"}
    )
    pid = created.json()["id"]
    threads = [
        threading.Thread(target=system_client.get, args=(f"/fhir/Patient/{pid}",)) for _ in range(count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            reads = conn.execute(
                sa.text("SELECT count(*) FROM audit_log WHERE interaction = 'read' AND entity_id = :i"),
                {"i": pid},
            ).scalar_one()
        assert reads == count
    finally:
        engine.dispose()
