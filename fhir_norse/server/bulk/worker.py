"""The export worker: a thread in each server process that runs queued export jobs and sweeps expired
ones (https://hl7.org/fhir/uv/bulkdata/STU2/export.html: the kick-off only queues the job).

Every ``interval_s`` it deletes what has expired (:meth:`JobStore.sweep`), then claims jobs one at a time
with a lease in the database (:meth:`JobStore.claim`) and runs each (:class:`Exporter`), renewing the lease
with every page. Several workers, in one process or many, never run the same job; a job whose worker died
is claimed again once its lease has expired and starts over; one that has failed to finish
:data:`MAX_ATTEMPTS` times is failed. Tests turn the thread off (``FHIR_NORSE_BULK_EXPORT_INTERVAL_S=0``)
and call :meth:`BulkExportWorker.run_pending` themselves.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from datetime import datetime

from fhir_norse.outcomes import FhirError
from fhir_norse.server.bulk import BulkExportConfig
from fhir_norse.server.bulk.exporter import Exporter, Stopped
from fhir_norse.server.bulk.jobs import Job, JobStore, utc_now
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.leased import PeriodicWorker, new_holder

log = logging.getLogger(__name__)

# Starts of one job (each ended by a worker that died) before it is failed rather than started again.
MAX_ATTEMPTS = 3


class BulkExportWorker(PeriodicWorker):
    """Runs export jobs of ``service`` (module doc)."""

    thread_name = "fhir-norse-bulk-export"

    def __init__(
        self,
        service: FhirService,
        config: BulkExportConfig,
        *,
        grace_s: float = 1.0,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__(config.interval_s)
        self.config = config
        self.jobs = JobStore(service.storage, config, now)
        kernel = service.kernel
        self.exporter = Exporter(
            service.storage, kernel.registry, kernel.search_limits, config, grace_s=grace_s
        )
        self.holder = new_holder()

    def run_pending(self) -> int:
        """Claim and run queued jobs until none is left; how many were run."""
        ran = 0
        while not self.stopping and (job := self.jobs.claim(self.holder)) is not None:
            self.run(job)
            ran += 1
        return ran

    def run(self, job: Job) -> None:
        """Run one claimed job to its end: completed, failed, or stopped (cancelled or taken over)."""
        if job.attempts > MAX_ATTEMPTS:
            self.jobs.fail(job, self.holder, f"The export did not finish in {MAX_ATTEMPTS} attempts")
            return
        folder = self.jobs.attempt_folder(job)
        shutil.rmtree(folder, ignore_errors=True)
        log.info("export %s: started (attempt %d)", job.id, job.attempts)

        def progress(text: str) -> None:
            if self.stopping:
                self.jobs.release(job, self.holder)
                raise Stopped("the server is stopping")
            if not self.jobs.renew(job, self.holder, text):
                raise Stopped("cancelled or taken over")

        try:
            moment, files = self.exporter.run(job, folder, progress)
        except Stopped as stop:
            log.info("export %s: stopped (%s)", job.id, stop)
            shutil.rmtree(folder, ignore_errors=True)
            return
        except FhirError as error:
            log.warning("export %s: failed: %s", job.id, error.message)
            self.jobs.fail(job, self.holder, error.message)
            return
        except Exception:
            log.exception("export %s: failed", job.id)
            self.jobs.fail(job, self.holder, "The export failed on an internal error")
            return
        if self.jobs.complete(job, self.holder, transaction_time=moment, files=files):
            log.info("export %s: completed, %d file(s)", job.id, len(files))
        else:
            shutil.rmtree(folder, ignore_errors=True)

    def tick(self) -> None:
        """One round: sweep what has expired, then run the queued jobs."""
        self.jobs.sweep()
        self.run_pending()
