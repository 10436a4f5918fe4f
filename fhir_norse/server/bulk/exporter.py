"""One export job run: a snapshot of the database written as NDJSON, one type at a time, page by page.

**The snapshot.** The whole job reads one database snapshot, so the files are consistent with each
other and with ``transactionTime`` (the manifest's instant: every resource last changed at or before it
is exported as it was then, nothing changed after it is). Every resource is also filtered on
``lastUpdated <= transactionTime``, and the instant is chosen so that no resource outside the snapshot can
carry an earlier ``lastUpdated`` (a later ``_since=<transactionTime>`` export then misses nothing):

* SQLite: the snapshot's read transaction is begun while this process holds the database's single write
  lock (:meth:`Storage.write <fhir_norse.store.storage.Storage.write>`), under which every writer stamps
  ``lastUpdated``; the instant is taken under the same lock, one millisecond back.
* PostgreSQL: a short transaction takes ``LOCK TABLE resource IN SHARE MODE`` (it waits for the writes
  in flight to commit and holds new ones back for a moment), exports its snapshot
  (``pg_export_snapshot``), and the job's ``REPEATABLE READ READ ONLY`` transaction adopts it; then the
  lock is released. A writer stamps ``lastUpdated`` just before it writes the row, so the instant is
  taken ``snapshot_grace_s`` before the lock (a write stamped but not yet written when the lock was
  granted is left to the next export rather than lost).

A long export keeps its snapshot open: on SQLite the WAL cannot be checkpointed past it until the job
ends (the file grows with the writes meanwhile), on PostgreSQL vacuum cannot remove the row versions it
may still see.

**Bounded memory.** Rows are read ``page_size`` at a time, keyset on ``(lastUpdated, row key)`` (the
``ix_resource_type_updated`` index, so each page is one index range whatever the table's size), and each
stored JSON text is written to the file as it is (one line; never parsed). A type's count is taken once,
for ``X-Progress``.

**What each level exports** (every type only as far as the kick-off allowed it):

* system: every resource of the types;
* patient: the resources in the Patient compartment of any live Patient (the Patients themselves
  included): those whose compartment references (:func:`~fhir_norse.auth.compartment.membership_params`,
  local ones) name one;
* group: the same for the Group's members (``Group.member.entity`` of the Group as it is in the snapshot,
  without the members marked ``inactive``), so the Group itself, which names them, too.

``_since`` adds the criterion of ``_lastUpdated=gt<_since>`` and each ``_typeFilter`` the criteria of its
search, through the search engine's own SQL (:func:`~fhir_norse.store.search.sql.match_conditions`): an
export finds exactly what those searches find.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson
import sqlalchemy as sa

from fhir_norse.auth.compartment import membership_params
from fhir_norse.outcomes import Issue, NotFound, operation_outcome
from fhir_norse.server.bulk import BulkExportConfig
from fhir_norse.server.bulk.jobs import ExportFile, Job
from fhir_norse.server.bulk.request import ExportRequest, filter_request
from fhir_norse.server.resources import now_ms, reference_id
from fhir_norse.server.search.parse import parse_search
from fhir_norse.store.search.params import SearchParamRegistry
from fhir_norse.store.search.request import SearchLimits
from fhir_norse.store.search.sql import Condition, match_conditions
from fhir_norse.store.storage import Storage
from fhir_norse.store.tables import ReferenceIndex, ResourceRow

log = logging.getLogger(__name__)

RES: sa.Table = ResourceRow.__table__  # type: ignore[attr-defined]
REF: sa.Table = ReferenceIndex.__table__  # type: ignore[attr-defined]
_R = RES.alias("r")
_ONE_MS = timedelta(milliseconds=1)


class Stopped(Exception):
    """The job was cancelled, or another worker took it over: stop writing."""


@contextmanager
def snapshot(storage: Storage, grace_s: float) -> Iterator[tuple[sa.Connection, datetime]]:
    """A read-only transaction on one snapshot of the database, and the instant it stands for (module
    doc). The transaction ends with the block."""
    engine = storage.engine
    if storage.sqlite:
        with engine.connect() as conn:
            conn = conn.execution_options(sqlite_query_only=True)
            with conn.begin():
                with storage.write():
                    moment = now_ms() - _ONE_MS
                    # The read transaction takes its snapshot at its first read.
                    conn.execute(sa.select(sa.func.max(RES.c.pk)))
                yield conn, moment
        return
    moment = now_ms() - timedelta(seconds=grace_s)
    with engine.connect() as barrier, engine.connect() as reader:
        reader = reader.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with barrier.begin():
            barrier.exec_driver_sql("SET LOCAL lock_timeout = '60s'")
            barrier.exec_driver_sql("LOCK TABLE resource IN SHARE MODE")
            snapshot_id = str(barrier.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one())
            transaction = reader.begin()
            reader.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{_quoted(snapshot_id)}'")
        try:
            yield reader, moment
        finally:
            transaction.rollback()


def _quoted(snapshot_id: str) -> str:
    if not all(c.isalnum() or c == "-" for c in snapshot_id):
        raise ValueError(f"unexpected snapshot id {snapshot_id!r}")
    return snapshot_id


@dataclass(frozen=True, slots=True)
class Scope:
    """The compartment a patient- or group-level export keeps to: the patient ids it covers, as SQL."""

    members: sa.Select[Any]

    def condition(self, res_type: str, r: sa.FromClause) -> Condition:
        ref = REF.alias("member_ref")
        params = membership_params(res_type)
        referencing = (
            sa.exists()
            .where(
                ref.c.resource_pk == r.c.pk,
                ref.c.param.in_(params),
                ref.c.target_type == "Patient",
                ref.c.url.is_(None),
                ref.c.target_id.in_(self.members),
            )
            .correlate(r)
        )
        if res_type == "Patient":
            return sa.or_(r.c.res_id.in_(self.members), referencing)
        return referencing


def _live_patients() -> sa.Select[Any]:
    p = RES.alias("patient")
    return sa.select(p.c.res_id).where(p.c.res_type == "Patient", p.c.deleted.is_(False))


def group_scope(conn: sa.Connection, group_id: str, moment: datetime) -> Scope:
    """The members of ``Group/group_id`` as it is in the snapshot (live Patients it names locally, less
    those only marked inactive); 404 when it does not exist there."""
    row = conn.execute(
        sa.select(RES.c.pk, sa.cast(RES.c.body, sa.Text)).where(
            RES.c.res_type == "Group",
            RES.c.res_id == group_id,
            RES.c.deleted.is_(False),
            RES.c.last_updated <= moment,
        )
    ).first()
    if row is None:
        raise NotFound(f"Group/{group_id} does not exist (any more)")
    body = orjson.loads(row[1])
    active: set[str] = set()
    inactive: set[str] = set()
    for member in body.get("member") or []:
        patient = reference_id((member.get("entity") or {}).get("reference"), "Patient")
        if patient is not None:
            (inactive if member.get("inactive") is True else active).add(patient)
    ref = REF.alias("group_ref")
    members = sa.select(ref.c.target_id).where(
        ref.c.resource_pk == int(row[0]),
        ref.c.param == "member",
        ref.c.target_type == "Patient",
        ref.c.url.is_(None),
        ref.c.target_id.in_(_live_patients()),
    )
    left_out = sorted(inactive - active)
    if left_out:
        members = members.where(ref.c.target_id.not_in(left_out))
    return Scope(members)


class Exporter:
    """Runs one job (module doc): ``progress`` is called after each page with the X-Progress text and
    raises :class:`Stopped` when the job must stop."""

    def __init__(
        self,
        storage: Storage,
        registry: SearchParamRegistry,
        limits: SearchLimits,
        config: BulkExportConfig,
        *,
        grace_s: float,
    ) -> None:
        self.storage = storage
        self.registry = registry
        self.limits = limits
        self.config = config
        self.grace_s = grace_s

    def run(
        self, job: Job, folder: Path, progress: Callable[[str], None]
    ) -> tuple[datetime, list[ExportFile]]:
        """Write the job's files into ``folder``; the snapshot's instant and the files."""
        request = job.request
        folder.mkdir(parents=True, exist_ok=True)
        files: list[ExportFile] = []
        with snapshot(self.storage, self.grace_s) as (conn, moment):
            scope: Scope | None = None
            if request.level == "patient":
                scope = Scope(_live_patients())
            elif request.level == "group":
                assert request.group_id is not None
                scope = group_scope(conn, request.group_id, moment)
            for res_type in request.types:
                files += self._export_type(conn, job, request, res_type, moment, scope, folder, progress)
        if request.warnings:
            files.append(_write_warnings(folder, request.warnings))
        return moment, files

    def conditions(
        self, request: ExportRequest, res_type: str, moment: datetime, scope: Scope | None, r: sa.FromClause
    ) -> list[Condition]:
        """What a resource of ``res_type`` must meet to be exported (module doc)."""
        now = now_ms()
        conditions = [*match_conditions(res_type, (), r, now), r.c.last_updated <= moment]
        if request.since is not None:
            since = parse_search(
                res_type, [("_lastUpdated", f"gt{request.since}")], strict=True, registry=self.registry
            )
            conditions += match_conditions(res_type, since.criteria, r, since.now)
        filters = request.type_filters.get(res_type)
        if filters:
            alternatives = []
            for query in filters:
                search = filter_request(
                    res_type, query, strict=request.strict, registry=self.registry, limits=self.limits
                )
                alternatives.append(sa.and_(*match_conditions(res_type, search.criteria, r, search.now)))
            conditions.append(sa.or_(*alternatives))
        if scope is not None:
            conditions.append(scope.condition(res_type, r))
        return conditions

    def _export_type(
        self,
        conn: sa.Connection,
        job: Job,
        request: ExportRequest,
        res_type: str,
        moment: datetime,
        scope: Scope | None,
        folder: Path,
        progress: Callable[[str], None],
    ) -> list[ExportFile]:
        r = _R
        conditions = self.conditions(request, res_type, moment, scope, r)
        total = int(conn.execute(sa.select(sa.func.count()).select_from(r).where(*conditions)).scalar_one())
        progress(f"{res_type}: 0/{total} resources")
        writer = _Files(folder, res_type, self.config.file_lines)
        after: tuple[datetime, int] | None = None
        done = 0
        try:
            while True:
                statement = sa.select(r.c.last_updated, r.c.pk, sa.cast(r.c.body, sa.Text)).where(*conditions)
                if after is not None:
                    statement = statement.where(
                        sa.tuple_(r.c.last_updated, r.c.pk)
                        > sa.tuple_(
                            sa.literal(after[0], type_=r.c.last_updated.type),
                            sa.literal(after[1], type_=r.c.pk.type),
                        )
                    )
                statement = statement.order_by(r.c.last_updated, r.c.pk).limit(self.config.page_size)
                rows = conn.execute(statement).all()
                for _updated, _pk, text in rows:
                    writer.write(text)
                done += len(rows)
                if rows:
                    after = (rows[-1][0], int(rows[-1][1]))
                    if done // self.config.log_every != (done - len(rows)) // self.config.log_every:
                        log.info("export %s: %s %d/%d resources", job.id, res_type, done, total)
                progress(f"{res_type}: {done}/{total} resources")
                if len(rows) < self.config.page_size:
                    break
        finally:
            writer.close()
        log.info("export %s: %s done, %d resources in %d file(s)", job.id, res_type, done, len(writer.files))
        return writer.files


class _Files:
    """The NDJSON files of one type: ``<Type>-<n>.ndjson``, a new one every ``lines`` lines, opened only
    when a line comes (a type with nothing to export has no file)."""

    def __init__(self, folder: Path, res_type: str, lines: int) -> None:
        self.folder = folder
        self.res_type = res_type
        self.lines = lines
        self.files: list[ExportFile] = []
        self._out: IO[bytes] | None = None
        self._count = 0

    def write(self, text: str) -> None:
        if self._out is None or self._count >= self.lines:
            self.close()
            name = f"{self.res_type}-{len(self.files) + 1}.ndjson"
            self._out = (self.folder / name).open("wb")
            self.files.append(ExportFile(self.res_type, name, 0))
        self._out.write(text.encode())
        self._out.write(b"\n")
        self._count += 1

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
            last = self.files[-1]
            self.files[-1] = ExportFile(last.type, last.name, self._count)
            self._count = 0


def _write_warnings(folder: Path, warnings: tuple[str, ...]) -> ExportFile:
    """The job's error file: one OperationOutcome per part of the request that was ignored."""
    name = "OperationOutcome-1.ndjson"
    with (folder / name).open("wb") as out:
        for message in warnings:
            issue = Issue(message, code="not-supported", severity="warning")
            out.write(orjson.dumps(operation_outcome([issue])) + b"\n")
    return ExportFile("OperationOutcome", name, len(warnings), kind="error")
