"""Bulk Data Access 2.0 ``$export``: https://hl7.org/fhir/uv/bulkdata/STU2/export.html.

* :mod:`.request`: the kick-off's parameters and headers, checked (what a job is asked to do);
* :mod:`.jobs`: the job rows (``bulk_export_job``): creation, the lease, progress, the status answer,
  cancellation and expiry;
* :mod:`.exporter`: one job run: a database snapshot read page by page into NDJSON files;
* :mod:`.worker`: the background thread that claims queued jobs and sweeps expired ones;
* :mod:`.operations`: the three kick-off operations (system, ``Patient`` type, ``Group`` instance).

The status and file URLs are served by :mod:`fhir_norse.api.bulk_routes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class BulkExportConfig:
    """The settings of bulk export (``FHIR_NORSE_BULK_*``; README "Bulk Data export")."""

    # Where the NDJSON files are written (one folder per job); must be shared by every worker process.
    directory: Path
    # How long a finished job's files (and its status) stay available.
    file_hours: float = 24.0
    # Resources per NDJSON file; a type with more is split into several files.
    file_lines: int = 100_000
    # How often the worker thread looks for queued jobs; 0: no thread (tests run jobs themselves).
    interval_s: float = 2.0
    # A running job's lease; renewed with every page, taken over by another worker once expired.
    lease_s: float = 60.0
    # Resources read per database round trip (what the memory of a running job is bounded by).
    page_size: int = 1000
    # A progress line in the server log every this many resources of a type.
    log_every: int = 50_000
