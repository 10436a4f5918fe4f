"""The FHIR REST routes at ``/fhir``, made from the server's interaction table and operation registry.

https://hl7.org/fhir/R4/http.html. Each route is a thin adapter: it reads the path, the query, the
conditional headers and the body (size limit and media type in :mod:`fhir_norse.api.deps`), hands them
to one interaction or operation of the FHIR layer, and renders the answer
(:mod:`fhir_norse.api.rendering`). The table (:data:`fhir_norse.server.interactions.INTERACTIONS`) is the
same one that dispatches Bundle entries and fills the CapabilityStatement.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Request, Response
from starlette._utils import get_route_path
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Match, request_response
from starlette.types import Receive, Scope, Send

from fhir_norse.api.deps import (
    Context,
    Service,
    base_url,
    get_caller,
    get_context,
    optional_body,
    patch_body,
    read_body,
    resource_body,
    search_form,
)
from fhir_norse.api.rendering import render, render_binary
from fhir_norse.auth.caller import Caller
from fhir_norse.outcomes import BadRequest
from fhir_norse.server.bundles import BundleProcessor
from fhir_norse.server.capability import capability_statement
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import INTERACTIONS, FhirService, Interaction, InteractionRequest
from fhir_norse.server.operations.registry import OperationCall
from fhir_norse.server.resources import ID_PATTERN
from fhir_norse.store.resource_types import SUPPORTED_TYPE_SET

Endpoint = Callable[..., Awaitable[Response]]


def _query(request: Request) -> list[tuple[str, str]]:
    """The query's parameters, decoded strictly: bytes that are not UTF-8 (raw or percent-encoded) are
    a 400, not a search for replacement characters (Starlette's ``query_params`` replaces them)."""
    raw: bytes = request.scope.get("query_string", b"")
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            "The query string is not UTF-8 (RFC 3986 percent-encoded UTF-8 is expected)"
        ) from exc


async def _body(request: Request, interaction: Interaction) -> tuple[Any, list[tuple[str, str]]]:
    """The body an interaction takes, and the search parameters of a form body."""
    if interaction.body == "resource":
        return await resource_body(request), []
    if interaction.body == "patch":
        return await patch_body(request), []
    if interaction.body == "form":
        return None, await search_form(request)
    return None, []


def _interaction_endpoint(interaction: Interaction) -> Endpoint:
    # The caller and the context are built here rather than declared as dependencies: the same
    # functions run in the same order (the token first, then the body), and FastAPI's dependency
    # solving, which cost more than the rest of a read's routing (issue 14), is left out. Neither
    # adds anything to the OpenAPI document (they take only the request).
    async def endpoint(request: Request) -> Response:
        ctx = await get_context(request, await get_caller(request))
        service: FhirService = request.app.state.service
        body, form = await _body(request, interaction)
        path = request.path_params
        headers = request.headers
        call = InteractionRequest(
            res_type=path.get("res_type"),
            res_id=path.get("res_id"),
            version=path.get("version"),
            params=_query(request) + form,
            body=body,
            if_match=headers.get("if-match"),
            if_none_match=headers.get("if-none-match"),
            if_none_exist=headers.get("if-none-exist"),
            if_modified_since=headers.get("if-modified-since"),
        )
        result = await run_in_threadpool(service.perform, ctx, interaction, call)
        if call.res_type == "Binary" and interaction.code == "read":
            native = render_binary(result, headers.get("accept"))
            if native is not None:
                return native
        return render(result)

    endpoint.__name__ = f"{interaction.code}_{interaction.method.lower()}_{interaction.level}".replace(
        "-", "_"
    )
    return endpoint


# The request headers an operation may read itself (OperationCall.headers).
_OPERATION_HEADERS = ("accept", "prefer")


async def _operation(
    request: Request, ctx: Context, service: Service, res_type: str, operation: str, res_id: str | None
) -> Response:
    """``res_type`` "": a system-level operation (``[base]/$name``)."""
    body = await optional_body(request) if request.method == "POST" else None
    headers = {name: request.headers[name] for name in _OPERATION_HEADERS if name in request.headers}
    call = OperationCall(
        ctx=ctx, res_type=res_type, res_id=res_id, params=_query(request), body=body, headers=headers
    )
    invoke = service.invoke_system if not res_type else service.invoke
    return render(await run_in_threadpool(invoke, call, operation, method=request.method))


def fhir_router() -> APIRouter:
    """The ``/fhir`` routes, in the order they must be matched."""
    router = APIRouter(prefix="/fhir")

    @router.get("/metadata")
    def metadata(request: Request, service: Service) -> Response:
        """Public, as SMART requires: the CapabilityStatement needs no token."""
        ctx = RequestContext(caller=Caller(client_id="anonymous"), base_url=base_url(request))
        return render(capability_statement(service, ctx))

    @router.post("")
    @router.post("/")
    async def batch_or_transaction(request: Request, ctx: Context, service: Service) -> Response:
        bundle = await read_body(request)
        return render(await run_in_threadpool(BundleProcessor(service).process, ctx, bundle))

    # Operations before the interactions, so that ``Type/$op`` is never taken for a read of id "$op".
    # One route per method, so that every operation of the OpenAPI document has its own id.
    @router.get("/${operation}")
    @router.post("/${operation}")
    async def system_operation(request: Request, operation: str, ctx: Context, service: Service) -> Response:
        return await _operation(request, ctx, service, "", operation, None)

    @router.get("/{res_type}/${operation}")
    @router.post("/{res_type}/${operation}")
    async def type_operation(
        request: Request, res_type: str, operation: str, ctx: Context, service: Service
    ) -> Response:
        return await _operation(request, ctx, service, res_type, operation, None)

    @router.get("/{res_type}/{res_id}/${operation}")
    @router.post("/{res_type}/{res_id}/${operation}")
    async def instance_operation(
        request: Request, res_type: str, res_id: str, operation: str, ctx: Context, service: Service
    ) -> Response:
        return await _operation(request, ctx, service, res_type, operation, res_id)

    for interaction in INTERACTIONS:
        router.add_api_route(
            interaction.path, _interaction_endpoint(interaction), methods=[interaction.method]
        )
    return router


_HOT_ENDPOINT = "fhir_norse.hot_endpoint"


class HotRoutes(BaseRoute):
    """``GET /fhir/<type>/<id>`` (read) and ``GET /fhir/<type>?...`` (search-type) matched by a
    look at the path instead of a walk through the route table (issue 14: routing cost more than
    the read's own SQL). Only a supported type and a well-formed id match, so ``$operation``,
    ``_history``, ``_search`` and ``metadata`` never do; whatever does not match goes on to the
    documented routes, which the OpenAPI document describes. A match runs the same endpoint those
    routes run (:func:`_interaction_endpoint`), under the same middleware and error handlers."""

    def __init__(self) -> None:
        self._read = request_response(_interaction_endpoint(_find("GET", "/{res_type}/{res_id}")))
        self._search = request_response(_interaction_endpoint(_find("GET", "/{res_type}")))

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != "GET":
            return Match.NONE, {}
        path = get_route_path(scope)
        if not path.startswith("/fhir/"):
            return Match.NONE, {}
        parts = path[6:].split("/")
        if not 1 <= len(parts) <= 2 or parts[0] not in SUPPORTED_TYPE_SET:
            return Match.NONE, {}
        params = {**scope.get("path_params", {}), "res_type": parts[0]}
        if len(parts) == 1:
            return Match.FULL, {_HOT_ENDPOINT: self._search, "path_params": params}
        if not ID_PATTERN.match(parts[1]):
            return Match.NONE, {}
        params["res_id"] = parts[1]
        return Match.FULL, {_HOT_ENDPOINT: self._read, "path_params": params}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await scope[_HOT_ENDPOINT](scope, receive, send)


def _find(method: str, path: str) -> Interaction:
    return next(i for i in INTERACTIONS if i.method == method and i.path == path)


def install_hot_routes(app: FastAPI) -> None:
    """Put :class:`HotRoutes` before every other route of ``app``."""
    app.router.routes.insert(0, HotRoutes())
