"""Bodies stored once (issue 14, lever 4): the current version's body lives in ``resource`` only; its
history row gets the body when a later write supersedes it. Every version still reads back whole."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from fhir_norse.outcomes import Conflict
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from fhir_norse.store.rows import TokenRow
from fhir_norse.store.storage import H, NewResource, R, Storage, StoredResource, UnitOfWork
from fhir_norse.store.tables import TokenIndex

T0 = datetime(2024, 1, 1, 12, 0, 0)
TOKEN = TokenIndex.__table__  # type: ignore[attr-defined]


@pytest.fixture
def repo(database_url: str) -> Iterator[Storage]:
    engine = create_engine(database_url)
    yield Storage(engine)
    engine.dispose()


def _patient(res_id: str, version: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": res_id, "name": [{"family": f"Version{version}" * 20}]}


def _save(
    uow: UnitOfWork, res_id: str, version: int, body: dict[str, Any] | None, previous: StoredResource | None
) -> StoredResource:
    return uow.save(
        res_type="Patient",
        res_id=res_id,
        body=body,
        version=version,
        last_updated=T0 + timedelta(minutes=version),
        method="create" if previous is None else "delete" if body is None else "update",
        previous=previous,
        index_rows=[TokenRow("gender", None, f"v{version}")] if body is not None else [],
    )


def _write(repo: Storage, res_id: str, version: int, body: dict[str, Any] | None) -> None:
    with repo.write() as uow:
        _save(uow, res_id, version, body, uow.lock("Patient", res_id))


def _bodies(repo: Storage) -> dict[str, dict[int, Any]]:
    """The stored bodies, per table, by version (None where the row has no body)."""
    out: dict[str, dict[int, Any]] = {"resource": {}, "history": {}}
    with repo.engine.connect() as conn:
        for name, table in (("resource", R), ("history", H)):
            rows = conn.execute(sa.select(table.c.version, sa.cast(table.c.body, sa.Text)))
            for version, text in rows:
                out[name][version] = None if text is None else orjson.loads(text)
    return out


def _snapshot(repo: Storage) -> list[list[tuple[Any, ...]]]:
    with repo.engine.connect() as conn:
        return [
            sorted(tuple(map(str, row)) for row in conn.execute(sa.select(table))) for table in (R, H, TOKEN)
        ]


def _read_all(repo: Storage, res_id: str) -> dict[int, Any]:
    """Every version as the server reads it: vread, and the instance history (all agree)."""
    with repo.read() as view:
        entries = view.history(res_type="Patient", res_id=res_id, count=100)
        by_history = {e.version: None if e.body_text is None else orjson.loads(e.body_text) for e in entries}
        for version, body in by_history.items():
            stored = view.version("Patient", res_id, version)
            assert stored is not None
            assert (None if stored.body_text is None else orjson.loads(stored.body_text)) == body
    return by_history


def test_one_write_stores_the_body_once(repo: Storage) -> None:
    _write(repo, "p", 1, _patient("p", 1))
    assert _bodies(repo) == {"resource": {1: _patient("p", 1)}, "history": {1: None}}

    _write(repo, "p", 2, _patient("p", 2))
    _write(repo, "p", 3, _patient("p", 3))
    assert _bodies(repo) == {
        "resource": {3: _patient("p", 3)},
        "history": {1: _patient("p", 1), 2: _patient("p", 2), 3: None},
    }
    # Bytes: every version's body once, not the current one twice.
    with repo.engine.connect() as conn:
        stored = sum(
            int(conn.execute(sa.select(sa.func.sum(sa.func.length(sa.cast(t.c.body, sa.Text))))).scalar_one())
            for t in (R, H)
        )
    with repo.read() as view:
        assert stored == sum(len(e.body_text or "") for e in view.history(res_type="Patient", res_id="p"))

    _write(repo, "p", 4, None)
    assert _bodies(repo) == {
        "resource": {4: None},
        "history": {1: _patient("p", 1), 2: _patient("p", 2), 3: _patient("p", 3), 4: None},
    }
    assert _read_all(repo, "p") == {1: _patient("p", 1), 2: _patient("p", 2), 3: _patient("p", 3), 4: None}
    with repo.read() as view:
        methods = [(e.version, e.method, e.deleted) for e in view.history(res_type="Patient", res_id="p")]
        assert methods == [
            (4, "delete", True),
            (3, "update", False),
            (2, "update", False),
            (1, "create", False),
        ]
        deleted = view.version("Patient", "p", 4)
        assert deleted is not None and deleted.deleted and deleted.body_text is None

    # Re-created after the deletion: version 5 is current, 4 stays a deletion.
    _write(repo, "p", 5, _patient("p", 5))
    assert _bodies(repo)["history"] == {
        1: _patient("p", 1),
        2: _patient("p", 2),
        3: _patient("p", 3),
        4: None,
        5: None,
    }
    assert _read_all(repo, "p")[5] == _patient("p", 5)


def test_save_new_stores_each_body_once(repo: Storage) -> None:
    with repo.write() as uow:
        uow.save_new([NewResource("Patient", f"n{i}", _patient(f"n{i}", 1), T0) for i in range(3)])
    with repo.engine.connect() as conn:
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(R).where(R.c.body.is_not(None))).scalar() == 3
        )
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(H).where(H.c.body.is_not(None))).scalar() == 0
        )
    for i in range(3):
        assert _read_all(repo, f"n{i}") == {1: _patient(f"n{i}", 1)}


def test_history_pages_join_current_and_superseded_bodies(repo: Storage) -> None:
    for version in range(1, 6):
        _write(repo, "h", version, _patient("h", version))
    _write(repo, "other", 1, _patient("other", 1))
    with repo.read() as view:
        first = view.history(res_type="Patient", count=3)
        assert [(e.res_id, e.version) for e in first] == [("other", 1), ("h", 5), ("h", 4)]
        older = view.history(res_type="Patient", before_pk=first[-1].pk, count=3)
        assert [(e.res_id, e.version) for e in older] == [("h", 3), ("h", 2), ("h", 1)]
        newer = view.history(res_type="Patient", after_pk=older[0].pk, count=2)
        assert [(e.res_id, e.version) for e in newer] == [("h", 4), ("h", 5)]
        for entry in [*first, *older]:
            assert orjson.loads(entry.body_text or "") == _patient(entry.res_id, entry.version)
        assert view.history_count(res_type="Patient") == 6


def test_failed_update_leaves_both_tables_as_before(repo: Storage) -> None:
    _write(repo, "f", 1, _patient("f", 1))
    _write(repo, "f", 2, _patient("f", 2))
    before = _snapshot(repo)
    # A failure after the resource row, its history rows and its index rows were all written.
    with pytest.raises(RuntimeError), repo.write() as uow:
        _save(uow, "f", 3, _patient("f", 3), uow.lock("Patient", "f"))
        raise RuntimeError("crash in the middle of the request")
    assert _snapshot(repo) == before
    # A deletion that fails likewise.
    with pytest.raises(RuntimeError), repo.write() as uow:
        _save(uow, "f", 3, None, uow.lock("Patient", "f"))
        raise RuntimeError("crash in the middle of the request")
    assert _snapshot(repo) == before
    assert _read_all(repo, "f") == {1: _patient("f", 1), 2: _patient("f", 2)}


def test_stale_update_keeps_the_older_versions_bodies(repo: Storage) -> None:
    """A writer holding a stale current row (version 1 after version 2 was written) gets a 409, and
    version 1's stored body is not touched on the way (not even inside the failed transaction)."""
    _write(repo, "s", 1, _patient("s", 1))
    with repo.read() as view:
        stale = view.current("Patient", "s")
    _write(repo, "s", 2, _patient("s", 2))
    with repo.write() as uow:
        with pytest.raises(Conflict):
            _save(uow, "s", 2, _patient("s", 99), stale)
        # Inside the same transaction, before any rollback: version 1 still whole.
        first = uow.version("Patient", "s", 1)
        assert first is not None and orjson.loads(first.body_text or "") == _patient("s", 1)
    assert _read_all(repo, "s") == {1: _patient("s", 1), 2: _patient("s", 2)}


def _old_layout_write(conn: sa.Connection, res_id: str, versions: list[dict[str, Any] | None]) -> None:
    """What the server wrote before revision 0006: every version's body in history, the current one
    in both tables."""
    for n, body in enumerate(versions, start=1):
        conn.execute(
            sa.insert(H).values(
                res_type="Patient",
                res_id=res_id,
                version=n,
                last_updated=T0 + timedelta(minutes=n),
                method="create" if n == 1 else "delete" if body is None else "update",
                deleted=body is None,
                body=body,
            )
        )
    last = versions[-1]
    conn.execute(
        sa.insert(R).values(
            res_type="Patient",
            res_id=res_id,
            version=len(versions),
            last_updated=T0 + timedelta(minutes=len(versions)),
            deleted=last is None,
            body=last,
        )
    )


def test_migration_0006_converts_a_0005_database(database_url: str) -> None:
    engine = create_engine(database_url)
    histories: dict[str, list[dict[str, Any] | None]] = {
        "one": [_patient("one", 1)],
        "three": [_patient("three", v) for v in (1, 2, 3)],
        "gone": [_patient("gone", 1), _patient("gone", 2), None],
        "back": [_patient("back", 1), None, _patient("back", 3)],
    }
    try:
        migrate.downgrade(engine, "0005")
        with engine.begin() as conn:
            for res_id, versions in histories.items():
                _old_layout_write(conn, res_id, versions)
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.heads()[0]
        repo = Storage(engine)
        for res_id, versions in histories.items():
            assert _read_all(repo, res_id) == dict(enumerate(versions, start=1)), res_id
        with engine.connect() as conn:
            # No history row duplicates a current body any more; superseded ones are all kept.
            current_in_history = conn.execute(
                sa.select(sa.func.count())
                .select_from(H.join(R, sa.and_(R.c.res_id == H.c.res_id, R.c.version == H.c.version)))
                .where(H.c.body.is_not(None))
            ).scalar_one()
            assert current_in_history == 0
            kept = conn.execute(
                sa.select(sa.func.count()).select_from(H).where(H.c.body.is_not(None))
            ).scalar()
            assert kept == 5  # three v1, v2; gone v1, v2; back v1
        # And back: the downgrade puts the current bodies into history again.
        migrate.downgrade(engine, "0005")
        with engine.connect() as conn:
            rows = conn.execute(sa.select(H.c.res_id, H.c.version, sa.cast(H.c.body, sa.Text))).all()
        assert {(i, v): None if t is None else orjson.loads(t) for i, v, t in rows} == {
            (i, n): body for i, versions in histories.items() for n, body in enumerate(versions, start=1)
        }
    finally:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.delete(H))
            conn.execute(sa.delete(R))
        engine.dispose()
