"""The FHIR REST routes at ``/fhir``: thin adapters from HTTP to one interaction each.

https://hl7.org/fhir/R4/http.html. Parsing of headers and bodies happens in
:mod:`fhir_norse.api.deps`; the interaction runs in the FHIR layer; the answer is rendered by
:mod:`fhir_norse.api.rendering`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from fhir_norse.api.deps import Context, PatchBody, ResourceBody, Service, base_url, read_body
from fhir_norse.api.rendering import render
from fhir_norse.auth.caller import Caller
from fhir_norse.outcomes import BadRequest, MethodNotAllowed
from fhir_norse.rom.operations.adaptive import (
    adaptive_state_operation,
    next_question_operation,
    parameters_as_pairs,
    populate_operation,
    tailored_form_operation,
)
from fhir_norse.rom.operations.extract import extract_operation
from fhir_norse.server.bundles import BundleProcessor
from fhir_norse.server.capability import capability_statement
from fhir_norse.server.context import RequestContext
from fhir_norse.server.operations.validate import validate_operation
from fhir_norse.server.searching import search, search_params_from_form

router = APIRouter(prefix="/fhir")
OptionalHeader = Annotated[str | None, Header()]


def _query(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


def _query_text(request: Request) -> str:
    return request.url.query


@router.get("/metadata")
def metadata(request: Request, service: Service) -> Response:
    """Public, as SMART requires: the CapabilityStatement needs no token."""
    ctx = RequestContext(caller=Caller(client_id="anonymous"), base_url=base_url(request))
    return render(capability_statement(service, ctx, request.app.state.settings))


@router.post("")
@router.post("/")
async def batch_or_transaction(request: Request, ctx: Context, service: Service) -> Response:
    bundle = await read_body(request)
    return render(await run_in_threadpool(BundleProcessor(service).process, ctx, bundle))


@router.get("/_history")
def system_history(request: Request, ctx: Context, service: Service) -> Response:
    return render(service.history(ctx, None, None, _query(request)))


@router.get("/{res_type}")
def search_type(request: Request, res_type: str, ctx: Context, service: Service) -> Response:
    return render(search(service, ctx, res_type, _query(request)))


@router.post("/{res_type}/_search")
async def search_post(request: Request, res_type: str, ctx: Context, service: Service) -> Response:
    params = await search_params_from_form(request.headers.get("content-type", ""), await request.body())
    return render(await run_in_threadpool(search, service, ctx, res_type, _query(request) + params))


@router.post("/{res_type}")
def create(
    res_type: str, body: ResourceBody, ctx: Context, service: Service, if_none_exist: OptionalHeader = None
) -> Response:
    return render(service.create(ctx, res_type, body, if_none_exist))


@router.put("/{res_type}")
def conditional_update(
    request: Request,
    res_type: str,
    body: ResourceBody,
    ctx: Context,
    service: Service,
    if_match: OptionalHeader = None,
) -> Response:
    query = _query_text(request)
    if not query:
        raise MethodNotAllowed("PUT on a resource type needs search parameters (conditional update) or an id")
    return render(service.conditional_update(ctx, res_type, query, body, if_match))


@router.delete("/{res_type}")
def conditional_delete(request: Request, res_type: str, ctx: Context, service: Service) -> Response:
    query = _query_text(request)
    if not query:
        raise MethodNotAllowed("DELETE on a resource type needs search parameters (conditional delete)")
    return render(service.conditional_delete(ctx, res_type, query))


@router.get("/{res_type}/_history")
def type_history(request: Request, res_type: str, ctx: Context, service: Service) -> Response:
    return render(service.history(ctx, res_type, None, _query(request)))


@router.post("/{res_type}/$validate")
def validate_type(
    request: Request, res_type: str, body: ResourceBody, ctx: Context, service: Service
) -> Response:
    profiles = request.query_params.getlist("profile")
    return render(validate_operation(service, ctx, res_type, None, body, profiles))


@router.post("/{res_type}/{res_id}/$validate")
def validate_instance(
    request: Request, res_type: str, res_id: str, body: ResourceBody, ctx: Context, service: Service
) -> Response:
    profiles = request.query_params.getlist("profile")
    return render(validate_operation(service, ctx, res_type, res_id, body, profiles))


@router.post("/QuestionnaireResponse/$extract")
def extract_type(body: ResourceBody, ctx: Context, service: Service) -> Response:
    return render(extract_operation(service, ctx, None, body))


@router.get("/QuestionnaireResponse/{res_id}/$extract")
@router.post("/QuestionnaireResponse/{res_id}/$extract")
def extract_instance(res_id: str, ctx: Context, service: Service) -> Response:
    return render(extract_operation(service, ctx, res_id, None))


@router.post("/Questionnaire/$next-question")
@router.post("/Questionnaire/{res_id}/$next-question")
def next_question(body: ResourceBody, ctx: Context, service: Service) -> Response:
    """SDC adaptive forms: the response with the next page appended (or completed)."""
    return render(next_question_operation(service, ctx, body))


async def _operation_params(request: Request) -> list[tuple[str, str]]:
    """Query parameters plus, for a POST, the simple parameters of a Parameters body."""
    params = _query(request)
    if request.method == "POST" and (await request.body()):
        params += parameters_as_pairs(await read_body(request))
    return params


@router.get("/Patient/{res_id}/$tailored-form")
@router.post("/Patient/{res_id}/$tailored-form")
async def tailored_form(request: Request, res_id: str, ctx: Context, service: Service) -> Response:
    params = await _operation_params(request)
    return render(await run_in_threadpool(tailored_form_operation, service, ctx, res_id, params))


@router.get("/Patient/{res_id}/$adaptive-state")
@router.post("/Patient/{res_id}/$adaptive-state")
async def adaptive_state(request: Request, res_id: str, ctx: Context, service: Service) -> Response:
    params = await _operation_params(request)
    return render(await run_in_threadpool(adaptive_state_operation, service, ctx, res_id, params))


@router.get("/Questionnaire/$populate")
@router.post("/Questionnaire/$populate")
async def populate_type(request: Request, ctx: Context, service: Service) -> Response:
    params = await _operation_params(request)
    return render(await run_in_threadpool(populate_operation, service, ctx, None, params))


@router.get("/Questionnaire/{res_id}/$populate")
@router.post("/Questionnaire/{res_id}/$populate")
async def populate_instance(request: Request, res_id: str, ctx: Context, service: Service) -> Response:
    params = await _operation_params(request)
    return render(await run_in_threadpool(populate_operation, service, ctx, res_id, params))


@router.get("/{res_type}/{res_id}")
def read(
    res_type: str,
    res_id: str,
    ctx: Context,
    service: Service,
    if_none_match: OptionalHeader = None,
    if_modified_since: OptionalHeader = None,
) -> Response:
    if res_id.startswith("$"):
        raise BadRequest(f"Operation {res_id} is not supported on {res_type}", code="not-supported")
    return render(
        service.read(ctx, res_type, res_id, if_none_match=if_none_match, if_modified_since=if_modified_since)
    )


@router.put("/{res_type}/{res_id}")
def update(
    res_type: str,
    res_id: str,
    body: ResourceBody,
    ctx: Context,
    service: Service,
    if_match: OptionalHeader = None,
) -> Response:
    return render(service.update(ctx, res_type, res_id, body, if_match))


@router.patch("/{res_type}/{res_id}")
def patch(
    res_type: str,
    res_id: str,
    body: PatchBody,
    ctx: Context,
    service: Service,
    if_match: OptionalHeader = None,
) -> Response:
    return render(service.patch(ctx, res_type, res_id, body, if_match))


@router.delete("/{res_type}/{res_id}")
def delete(res_type: str, res_id: str, ctx: Context, service: Service) -> Response:
    return render(service.delete(ctx, res_type, res_id))


@router.get("/{res_type}/{res_id}/_history")
def instance_history(
    request: Request, res_type: str, res_id: str, ctx: Context, service: Service
) -> Response:
    return render(service.history(ctx, res_type, res_id, _query(request)))


@router.get("/{res_type}/{res_id}/_history/{version}")
def vread(res_type: str, res_id: str, version: str, ctx: Context, service: Service) -> Response:
    return render(service.vread(ctx, res_type, res_id, version))
