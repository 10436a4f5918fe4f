"""The status and file URLs of Bulk Data export jobs: https://hl7.org/fhir/uv/bulkdata/STU2/export.html.

* ``GET [base]/$export-status/<job>`` (the kick-off's ``Content-Location``): 202 with ``X-Progress``
  and ``Retry-After`` while the job is queued or running; 200 with the manifest (``application/json``,
  ``Expires`` when its files go) once completed; 500 with an OperationOutcome when it failed.
* ``DELETE [base]/$export-status/<job>``: cancels the job and deletes its files (202); then 404.
* ``GET [base]/$export-file/<job>/<file>``: one NDJSON file (``application/fhir+ndjson``), streamed
  from disk; ``requiresAccessToken`` is true, so the request needs a bearer token too.

All of them answer only the client that started the job (the token's ``client_id``): for any other, as
for a cancelled or expired job, the address does not exist (404). The kick-off, the cancellation and
every file download are audited (``operation:export``, with the URL as the query).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from fhir_norse.api.deps import Context, Service
from fhir_norse.api.rendering import render
from fhir_norse.outcomes import InternalError, NotFound, information
from fhir_norse.server.bulk.jobs import COMPLETED, FAILED, Job
from fhir_norse.server.bulk.operations import FILE_PATH, INTERACTION, STATUS_PATH
from fhir_norse.server.bulk.request import NDJSON
from fhir_norse.server.bulk.worker import BulkExportWorker
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.resources import http_date, instant

# How long a client should wait before polling again (seconds), while a job is queued or running.
RETRY_AFTER_SECONDS = 5


def manifest(job: Job) -> dict[str, Any]:
    """The completion manifest of a finished job (the IG's "Response - Complete Status")."""
    assert job.transaction_time is not None

    def url(name: str) -> str:
        return f"{job.base_url}/{FILE_PATH}/{job.id}/{name}"

    return {
        "transactionTime": instant(job.transaction_time),
        "request": job.request_url,
        "requiresAccessToken": True,
        "output": [
            {"type": f.type, "url": url(f.name), "count": f.count} for f in job.files if f.kind == "output"
        ],
        "error": [
            {"type": f.type, "url": url(f.name), "count": f.count} for f in job.files if f.kind == "error"
        ],
    }


def _status(job: Job) -> Response:
    if job.state == COMPLETED:
        headers = {"Expires": http_date(job.expires_at)} if job.expires_at is not None else {}
        return Response(
            orjson.dumps(manifest(job)), status_code=200, media_type="application/json", headers=headers
        )
    if job.state == FAILED:
        raise InternalError(f"The export failed: {job.error or 'unknown error'}")
    return Response(
        status_code=202,
        headers={"X-Progress": job.progress or "queued", "Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _audited(service: FhirService, ctx: RequestContext, query: str, res_type: str | None = None) -> None:
    with service.audited_session(ctx, INTERACTION, res_type, None, query) as repo:
        repo.audit(INTERACTION, res_type, None, query=query)


def install_bulk_routes(app: FastAPI) -> None:
    """Add the routes (before the FHIR routes, which would take ``$export-status/<id>`` for a read)."""
    router = APIRouter(prefix="/fhir")

    def worker(request: Request) -> BulkExportWorker:
        found: BulkExportWorker = request.app.state.bulk_export
        return found

    @router.get(f"/{STATUS_PATH}/{{job_id}}")
    async def export_status(request: Request, job_id: str, ctx: Context) -> Response:
        job = await run_in_threadpool(worker(request).jobs.for_client, job_id, ctx.caller.client_id)
        return _status(job)

    @router.delete(f"/{STATUS_PATH}/{{job_id}}")
    async def export_cancel(request: Request, job_id: str, ctx: Context, service: Service) -> Response:
        await run_in_threadpool(worker(request).jobs.cancel, job_id, ctx.caller.client_id)
        await run_in_threadpool(_audited, service, ctx, f"DELETE {STATUS_PATH}/{job_id}")
        return render(Result(202, body=information(f"Export {job_id} cancelled; its files are deleted")))

    @router.get(f"/{FILE_PATH}/{{job_id}}/{{name}}")
    async def export_file(
        request: Request, job_id: str, name: str, ctx: Context, service: Service
    ) -> Response:
        jobs = worker(request).jobs
        job = await run_in_threadpool(jobs.for_client, job_id, ctx.caller.client_id)
        listed = job.file(name) if job.state == COMPLETED else None
        path = jobs.file_path(job, name) if listed is not None else None
        if listed is None or path is None or not path.is_file():
            raise NotFound("No such file in this export")
        await run_in_threadpool(_audited, service, ctx, f"{FILE_PATH}/{job_id}/{name}", listed.type)
        return FileResponse(path, media_type=NDJSON)

    # Before the FHIR routes added so far (the hot routes are put before these).
    before = len(app.router.routes)
    app.include_router(router)
    added = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[:0] = added
