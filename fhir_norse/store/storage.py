"""Storage: versioned resources, their history and their search-index rows.

All writes go through :class:`UnitOfWork`, one database transaction: the resource row,
the history row and the index rows are written together or not at all. Reads return the
stored JSON as text, never re-parsed or re-validated.

A body is stored once (issue 14): the current version's body lives in ``resource`` only, and
its ``resource_history`` row (every version has one: the key that orders and pages history, the
method, the unique version) has no body until a later write supersedes it, when the body is
copied across inside the database (``UPDATE ... SET body = (SELECT ...)``). Reads of a version
take the body from whichever of the two rows holds it.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from fhir_norse.outcomes import BadRequest, Conflict

if TYPE_CHECKING:
    import psycopg
from fhir_norse.store.db import is_sqlite, statement_time_limit, was_cancelled
from fhir_norse.store.rows import (
    CompositeRow,
    DateRow,
    IndexRow,
    NumberRow,
    ReferenceRow,
    StringRow,
    TokenRow,
    UriRow,
    identity_hash,
    reference_target_hash,
    token_code_hash,
    token_system_code_hash,
)
from fhir_norse.store.tables import (
    DATE_MAX,
    DATE_MIN,
    CompositeIndex,
    DateIndex,
    HistoryRow,
    NumberIndex,
    ReferenceIndex,
    ResourceRow,
    StringIndex,
    TokenIndex,
    UriIndex,
)

R = ResourceRow.__table__  # type: ignore[attr-defined]
H = HistoryRow.__table__  # type: ignore[attr-defined]
_INDEX_TABLE: dict[type, sa.Table] = {
    TokenRow: TokenIndex.__table__,  # type: ignore[attr-defined]
    StringRow: StringIndex.__table__,  # type: ignore[attr-defined]
    DateRow: DateIndex.__table__,  # type: ignore[attr-defined]
    NumberRow: NumberIndex.__table__,  # type: ignore[attr-defined]
    ReferenceRow: ReferenceIndex.__table__,  # type: ignore[attr-defined]
    UriRow: UriIndex.__table__,  # type: ignore[attr-defined]
    CompositeRow: CompositeIndex.__table__,  # type: ignore[attr-defined]
}


_STRING_LIMITS: dict[type, dict[str, int]] = {
    row_type: {
        c.name: c.type.length for c in table.columns if isinstance(c.type, sa.String) and c.type.length
    }
    for row_type, table in _INDEX_TABLE.items()
}


@dataclass(frozen=True, slots=True)
class StoredResource:
    pk: int
    res_type: str
    res_id: str
    version: int
    last_updated: datetime
    deleted: bool
    # The stored JSON text; None for a deletion.
    body_text: str | None
    # For history entries: create | update | patch | delete.
    method: str | None = None


def _json_text(column: Any) -> Any:
    return sa.cast(column, sa.Text)


_RESOURCE_COLS = (
    R.c.pk,
    R.c.res_type,
    R.c.res_id,
    R.c.version,
    R.c.last_updated,
    R.c.deleted,
    _json_text(R.c.body),
)
_HISTORY_COLS = (
    H.c.pk,
    H.c.res_type,
    H.c.res_id,
    H.c.version,
    H.c.last_updated,
    H.c.deleted,
    # The current version's history row has no body: the resource row holds it (module doc).
    _json_text(sa.func.coalesce(H.c.body, R.c.body)),
    H.c.method,
)
# History rows with the resource row of the same version, if it is the current one.
_HISTORY_FROM = H.outerjoin(
    R, sa.and_(R.c.res_type == H.c.res_type, R.c.res_id == H.c.res_id, R.c.version == H.c.version)
)


def _stored(row: Sequence[Any]) -> StoredResource:
    return StoredResource(*row)


def _row_values(resource_pk: int, res_type: str, row: IndexRow) -> dict[str, Any]:
    values: dict[str, Any] = {"resource_pk": resource_pk, "res_type": res_type}
    if isinstance(row, DateRow):
        values.update(param=row.param, low=row.low or DATE_MIN, high=row.high or DATE_MAX)
    elif isinstance(row, NumberRow):
        values.update(
            param=row.param,
            value=float(row.value),
            low=float(row.low),
            high=float(row.high),
            system=row.system,
            code=row.code,
            unit=row.unit,
        )
    elif isinstance(row, CompositeRow):
        values.update(
            param=row.param,
            c1_system=row.c1_system,
            c1_code=row.c1_code,
            c2_system=row.c2_system,
            c2_code=row.c2_code,
            c2_low=None if row.c2_low is None else float(row.c2_low),
            c2_high=None if row.c2_high is None else float(row.c2_high),
            c2_date_low=row.c2_date_low,
            c2_date_high=row.c2_date_high,
            c2_string=row.c2_string,
        )
    else:
        values.update({f: getattr(row, f) for f in row.__slots__})
    # Index columns are bounded; a longer value is indexed by its prefix (the body keeps it whole).
    for key, limit in _STRING_LIMITS[type(row)].items():
        value = values.get(key)
        if isinstance(value, str) and len(value) > limit:
            values[key] = value[:limit]
    # Hash columns (fhir_norse/store/rows.py), of the stored (bounded) text.
    if isinstance(row, TokenRow):
        param, system, code = values["param"], values["system"], values["code"]
        values["hash_identity"] = identity_hash(res_type, param)
        values["hash_code"] = token_code_hash(res_type, param, code)
        values["hash_sys_code"] = token_system_code_hash(res_type, param, system, code)
    elif isinstance(row, ReferenceRow):
        values["hash_identity"] = identity_hash(res_type, values["param"])
        values["hash_target"] = reference_target_hash(res_type, values["param"], values["target_id"])
    return values


# Built once: SQLAlchemy memoises a statement's cache key on the object, so the hot write path
# skips rebuilding and re-keying seven statements per request.
_INSERT_RESOURCE = sa.insert(R).returning(R.c.pk)
_UPDATE_RESOURCE = (
    sa.update(R)
    .where(R.c.pk == sa.bindparam("row_pk"), R.c.version == sa.bindparam("expected"))
    .values(
        version=sa.bindparam("new_version"),
        last_updated=sa.bindparam("new_last_updated"),
        deleted=sa.bindparam("new_deleted"),
        body=sa.bindparam("new_body", type_=R.c.body.type),
    )
)
_INSERT_HISTORY = sa.insert(H)
# Before the resource row is overwritten: the version it holds moves its body to its history row.
_SUPERSEDE = (
    sa.update(H)
    .where(
        H.c.res_type == sa.bindparam("h_type"),
        H.c.res_id == sa.bindparam("h_id"),
        H.c.version == sa.bindparam("expected"),
        # Only the current version's row lacks a body: a stale ``expected`` (which fails the resource
        # update below, a 409) must not overwrite an older version's body.
        H.c.body.is_(None),
    )
    .values(
        body=sa.select(R.c.body)
        .where(R.c.pk == sa.bindparam("row_pk"), R.c.version == sa.bindparam("expected"))
        .scalar_subquery()
    )
)
_INSERT_RESOURCE_ROWS = sa.insert(R)
_DELETE_INDEX_ROWS = tuple(
    sa.delete(table).where(table.c.resource_pk == sa.bindparam("row_pk")) for table in _INDEX_TABLE.values()
)
_INSERT_INDEX_ROWS = {row_type: sa.insert(table) for row_type, table in _INDEX_TABLE.items()}
_INSERT_INTO = {
    R.name: _INSERT_RESOURCE_ROWS,
    H.name: _INSERT_HISTORY,
    **{table.name: _INSERT_INDEX_ROWS[row_type] for row_type, table in _INDEX_TABLE.items()},
}


@dataclass(frozen=True, slots=True)
class NewResource:
    """A resource to create (version 1) with :meth:`UnitOfWork.save_new`."""

    res_type: str
    res_id: str
    body: dict[str, Any]
    last_updated: datetime
    index_rows: Sequence[IndexRow] = ()


def _history_where(
    query: sa.Select[Any], res_type: str | None, res_id: str | None, since: datetime | None
) -> sa.Select[Any]:
    if res_type is not None:
        query = query.where(H.c.res_type == res_type)
    if res_id is not None:
        query = query.where(H.c.res_id == res_id)
    if since is not None:
        query = query.where(H.c.last_updated >= since)
    return query


# Built once: a read by id neither builds the statement nor computes its cache key again (issue 14).
_CURRENT = sa.select(*_RESOURCE_COLS).where(
    R.c.res_type == sa.bindparam("res_type"), R.c.res_id == sa.bindparam("res_id")
)


class ReadView:
    """Queries on one connection (inside whatever transaction it has)."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn

    @contextmanager
    def time_limit(self, seconds: float) -> Iterator[None]:
        """Stop the statements of the block after ``seconds`` (:func:`.db.statement_time_limit`): a
        search that runs too long answers 400 ``too-costly`` instead of holding a connection (and, in
        a SQLite write transaction, the lock) for minutes."""
        try:
            with statement_time_limit(self.conn, seconds):
                yield
        except sa.exc.DBAPIError as exc:
            if not was_cancelled(exc):
                raise
            raise BadRequest(
                f"The search ran longer than this server allows ({seconds:g} s); narrow it with more "
                "selective criteria",
                code="too-costly",
            ) from exc

    def current(self, res_type: str, res_id: str) -> StoredResource | None:
        row = self.conn.execute(_CURRENT, {"res_type": res_type, "res_id": res_id}).first()
        return _stored(row) if row else None

    def version(self, res_type: str, res_id: str, version: int) -> StoredResource | None:
        row = self.conn.execute(
            sa.select(*_HISTORY_COLS)
            .select_from(_HISTORY_FROM)
            .where(H.c.res_type == res_type, H.c.res_id == res_id, H.c.version == version)
        ).first()
        return _stored(row) if row else None

    def history(
        self,
        *,
        res_type: str | None = None,
        res_id: str | None = None,
        since: datetime | None = None,
        before_pk: int | None = None,
        after_pk: int | None = None,
        count: int = 50,
    ) -> list[StoredResource]:
        """History entries newest first, keyset paged on the history row key.

        ``before_pk`` pages towards older entries; ``after_pk`` returns the ``count`` entries just
        newer than it, oldest first (the caller reverses them for a "previous" page).
        """
        query = _history_where(sa.select(*_HISTORY_COLS).select_from(_HISTORY_FROM), res_type, res_id, since)
        if before_pk is not None:
            query = query.where(H.c.pk < before_pk)
        if after_pk is not None:
            query = query.where(H.c.pk > after_pk).order_by(H.c.pk.asc())
        else:
            query = query.order_by(H.c.pk.desc())
        query = query.limit(count)
        return [_stored(r) for r in self.conn.execute(query)]

    def history_count(
        self, *, res_type: str | None = None, res_id: str | None = None, since: datetime | None = None
    ) -> int:
        query = _history_where(sa.select(sa.func.count()).select_from(H), res_type, res_id, since)
        return int(self.conn.execute(query).scalar_one())


class UnitOfWork(ReadView):
    """One write transaction."""

    def lock(self, res_type: str, res_id: str) -> StoredResource | None:
        """The current row, locked against concurrent writers until commit (PostgreSQL row lock;
        SQLite holds the database write lock from ``BEGIN IMMEDIATE``)."""
        query = sa.select(*_RESOURCE_COLS).where(R.c.res_type == res_type, R.c.res_id == res_id)
        if not is_sqlite_conn(self.conn):
            query = query.with_for_update()
        row = self.conn.execute(query).first()
        return _stored(row) if row else None

    def advisory_lock(self, key: str) -> None:
        """Serialise writers that share ``key`` (conditional creates of the same criteria)."""
        if not is_sqlite_conn(self.conn):
            self.conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})

    def save(
        self,
        *,
        res_type: str,
        res_id: str,
        body: dict[str, Any] | None,
        version: int,
        last_updated: datetime,
        method: str,
        previous: StoredResource | None,
        index_rows: Iterable[IndexRow] = (),
    ) -> StoredResource:
        """Write version ``version`` (a deletion when ``body`` is None) and replace the index rows.

        ``previous`` is the current row as read (and locked) by the caller; a concurrent writer
        that got there first makes the unique constraints fail, reported as 409.
        """
        deleted = body is None
        values = {
            "res_type": res_type,
            "res_id": res_id,
            "version": version,
            "last_updated": last_updated,
            "deleted": deleted,
            "body": body,
        }
        try:
            if previous is None:
                pk = self.conn.execute(_INSERT_RESOURCE, values).scalar_one()
            else:
                pk = previous.pk
                if not previous.deleted:
                    self.conn.execute(
                        _SUPERSEDE,
                        {"h_type": res_type, "h_id": res_id, "expected": previous.version, "row_pk": pk},
                    )
                updated = self.conn.execute(
                    _UPDATE_RESOURCE,
                    {
                        "row_pk": pk,
                        "expected": previous.version,
                        "new_version": version,
                        "new_last_updated": last_updated,
                        "new_deleted": deleted,
                        "new_body": body,
                    },
                )
                if updated.rowcount != 1:
                    raise Conflict(f"{res_type}/{res_id} was changed by another request; retry")
                for statement in _DELETE_INDEX_ROWS:
                    self.conn.execute(statement, {"row_pk": pk})
            self.conn.execute(_INSERT_HISTORY, {**values, "body": None, "method": method})
        except IntegrityError as exc:
            raise Conflict(f"{res_type}/{res_id} was written concurrently by another request; retry") from exc
        if not deleted:
            self._insert_index_rows(pk, res_type, index_rows)
        return StoredResource(pk, res_type, res_id, version, last_updated, deleted, None, method)

    def save_new(self, resources: Sequence[NewResource]) -> list[StoredResource]:
        """Create many resources (version 1 each) with one statement per table instead of several
        per resource: what a scoring run writes. Same guarantees as :meth:`save`."""
        if not resources:
            return []
        values = [
            {
                "res_type": r.res_type,
                "res_id": r.res_id,
                "version": 1,
                "last_updated": r.last_updated,
                "deleted": False,
                "body": r.body,
            }
            for r in resources
        ]
        try:
            # One multi-row INSERT, then one SELECT for the keys: RETURNING with an executemany would
            # fall back to a statement per row on both databases (no insert sentinel column).
            self._insert_many(R, values)
            found = {
                (t, i): pk
                for pk, t, i in self.conn.execute(
                    sa.select(R.c.pk, R.c.res_type, R.c.res_id).where(
                        R.c.res_type.in_(sorted({r.res_type for r in resources})),
                        R.c.res_id.in_([r.res_id for r in resources]),
                    )
                )
            }
            pks = [found[(r.res_type, r.res_id)] for r in resources]
            self._insert_many(H, [{**v, "body": None, "method": "create"} for v in values])
        except IntegrityError as exc:
            raise Conflict("a resource was written concurrently by another request; retry") from exc
        grouped: dict[type, list[dict[str, Any]]] = {}
        for pk, r in zip(pks, resources, strict=True):
            for row in r.index_rows:
                grouped.setdefault(type(row), []).append(_row_values(pk, r.res_type, row))
        for row_type, rows in grouped.items():
            self._insert_many(_INDEX_TABLE[row_type], rows)
        return [
            StoredResource(pk, r.res_type, r.res_id, 1, r.last_updated, False, None, "create")
            for pk, r in zip(pks, resources, strict=True)
        ]

    def _insert_many(self, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` (all with the same keys). SQLite: the driver's executemany, a loop in C
        in process. PostgreSQL index rows: ``COPY``, because psycopg's executemany runs one INSERT
        per row on the server (measured: 170 ms of 270 ms per scored ingest)."""
        if not rows:
            return
        if is_sqlite_conn(self.conn) or len(rows) == 1:
            self.conn.execute(_INSERT_INTO[table.name], rows)
            return
        if table is R or table is H:
            self.conn.execute(_INSERT_INTO[table.name], rows)
            return
        # Index rows (plain scalar columns): COPY, in this transaction on this connection.
        columns = list(rows[0])
        raw = cast("psycopg.Connection[Any]", self.conn.connection.dbapi_connection)
        with raw.cursor() as cursor:
            names = ", ".join(f'"{c}"' for c in columns)
            with cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
                for row in rows:
                    copy.write_row([row[c] for c in columns])

    def lock_page(self, res_type: str, *, after_pk: int, count: int) -> list[StoredResource]:
        """The live current versions of ``res_type`` after row key ``after_pk``, in key order, at most
        ``count``, locked like :meth:`lock`: a whole type read page by page to reindex it."""
        query = (
            sa.select(*_RESOURCE_COLS)
            .where(R.c.res_type == res_type, R.c.deleted.is_(False), R.c.pk > after_pk)
            .order_by(R.c.pk.asc())
            .limit(count)
        )
        if not is_sqlite_conn(self.conn):
            query = query.with_for_update()
        return [_stored(r) for r in self.conn.execute(query)]

    def replace_index_rows(self, pk: int, res_type: str, rows: Iterable[IndexRow]) -> None:
        """Replace the index rows of the current version stored under row key ``pk`` (reindexing after
        the search parameters changed; the version and its history stay as they are)."""
        for statement in _DELETE_INDEX_ROWS:
            self.conn.execute(statement, {"row_pk": pk})
        self._insert_index_rows(pk, res_type, rows)

    def _insert_index_rows(self, pk: int, res_type: str, rows: Iterable[IndexRow]) -> None:
        grouped: dict[type, list[dict[str, Any]]] = {}
        for row in rows:
            grouped.setdefault(type(row), []).append(_row_values(pk, res_type, row))
        for row_type, values in grouped.items():
            self._insert_many(_INDEX_TABLE[row_type], values)


def is_sqlite_conn(conn: sa.Connection) -> bool:
    return conn.dialect.name == "sqlite"


@dataclass(eq=False)
class _Queued:
    """One piece of work waiting for a shared write transaction (:meth:`Storage.write_together`)."""

    work: Callable[[UnitOfWork], None]
    done: bool = False
    error: BaseException | None = None


@dataclass(eq=False)
class _GroupCommit:
    """Group commit: the first caller to find no transaction under way writes everything queued so far
    in one transaction; those who queue meanwhile wait for it and the next one takes them all."""

    storage: Storage
    queued: list[_Queued] = field(default_factory=list)
    writing: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    def run(self, work: Callable[[UnitOfWork], None]) -> None:
        mine = _Queued(work)
        with self.changed:
            self.queued.append(mine)
            while self.writing and not mine.done:
                self.changed.wait()
            batch: list[_Queued] = []
            if not mine.done:  # no transaction under way: this caller writes what is queued
                self.writing = True
                batch, self.queued = self.queued, []
        if batch:
            self._write(batch)
        if mine.error is not None:
            raise mine.error

    def _write(self, batch: list[_Queued]) -> None:
        error: BaseException | None = RuntimeError("the shared write transaction did not commit")
        try:
            with self.storage.write() as uow:
                for item in batch:
                    item.work(uow)
            error = None
        except Exception as exc:
            error = exc
        finally:
            with self.changed:
                for item in batch:
                    item.error, item.done = error, True
                self.writing = False
                self.changed.notify_all()


class _ProcessWriterLock:
    """An exclusive ``flock`` on ``<database>-writer.lock``, held while a process writes to an SQLite
    database: writers of several processes wait in the kernel's queue and wake when the lock is released,
    instead of polling in SQLite's busy handler (sleeps growing to 100 ms, the multi-second tails of
    several workers). The kernel releases it when a process dies, so a killed worker blocks nobody.
    Re-entrant within the thread holding the :class:`Storage`'s thread lock (only that thread enters)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._depth = 0

    @classmethod
    def beside(cls, engine: sa.Engine) -> _ProcessWriterLock | None:
        database = engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return cls(Path(database).with_name(Path(database).name + "-writer.lock"))

    def __enter__(self) -> None:
        if self._depth == 0:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._depth += 1

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


class Storage:
    """Opens read views and units of work on an engine (used only by the server's repository)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.sqlite = is_sqlite(engine)
        # One writer at a time for the whole database (SQLite): a read must not run in a write
        # transaction, or it holds up every write for as long as it takes. SQLite's busy handler
        # makes a waiting writer poll with sleeps growing to 100 ms; writers queue on locks instead
        # and start the moment the one before commits: a thread lock within this process, and an
        # exclusive lock on a file beside the database between the processes (the server's workers),
        # taken by one thread of a process at a time.
        self.single_writer = self.sqlite
        self._writers = threading.RLock() if self.single_writer else None
        self._process_lock = _ProcessWriterLock.beside(engine) if self.single_writer else None
        self._group = _GroupCommit(self)

    @contextmanager
    def read(self) -> Iterator[ReadView]:
        with self.engine.connect() as conn, conn.begin():
            yield ReadView(conn)

    @contextmanager
    def read_only(self) -> Iterator[UnitOfWork]:
        """A read-only transaction for a read interaction: on SQLite ``BEGIN DEFERRED`` with
        ``PRAGMA query_only`` (a WAL reader: it neither takes nor waits for the write lock), on
        PostgreSQL ``READ ONLY``. Typed as a unit of work so that the same repository code runs on
        it; any write attempted in it is refused by the database."""
        with self.engine.connect() as conn:
            if self.sqlite:
                conn = conn.execution_options(sqlite_query_only=True)
            else:
                conn = conn.execution_options(postgresql_readonly=True)
            with conn.begin():
                yield UnitOfWork(conn)

    def write_together(self, work: Callable[[UnitOfWork], None]) -> None:
        """Run ``work`` in a write transaction shared with the work other threads hand in meanwhile
        (group commit: one transaction, one sync to disk, for many small writes), and return once
        that transaction has committed. If it fails, every work in it fails with the same error. Not
        from inside a write transaction of the same thread (the shared one would wait for it)."""
        self._group.run(work)

    @contextmanager
    def write(self) -> Iterator[UnitOfWork]:
        with (
            self._writers or nullcontext(),
            self._process_lock or nullcontext(),
            self.engine.connect() as conn,
        ):
            if self.sqlite:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield UnitOfWork(conn)
