"""``$validate`` at type and instance level: https://hl7.org/fhir/R4/resource-operation-validate.html.

Returns 200 with an OperationOutcome either way: the outcome lists the problems, or says
that none were found. Nothing is stored.

Besides the structural check against the base R4 definitions (:mod:`fhir_norse.server.validation`),
the resource is validated against this server's own profiles (:mod:`fhir_norse.server.profiles`,
https://hl7.org/fhir/R4/profiling.html): the ``profile`` parameter (in the query string or as a
``valueUri``/``valueCanonical`` of the Parameters body; a profile the server does not know is an
error) and every profile of ``meta.profile`` the server knows (one it does not know is reported as
information, since a resource may claim profiles from elsewhere). Profiles are checked only once the
resource is structurally valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fhir_norse.outcomes import BadRequest, FhirError, Issue, NotFound, information, operation_outcome
from fhir_norse.server.context import Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.operations.registry import Operation, OperationCall
from fhir_norse.server.profiles import ProfileValidator
from fhir_norse.server.repository import Repository
from fhir_norse.server.resources import check_id, check_type
from fhir_norse.server.validation import validate_resource

_MODES = ("create", "update", "delete")


def _unwrap(body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """A bare resource, or Parameters with ``resource`` and optional ``mode`` and ``profile``."""
    if body.get("resourceType") != "Parameters":
        return body, None, []
    resource = None
    mode = None
    profiles: list[str] = []
    for param in body.get("parameter") or []:
        if param.get("name") == "resource":
            resource = param.get("resource")
        elif param.get("name") == "mode":
            mode = param.get("valueCode") or param.get("valueString")
        elif param.get("name") == "profile":
            profile = param.get("valueUri") or param.get("valueCanonical") or param.get("valueString")
            if not isinstance(profile, str) or not profile:
                raise BadRequest("the $validate parameter 'profile' needs a valueUri or valueCanonical")
            profiles.append(profile)
    return resource, mode, profiles


def validate_operation(service: FhirService, call: OperationCall) -> Result:
    """The handler of ``$validate`` (``profile``: parameters of the query string)."""
    res_type, res_id = call.res_type, call.res_id
    # Validation only reads: on SQLite it takes no write lock, and its audit is written afterwards.
    with service.audited_session(call.ctx, "operation:validate", res_type, res_id, read_only=True) as repo:
        result = _validate(repo, res_type, res_id, call.body, call.params_named("profile"))
        repo.audit("operation:validate", res_type, res_id)
    return result


def _validate(
    repo: Repository,
    res_type: str,
    res_id: str | None,
    body: Any,
    query_profiles: Sequence[str],
) -> Result:
    check_type(res_type)
    repo.grant("operation:validate", res_type)
    if not isinstance(body, dict):
        raise BadRequest("$validate needs a resource (the body, or the 'resource' parameter)")
    resource, mode, body_profiles = _unwrap(body)
    if mode is not None and mode not in _MODES:
        raise BadRequest(f"$validate mode must be one of {', '.join(_MODES)}, not '{mode}'")
    if res_id is not None:
        check_id(res_id)
        if repo.get(res_type, res_id) is None:
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
    issues = _profile_issues(repo.kernel.profiles, res_type, resource, [*query_profiles, *body_profiles])
    if not issues:
        return Result(200, body=information("Validation found no problems", code="informational"))
    return Result(200, body=operation_outcome(issues))


VALIDATE = Operation(
    name="validate",
    definition="http://hl7.org/fhir/OperationDefinition/Resource-validate",
    types=("*",),
    handler=validate_operation,
    type_level=True,
    instance_level=True,
)


def _profile_issues(
    validator: ProfileValidator | None, res_type: str, resource: dict[str, Any], requested: Sequence[str]
) -> list[Issue]:
    """Validate against the requested profiles and the known ones of ``meta.profile``."""
    issues: list[Issue] = []
    # Each profile once, whether asked for with or without its version.
    to_check: dict[str, str] = {}
    for url in requested:
        if validator is None or not validator.knows(url):
            message = f"profile {url} is not known to this server"
            issues.append(Issue(message, code="not-supported", expression=(res_type,)))
        else:
            to_check.setdefault(url.partition("|")[0], url)
    meta = resource.get("meta")
    claimed = meta.get("profile") if isinstance(meta, dict) else None
    for i, url in enumerate(claimed if isinstance(claimed, list) else []):
        if validator is not None and validator.knows(url):
            to_check.setdefault(url.partition("|")[0], url)
        else:
            message = f"meta.profile {url} is not known to this server, so it was not checked"
            expression = (f"{res_type}.meta.profile[{i}]",)
            issues.append(Issue(message, code="not-supported", severity="information", expression=expression))
    if validator is not None:
        for url in to_check.values():
            issues.extend(validator.validate(resource, url))
    return issues
