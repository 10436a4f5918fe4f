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

from fhir_norse.outcomes import BadRequest, NotFound, Unprocessable
from fhir_norse.rom.intake import QuestionnaireResponseIntake, ScoringPlan
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.operations.registry import Operation, OperationCall
from fhir_norse.server.repository import Repository, loads
from fhir_norse.server.resources import check_id
from fhir_norse.server.validation import validate_resource

RES_TYPE = "QuestionnaireResponse"


def _unwrap(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("resourceType") != "Parameters":
        return body
    for param in body.get("parameter") or []:
        if param.get("name") == "questionnaire-response" and isinstance(param.get("resource"), dict):
            return dict(param["resource"])
    raise BadRequest("$extract needs the 'questionnaire-response' parameter", code="required")


def operation(intake: QuestionnaireResponseIntake) -> Operation:
    def handler(service: FhirService, call: OperationCall) -> Result:
        return extract(
            service, intake, call.ctx, call.res_id, call.body if isinstance(call.body, dict) else None
        )

    return Operation(
        name="extract",
        definition="http://hl7.org/fhir/uv/sdc/OperationDefinition/QuestionnaireResponse-extract",
        types=(RES_TYPE,),
        handler=handler,
        type_level=True,
        instance_level=True,
        idempotent=True,
        documentation="The scores, report, alerts and Provenance that scoring the response would write",
    )


def extract(
    service: FhirService,
    intake: QuestionnaireResponseIntake,
    ctx: RequestContext,
    res_id: str | None,
    body: dict[str, Any] | None,
) -> Result:
    operation = "operation:extract"
    with service.audited_session(ctx, operation, RES_TYPE, res_id) as repo:
        repo.grant(operation, RES_TYPE)
        response, patient = _response(repo, intake, res_id, body)
        if response.get("status") not in ("completed", "amended"):
            raise Unprocessable(
                f"Only completed or amended responses are scored (status is {response.get('status')!r})",
                expression="QuestionnaireResponse.status",
            )
        plan: ScoringPlan = intake.plan(repo, response, rescore=False)
        repo.audit(operation, RES_TYPE, res_id, patients=[patient.removeprefix("Patient/")])
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
    repo: Repository,
    intake: QuestionnaireResponseIntake,
    res_id: str | None,
    body: dict[str, Any] | None,
) -> tuple[dict[str, Any], str]:
    """The response to extract and its subject (``Patient/<id>``): a stored one within reach, or the one
    posted, whose subject must be within reach (404 otherwise, as if absent) before it is validated."""
    if res_id is not None:
        stored = repo.get(RES_TYPE, check_id(res_id))
        if stored is None:
            raise NotFound(f"{RES_TYPE}/{res_id} is not known")
        response = loads(stored.body_text)
    else:
        if body is None:
            raise BadRequest("$extract at type level needs a QuestionnaireResponse in the body")
        response = _unwrap(body)
        validate_resource(response, expected_type=RES_TYPE)
    patient = repo.require_patient(
        (response.get("subject") or {}).get("reference"),
        interaction="operation:extract",
        res_type=RES_TYPE,
        expression="QuestionnaireResponse.subject",
    )
    if res_id is None:
        intake.check(repo, response, None)
    return response, patient
