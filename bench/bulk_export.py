"""Bulk Data export at scale: load N synthetic resources, export them all, report wall time and peak RSS.

    python -m bench.bulk_export sqlite|postgresql [--resources 1000000] [--per-patient 9]
                                [--skip-load] [--file-lines 100000] [--out FILE]

The synthetic set of :mod:`bench.dataset` (Patients, each with ``--per-patient`` Observations;
``--resources`` in all) is loaded first by ``python -m bench.load --mode bulk --validate none`` in a
child process (the fast multi-row INSERT path, every index row as the server writes it), so that this
process's peak RSS is the export's alone. ``--skip-load`` exports what the benchmark database holds.

The export is a system-level ``$export`` of Patient and Observation queued as the kick-off would queue it
and run by the server's own worker (:class:`~fhir_norse.server.bulk.worker.BulkExportWorker`), into
``var/bench/bulk-export``. The figures (load time, export time, resources per second, bytes written, peak
RSS) go to ``bench/results/bulk-export-<database>.json``; copy them to BENCHMARKS.md with the machine.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import common
from fhir_norse.compose import build_reader
from fhir_norse.server.bulk import BulkExportConfig
from fhir_norse.server.bulk.jobs import JobStore, new_job_id, utc_now
from fhir_norse.server.bulk.request import ExportRequest
from fhir_norse.server.bulk.worker import BulkExportWorker

EXPORT_DIR = common.ROOT / "var" / "bench" / "bulk-export"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MemorySampler:
    """Peak of this process's anonymous and file-backed resident memory (``RssAnon``, ``RssFile`` in
    /proc/self/status), sampled every 50 ms. Peak RSS alone counts the database pages SQLite maps
    (``mmap_size``, 2,000 MiB): those are the page cache, shared and dropped under pressure, not the
    export's own memory; ``RssAnon`` is (the heap, Python objects, buffers)."""

    def __init__(self) -> None:
        self.peak: dict[str, float] = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) / 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def load(kind: str, resources: int, per_patient: int) -> float:
    """Load the synthetic set in a child process; its wall time in seconds."""
    patients = max(1, resources // (1 + per_patient))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bench.load", kind, "--patients", str(patients), "--per-patient",
         str(per_patient), "--mode", "bulk", "--validate", "none", "--out", f"bulk-export-load-{kind}.json"],
        check=True,
        cwd=common.ROOT,
    )  # fmt: skip
    return time.perf_counter() - started


def export(kind: str, file_lines: int) -> dict[str, Any]:
    """Queue and run one system-level export of Patient and Observation; its figures."""
    shutil.rmtree(EXPORT_DIR, ignore_errors=True)
    # The worker holds a job-store connection, and on PostgreSQL two more for the snapshot (module doc of
    # fhir_norse.server.bulk.exporter): the server's pool has them, a reader's default of one does not.
    service = build_reader(common.database_url(kind), pool_size=4)
    config = BulkExportConfig(directory=EXPORT_DIR, file_lines=file_lines, interval_s=0)
    worker = BulkExportWorker(service, config, grace_s=0.0)
    job_id = new_job_id()
    request = ExportRequest(level="system", types=("Patient", "Observation"))
    with service.storage.write() as uow:
        JobStore.insert(
            uow.conn,
            job_id=job_id,
            client_id="bench",
            request=request,
            request_url="http://bench/fhir/$export?_type=Patient,Observation",
            base_url="http://bench/fhir",
            now=utc_now(),
        )
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    with MemorySampler() as memory:
        worker.run_pending()
    elapsed = time.perf_counter() - started
    job = worker.jobs.get(job_id)
    if job is None or job.state != "completed":
        raise SystemExit(f"the export did not complete: {job}")
    exported = sum(f.count for f in job.files if f.kind == "output")
    written = sum(p.stat().st_size for p in EXPORT_DIR.rglob("*.ndjson"))
    service.storage.engine.dispose()
    return {
        "resources": exported,
        "files": len(job.files),
        "bytes": written,
        "export_s": round(elapsed, 3),
        "resources_per_s": round(exported / elapsed) if elapsed else None,
        "peak_rss_mb_before_export": round(rss_before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_anon_mb": round(memory.peak["RssAnon"], 1),
        "peak_rss_file_mb": round(memory.peak["RssFile"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bulk_export")
    p.add_argument("database", choices=["sqlite", "postgresql"])
    p.add_argument("--resources", type=int, default=1_000_000)
    p.add_argument("--per-patient", type=int, default=9)
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--file-lines", type=int, default=100_000)
    p.add_argument("--out", help="result JSON file name under bench/results/")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"database": args.database, "version": common.code_version()}
    if not args.skip_load:
        result["load_s"] = round(load(args.database, args.resources, args.per_patient), 3)
    result.update(export(args.database, args.file_lines))
    path: Path = common.write_json(args.out or f"bulk-export-{args.database}.json", result)
    common.log(f"[bulk export {args.database}] {result['resources']} resources in {result['export_s']} s, "
               f"peak RSS {result['peak_rss_mb']} MB; results in {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
