"""The adaptive administration operations, as the routes call them (see :mod:`fhir_norse.rom.adaptive`).

* ``POST Questionnaire/$next-question`` (SDC adaptive forms:
  https://hl7.org/fhir/uv/sdc/STU3/OperationDefinition-Questionnaire-next-question.html);
* ``GET|POST Patient/{id}/$tailored-form`` and SDC ``Questionnaire/$populate``: the static form tailored
  to the patient, bare or contained in a QuestionnaireResponse to fill;
* ``GET|POST Patient/{id}/$adaptive-state``: the patient's scale state with the overrides in force.

Parameters of the GET forms: ``context`` (intake | weekly | termination), ``episode``
(``EpisodeOfCare/<id>``), ``questionnaire`` (the static canonical, when several instruments adapt) and,
for ``$populate``, ``subject`` (``Patient/<id>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fhir_norse.outcomes import BadRequest, NotFound
from fhir_norse.rom.adaptive import AdaptiveOperations
from fhir_norse.rom.intake import QuestionnaireResponseIntake
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import FhirService

_KNOWN = ("context", "episode", "questionnaire", "canonical", "subject")


def _operations(service: FhirService) -> AdaptiveOperations:
    hook = service.hooks.get("QuestionnaireResponse")
    if not isinstance(hook, QuestionnaireResponseIntake):
        raise NotFound("Adaptive administration is not available: this server does not score responses")
    cached = getattr(service, "_adaptive_operations", None)
    if isinstance(cached, AdaptiveOperations):
        return cached
    ops = AdaptiveOperations(hook.adaptive, hook.questionnaire)
    service._adaptive_operations = ops  # type: ignore[attr-defined]
    return ops


def parameters_as_pairs(body: dict[str, Any]) -> list[tuple[str, str]]:
    """The simple parameters of a Parameters resource as (name, text) pairs."""
    if body.get("resourceType") != "Parameters":
        raise BadRequest("the body of this operation is a Parameters resource", code="structure")
    out: list[tuple[str, str]] = []
    for param in body.get("parameter") or []:
        name = param.get("name")
        for key, value in param.items():
            if not key.startswith("value") or not isinstance(name, str):
                continue
            if isinstance(value, str):
                out.append((name, value))
            elif isinstance(value, dict) and isinstance(value.get("reference"), str):
                out.append((name, value["reference"]))
            elif isinstance(value, dict) and isinstance(value.get("code"), str):
                out.append((name, value["code"]))
    return out


def _single(params: Sequence[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in params:
        if name not in _KNOWN:
            if name.startswith("_"):
                continue
            raise BadRequest(f"unknown parameter {name!r} (known: {', '.join(_KNOWN)})", code="not-supported")
        if name in out and out[name] != value:
            raise BadRequest(f"parameter {name!r} is given twice", code="invalid")
        out[name] = value
    return out


def next_question_operation(service: FhirService, ctx: RequestContext, body: dict[str, Any] | None) -> Result:
    return _operations(service).next_question(service, ctx, body)


def tailored_form_operation(
    service: FhirService, ctx: RequestContext, patient_id: str, params: Sequence[tuple[str, str]]
) -> Result:
    return _operations(service).tailored_form_operation(service, ctx, patient_id, _single(params))


def populate_operation(
    service: FhirService, ctx: RequestContext, questionnaire_id: str | None, params: Sequence[tuple[str, str]]
) -> Result:
    return _operations(service).populate(service, ctx, questionnaire_id, _single(params))


def adaptive_state_operation(
    service: FhirService, ctx: RequestContext, patient_id: str, params: Sequence[tuple[str, str]]
) -> Result:
    return _operations(service).state_operation(service, ctx, patient_id, _single(params))
