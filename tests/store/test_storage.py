"""The storage contract, run on SQLite and PostgreSQL alike.

The repository keeps versions and history, writes index rows with the resource in one
transaction, rolls back everything on failure, and refuses a concurrent second writer of
the same version.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime

import orjson
import pytest
import sqlalchemy as sa

from fhir_norse.outcomes import Conflict
from fhir_norse.store.db import create_engine
from fhir_norse.store.rows import DateRow, ReferenceRow, TokenRow
from fhir_norse.store.storage import Storage
from fhir_norse.store.tables import DateIndex, ReferenceIndex, TokenIndex

T0 = datetime(2024, 1, 1, 12, 0, 0)


@pytest.fixture
def repo(database_url: str) -> Iterator[Storage]:
    engine = create_engine(database_url)
    yield Storage(engine)
    engine.dispose()


def _count(repo: Storage, table: sa.Table) -> int:
    with repo.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def _save(repo: Storage, res_id: str, version: int, body: dict[str, object] | None, **kw: object) -> None:
    with repo.write() as uow:
        previous = uow.lock("Patient", res_id)
        uow.save(
            res_type="Patient",
            res_id=res_id,
            body=body,
            version=version,
            last_updated=T0,
            method="create" if previous is None else "update",
            previous=previous,
            **kw,  # type: ignore[arg-type]
        )


def test_versions_history_and_current(repo: Storage) -> None:
    _save(repo, "a", 1, {"resourceType": "Patient", "id": "a", "gender": "male"})
    _save(repo, "a", 2, {"resourceType": "Patient", "id": "a", "gender": "female"})
    with repo.read() as view:
        current = view.current("Patient", "a")
        assert current is not None and current.version == 2
        assert orjson.loads(current.body_text or "")["gender"] == "female"
        first = view.version("Patient", "a", 1)
        assert first is not None and orjson.loads(first.body_text or "")["gender"] == "male"
        assert [h.version for h in view.history(res_type="Patient", res_id="a")] == [2, 1]
        assert view.history_count(res_type="Patient") == 2


def test_index_rows_are_replaced_on_update_and_removed_on_delete(repo: Storage) -> None:
    table = TokenIndex.__table__  # type: ignore[attr-defined]
    _save(
        repo,
        "a",
        1,
        {"resourceType": "Patient"},
        index_rows=[TokenRow("gender", None, "male"), TokenRow("_tag", "s", "c")],
    )
    assert _count(repo, table) == 2
    _save(repo, "a", 2, {"resourceType": "Patient"}, index_rows=[TokenRow("gender", None, "female")])
    with repo.engine.connect() as conn:
        assert conn.execute(sa.select(table.c.code)).scalars().all() == ["female"]
    _save(repo, "a", 3, None)
    assert _count(repo, table) == 0
    with repo.read() as view:
        deleted = view.current("Patient", "a")
        assert deleted is not None and deleted.deleted and deleted.body_text is None


def test_failed_unit_of_work_leaves_nothing(repo: Storage) -> None:
    with pytest.raises(RuntimeError), repo.write() as uow:
        uow.save(
            res_type="Patient",
            res_id="x",
            body={"resourceType": "Patient"},
            version=1,
            last_updated=T0,
            method="create",
            previous=None,
            index_rows=[ReferenceRow("organization", "Organization", "o1"), DateRow("birthdate", T0, T0)],
        )
        raise RuntimeError("crash in the middle of the request")
    with repo.read() as view:
        assert view.current("Patient", "x") is None
        assert view.history_count() == 0
    assert _count(repo, ReferenceIndex.__table__) == 0  # type: ignore[attr-defined]
    assert _count(repo, DateIndex.__table__) == 0  # type: ignore[attr-defined]


def test_concurrent_creators_of_one_id_conflict(repo: Storage) -> None:
    """Two writers that both saw "no such resource" cannot both create version 1."""
    barrier = threading.Barrier(2, timeout=10)
    outcomes: list[str] = []

    def writer() -> None:
        try:
            with repo.write() as uow:
                previous = uow.current("Patient", "same")
                if repo.sqlite:
                    # SQLite serialises writers at BEGIN IMMEDIATE: the second one waits there and then
                    # sees the first one's row; emulate the stale read it would otherwise have made.
                    previous = None
                if not repo.sqlite:
                    barrier.wait()
                uow.save(
                    res_type="Patient",
                    res_id="same",
                    body={"resourceType": "Patient"},
                    version=1,
                    last_updated=T0,
                    method="create",
                    previous=previous,
                )
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict", "ok"]
    with repo.read() as view:
        assert view.history_count(res_type="Patient", res_id="same") == 1


def test_stale_update_is_a_conflict(repo: Storage) -> None:
    _save(repo, "s", 1, {"resourceType": "Patient"})
    with repo.read() as view:
        stale = view.current("Patient", "s")
    _save(repo, "s", 2, {"resourceType": "Patient"})
    with pytest.raises(Conflict), repo.write() as uow:
        uow.save(
            res_type="Patient",
            res_id="s",
            body={"resourceType": "Patient"},
            version=2,
            last_updated=T0,
            method="update",
            previous=stale,
        )
    with repo.read() as view:
        assert view.history_count(res_type="Patient", res_id="s") == 2
