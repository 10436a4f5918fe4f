"""Bulk Data export jobs (``$export``; revision ``0011``).

One row per kick-off request (https://hl7.org/fhir/uv/bulkdata/STU2/export.html). The row holds what
the status request answers and what a worker needs to run or resume the job; the NDJSON files themselves
live on disk (``bulk_export_dir``), named in ``output``. Nothing about a job is kept in memory only:

* ``state``: queued -> running -> completed | failed; any of them -> cancelled (``DELETE`` on the status
  URL). A completed or failed job answers until ``expires_at``; then the sweep deletes its files and row.
* the lease: the worker whose ``lease_holder`` is written here and whose ``lease_expires_at`` lies ahead
  runs the job. Claimed with one ``UPDATE ... WHERE (lease_expires_at IS NULL OR lease_expires_at < now)``
  (atomic on SQLite and PostgreSQL alike) and renewed with every page written; a worker whose process died
  leaves a lease that expires, and the next worker starts the job over (``attempts`` counts the starts).

Timestamps are naive UTC, as elsewhere.
"""

from __future__ import annotations

import sqlalchemy as sa

from fhir_norse.store.tables import METADATA

__all__ = ["BULK_EXPORT_JOB"]

BULK_EXPORT_JOB = sa.Table(
    "bulk_export_job",
    METADATA,
    # Random, unguessable (it is part of the status and file URLs).
    sa.Column("id", sa.String(64), primary_key=True),
    # The client that started the job: the only one that may poll, download or cancel it.
    sa.Column("client_id", sa.String(255), nullable=False),
    # queued | running | completed | failed | cancelled
    sa.Column("state", sa.String(16), nullable=False),
    # system | patient | group, and the Group's id for a group-level export.
    sa.Column("level", sa.String(16), nullable=False),
    sa.Column("group_id", sa.String(64), nullable=True),
    # The kick-off request's URL (the manifest's ``request``) and the FHIR base the file URLs are on.
    sa.Column("request_url", sa.Text(), nullable=False),
    sa.Column("base_url", sa.String(1024), nullable=False),
    # The checked parameters as JSON (fhir_norse/server/bulk/request.py, ExportRequest).
    sa.Column("parameters", sa.Text(), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    # The instant of the snapshot the files hold (the manifest's ``transactionTime``).
    sa.Column("transaction_time", sa.DateTime(), nullable=True),
    sa.Column("finished_at", sa.DateTime(), nullable=True),
    sa.Column("expires_at", sa.DateTime(), nullable=True),
    sa.Column("lease_holder", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    # What X-Progress says ("Observation: 1200/5000 resources").
    sa.Column("progress", sa.String(255), nullable=True),
    # A failed job's reason (the status request's OperationOutcome).
    sa.Column("error", sa.Text(), nullable=True),
    # The files written, as JSON: [{"type", "file", "count", "kind": "output"|"error"}].
    sa.Column("output", sa.Text(), nullable=True),
    sa.Index("ix_bulk_export_job_state", "state", "lease_expires_at"),
    sa.Index("ix_bulk_export_job_expires", "expires_at"),
)
