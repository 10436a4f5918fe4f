"""SDC ``$extract`` on QuestionnaireResponse: the transaction Bundle scoring would write, not stored.

https://hl7.org/fhir/uv/sdc/STU3/OperationDefinition-QuestionnaireResponse-extract.html. At type level
the response comes in the body (bare, or as the ``questionnaire-response`` parameter of a Parameters
resource) and is validated as intake would validate it (422 with the problems); at instance level the
stored response is used. The Bundle holds the Observations, the panel, the DiagnosticReport, the alert
Flags and Tasks and the Provenance of one scoring run against the patient's stored history, each as a
``PUT`` by id, so that posting the Bundle as a transaction writes exactly what the server would. With
warnings the answer is a Parameters resource with ``return`` (the Bundle) and ``issues``.
"""

from __future__ import annotations

from typing import Any

from fhir_norse.outcomes import BadRequest, Forbidden, NotFound, Unprocessable
from fhir_norse.rom.intake import QuestionnaireResponseIntake, ScoringPlan
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import FhirService, loads
from fhir_norse.server.resources import check_id
from fhir_norse.server.validation import validate_resource
from fhir_norse.store.storage import ReadView

RES_TYPE = "QuestionnaireResponse"


def _unwrap(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("resourceType") != "Parameters":
        return body
    for param in body.get("parameter") or []:
        if param.get("name") == "questionnaire-response" and isinstance(param.get("resource"), dict):
            return dict(param["resource"])
    raise BadRequest("$extract needs the 'questionnaire-response' parameter", code="required")


def _intake(service: FhirService) -> QuestionnaireResponseIntake:
    hook = service.hooks.get(RES_TYPE)
    if not isinstance(hook, QuestionnaireResponseIntake):
        raise NotFound("$extract is not available: this server does not score QuestionnaireResponses")
    return hook


def extract_operation(
    service: FhirService, ctx: RequestContext, res_id: str | None, body: dict[str, Any] | None
) -> Result:
    with service.refusals_audited(ctx, "operation:extract", RES_TYPE, res_id):
        access = service.access(ctx, "operation:extract", RES_TYPE)
        intake = _intake(service)
        with service.repo.read() as view:
            response = _response(service, intake, view, res_id, body)
            patients = service.reachable_patients(view.conn, access)
            patient = str((response.get("subject") or {}).get("reference", "")).removeprefix("Patient/")
            if patients is not None and patient not in patients:
                raise Forbidden("The response's subject is outside the patients this token may reach")
            if response.get("status") not in ("completed", "amended"):
                raise Unprocessable(
                    f"Only completed or amended responses are scored (status is {response.get('status')!r})",
                    expression="QuestionnaireResponse.status",
                )
            plan: ScoringPlan = intake.plan(service, view, response, rescore=False)
        service.record_now(
            service.audit_event(
                ctx, "operation:extract", "success", RES_TYPE, res_id, patients=[patient] if patient else []
            )
        )
        bundle = plan.transaction()
        if not plan.warnings:
            return Result(200, body=bundle)
        # With warnings (e.g. a submitted total that disagrees), the SDC outputs ``return`` and
        # ``issues`` come together in a Parameters resource.
        issues = {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in plan.warnings]}
        return Result(
            200,
            body={
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "return", "resource": bundle},
                    {"name": "issues", "resource": issues},
                ],
            },
        )


def _response(
    service: FhirService,
    intake: QuestionnaireResponseIntake,
    view: ReadView,
    res_id: str | None,
    body: dict[str, Any] | None,
) -> dict[str, Any]:
    if res_id is not None:
        stored = view.current(RES_TYPE, check_id(res_id))
        if stored is None or stored.deleted:
            raise NotFound(f"{RES_TYPE}/{res_id} is not known")
        return loads(stored.body_text)
    if body is None:
        raise BadRequest("$extract at type level needs a QuestionnaireResponse in the body")
    response = _unwrap(body)
    validate_resource(response, expected_type=RES_TYPE)
    intake.check(service, view, response, None)
    return response
