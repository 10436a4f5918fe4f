"""Export jobs in the database (``bulk_export_job``, :mod:`fhir_norse.store.bulk_tables`): creation, the
lease a worker runs one under, progress, the answer to a status request, cancellation and expiry.

A job belongs to the client that started it: for any other client it does not exist (404), nor does it
once cancelled or expired. The files of a job are in ``<directory>/<job id>/a<attempt>/``: a job started
over after its worker died writes to a folder of its own, so a worker that was only slow (and lost its
lease) can never write into the files of the one that took over.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from fhir_norse.outcomes import NotFound
from fhir_norse.server.bulk import BulkExportConfig
from fhir_norse.server.bulk.request import ExportRequest
from fhir_norse.store.bulk_tables import BULK_EXPORT_JOB as JOB
from fhir_norse.store.storage import Storage

log = logging.getLogger(__name__)

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "running", "completed", "failed", "cancelled"
_EPOCH = datetime(1970, 1, 1)


def utc_now() -> datetime:
    """Now, as naive UTC (how the job table stores instants)."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class ExportFile:
    """One file of a finished job: its resource type, name (in the job's folder), lines, and whether it
    holds resources (``output``) or OperationOutcomes (``error``)."""

    type: str
    name: str
    count: int
    kind: str = "output"


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    client_id: str
    state: str
    request: ExportRequest
    request_url: str
    base_url: str
    created_at: datetime
    attempts: int
    transaction_time: datetime | None = None
    expires_at: datetime | None = None
    lease_holder: str | None = None
    lease_expires_at: datetime | None = None
    progress: str | None = None
    error: str | None = None
    files: tuple[ExportFile, ...] = ()

    @classmethod
    def from_row(cls, row: Any) -> Job:
        files = tuple(ExportFile(**f) for f in orjson.loads(row.output)) if row.output else ()
        return cls(
            id=row.id,
            client_id=row.client_id,
            state=row.state,
            request=ExportRequest.from_json(row.parameters),
            request_url=row.request_url,
            base_url=row.base_url,
            created_at=row.created_at,
            attempts=row.attempts,
            transaction_time=row.transaction_time,
            expires_at=row.expires_at,
            lease_holder=row.lease_holder,
            lease_expires_at=row.lease_expires_at,
            progress=row.progress,
            error=row.error,
            files=files,
        )

    def file(self, name: str) -> ExportFile | None:
        return next((f for f in self.files if f.name == name), None)


def new_job_id() -> str:
    """A random job id (122 bits): the status and file URLs carry it."""
    return uuid.uuid4().hex


class JobStore:
    """The job rows over the server's storage (module doc)."""

    def __init__(
        self, storage: Storage, config: BulkExportConfig, now: Callable[[], datetime] = utc_now
    ) -> None:
        self.storage = storage
        self.config = config
        self.now = now

    # ------------------------------------------------------------------ files
    def job_folder(self, job_id: str) -> Path:
        return self.config.directory / job_id

    def attempt_folder(self, job: Job) -> Path:
        return self.job_folder(job.id) / f"a{job.attempts}"

    def file_path(self, job: Job, name: str) -> Path:
        return self.attempt_folder(job) / name

    def remove_files(self, job_id: str) -> None:
        shutil.rmtree(self.job_folder(job_id), ignore_errors=True)

    # ------------------------------------------------------------------ creation and reads
    @staticmethod
    def insert(
        conn: sa.Connection,
        *,
        job_id: str,
        client_id: str,
        request: ExportRequest,
        request_url: str,
        base_url: str,
        now: datetime,
    ) -> None:
        """Queue a job, in the caller's transaction (the kick-off's, with its AuditEvent)."""
        conn.execute(
            sa.insert(JOB).values(
                id=job_id,
                client_id=client_id,
                state=QUEUED,
                level=request.level,
                group_id=request.group_id,
                request_url=request_url,
                base_url=base_url,
                parameters=request.to_json(),
                created_at=now,
                attempts=0,
            )
        )

    def get(self, job_id: str) -> Job | None:
        with self.storage.read() as view:
            row = view.conn.execute(sa.select(JOB).where(JOB.c.id == job_id)).first()
        return None if row is None else Job.from_row(row)

    def for_client(self, job_id: str, client_id: str) -> Job:
        """The job ``client_id`` started, unless cancelled or expired; 404 otherwise (another client's
        job answers as if it did not exist)."""
        job = self.get(job_id) if len(job_id) <= 64 else None
        if (
            job is None
            or job.client_id != client_id
            or job.state == CANCELLED
            or (job.expires_at is not None and job.expires_at <= self.now())
        ):
            raise NotFound("No export job at this address (unknown, cancelled, expired or not yours)")
        return job

    # ------------------------------------------------------------------ cancellation and expiry
    def cancel(self, job_id: str, client_id: str) -> None:
        """``DELETE`` on the status URL: the job is cancelled (a running one stops at its next page) and
        its files are deleted; 404 as :meth:`for_client`."""
        job = self.for_client(job_id, client_id)
        with self.storage.write() as uow:
            done = uow.conn.execute(
                sa.update(JOB)
                .where(JOB.c.id == job.id, JOB.c.state != CANCELLED)
                .values(state=CANCELLED, finished_at=self.now())
            ).rowcount
        if not done:
            raise NotFound("No export job at this address (unknown, cancelled, expired or not yours)")
        if job.state != RUNNING:
            self.remove_files(job.id)
        log.info("export %s cancelled by its client", job.id)

    def sweep(self) -> int:
        """Delete the files and rows of expired jobs, and of cancelled ones no worker holds any more;
        how many. Run periodically by the worker."""
        now = self.now()
        gone = sa.or_(
            JOB.c.expires_at <= now,
            sa.and_(
                JOB.c.state == CANCELLED,
                sa.or_(JOB.c.lease_expires_at.is_(None), JOB.c.lease_expires_at < now),
            ),
        )
        with self.storage.read() as view:
            ids = [row.id for row in view.conn.execute(sa.select(JOB.c.id).where(gone))]
        for job_id in ids:
            self.remove_files(job_id)
            with self.storage.write() as uow:
                uow.conn.execute(sa.delete(JOB).where(JOB.c.id == job_id, gone))
        if ids:
            log.info("export sweep: %d expired or cancelled job(s) deleted with their files", len(ids))
        return len(ids)

    # ------------------------------------------------------------------ the lease
    def claim(self, holder: str) -> Job | None:
        """Take the oldest job that is queued, or running under an expired lease (its worker died: it
        starts over), for ``holder``; None when there is none."""
        now = self.now()
        free = sa.and_(
            JOB.c.state.in_((QUEUED, RUNNING)),
            sa.or_(JOB.c.lease_expires_at.is_(None), JOB.c.lease_expires_at < now),
        )
        with self.storage.read() as view:
            candidates = [
                row.id
                for row in view.conn.execute(
                    sa.select(JOB.c.id).where(free).order_by(JOB.c.created_at, JOB.c.id).limit(10)
                )
            ]
        for job_id in candidates:
            with self.storage.write() as uow:
                taken = uow.conn.execute(
                    sa.update(JOB)
                    .where(JOB.c.id == job_id, free)
                    .values(
                        state=RUNNING,
                        lease_holder=holder,
                        lease_expires_at=now + timedelta(seconds=self.config.lease_s),
                        attempts=JOB.c.attempts + 1,
                        progress="started",
                    )
                ).rowcount
            if taken:
                job = self.get(job_id)
                if job is not None:
                    return job
        return None

    def renew(self, job: Job, holder: str, progress: str) -> bool:
        """Extend the lease and record progress; False when the job was cancelled or another worker took
        it over (the caller stops)."""
        now = self.now()
        with self.storage.write() as uow:
            return bool(
                uow.conn.execute(
                    sa.update(JOB)
                    .where(JOB.c.id == job.id, JOB.c.lease_holder == holder, JOB.c.state == RUNNING)
                    .values(
                        lease_expires_at=now + timedelta(seconds=self.config.lease_s), progress=progress[:255]
                    )
                ).rowcount
            )

    def release(self, job: Job, holder: str) -> None:
        """Give a running job back (the worker stops): another worker starts it over at once."""
        with self.storage.write() as uow:
            uow.conn.execute(
                sa.update(JOB)
                .where(JOB.c.id == job.id, JOB.c.lease_holder == holder)
                .values(lease_expires_at=_EPOCH)
            )

    def complete(self, job: Job, holder: str, *, transaction_time: datetime, files: list[ExportFile]) -> bool:
        """Record a finished job's files; False when it was cancelled or taken over meanwhile."""
        now = self.now()
        output = orjson.dumps([_file_json(f) for f in files]).decode()
        with self.storage.write() as uow:
            done = uow.conn.execute(
                sa.update(JOB)
                .where(JOB.c.id == job.id, JOB.c.lease_holder == holder, JOB.c.state == RUNNING)
                .values(
                    state=COMPLETED,
                    transaction_time=transaction_time,
                    finished_at=now,
                    expires_at=now + timedelta(hours=self.config.file_hours),
                    lease_expires_at=None,
                    progress="completed",
                    output=output,
                )
            ).rowcount
        if done:
            self._remove_other_attempts(job)
        return bool(done)

    def fail(self, job: Job, holder: str, message: str) -> None:
        """Record a job that cannot be done (the status request answers 500 with ``message``)."""
        now = self.now()
        with self.storage.write() as uow:
            uow.conn.execute(
                sa.update(JOB)
                .where(JOB.c.id == job.id, JOB.c.lease_holder == holder, JOB.c.state == RUNNING)
                .values(
                    state=FAILED,
                    finished_at=now,
                    expires_at=now + timedelta(hours=self.config.file_hours),
                    lease_expires_at=None,
                    error=message[:4000],
                )
            )
        self.remove_files(job.id)

    def _remove_other_attempts(self, job: Job) -> None:
        keep = self.attempt_folder(job).name
        folder = self.job_folder(job.id)
        if folder.is_dir():
            for child in folder.iterdir():
                if child.name != keep:
                    shutil.rmtree(child, ignore_errors=True)


def _file_json(f: ExportFile) -> dict[str, Any]:
    return {"type": f.type, "name": f.name, "count": f.count, "kind": f.kind}
