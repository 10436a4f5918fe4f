"""``$validate`` at type and instance level: https://hl7.org/fhir/R4/resource-operation-validate.html.

Returns 200 with an OperationOutcome either way: the outcome lists the problems, or says
that none were found. Nothing is stored.
"""

from __future__ import annotations

from typing import Any

from fhir_norse.fhir.context import RequestContext, Result
from fhir_norse.fhir.errors import BadRequest, FhirError, NotFound, information
from fhir_norse.fhir.interactions import FhirService
from fhir_norse.fhir.resources import check_id, check_type
from fhir_norse.fhir.validation import validate_resource

_MODES = ("create", "update", "delete")


def _unwrap(body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """A bare resource, or Parameters with ``resource`` and optional ``mode``."""
    if body.get("resourceType") != "Parameters":
        return body, None
    resource = None
    mode = None
    for param in body.get("parameter") or []:
        if param.get("name") == "resource":
            resource = param.get("resource")
        elif param.get("name") == "mode":
            mode = param.get("valueCode") or param.get("valueString")
    return resource, mode


def validate_operation(
    service: FhirService, ctx: RequestContext, res_type: str, res_id: str | None, body: dict[str, Any]
) -> Result:
    with service.refusals_audited(ctx, "operation:validate", res_type, res_id):
        result = _validate(service, ctx, res_type, res_id, body)
        service.record_now(service.audit_event(ctx, "operation:validate", "success", res_type, res_id))
        return result


def _validate(
    service: FhirService, ctx: RequestContext, res_type: str, res_id: str | None, body: dict[str, Any]
) -> Result:
    check_type(res_type)
    service.access(ctx, "operation:validate", res_type)
    resource, mode = _unwrap(body)
    if mode is not None and mode not in _MODES:
        raise BadRequest(f"$validate mode must be one of {', '.join(_MODES)}, not '{mode}'")
    if res_id is not None:
        check_id(res_id)
        with service.repo.read() as view:
            current = view.current(res_type, res_id)
        if current is None or current.deleted:
            raise NotFound(f"{res_type}/{res_id} is not known")
        if mode == "delete":
            return Result(200, body=information(f"{res_type}/{res_id} may be deleted"))
    if resource is None:
        raise BadRequest("$validate needs a resource (the body, or the 'resource' parameter)")
    try:
        validate_resource(resource, expected_type=res_type)
        if res_id is not None and resource.get("id") not in (None, res_id):
            raise BadRequest(
                f"The resource id '{resource.get('id')}' does not match '{res_id}'",
                expression=f"{res_type}.id",
            )
    except FhirError as error:
        return Result(200, body=error.outcome())
    return Result(200, body=information("Validation found no problems", code="informational"))
