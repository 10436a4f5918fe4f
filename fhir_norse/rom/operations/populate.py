"""SDC ``Questionnaire/$populate``: an in-progress QuestionnaireResponse for ``subject=Patient/[id]`` that
contains the static form tailored to the patient.

https://hl7.org/fhir/uv/sdc/STU3/OperationDefinition-Questionnaire-populate.html. Parameters:
``subject``, ``context`` (intake | weekly | termination), ``episode``, ``questionnaire``.
"""

from __future__ import annotations

from fhir_norse.rom.adaptive import AdaptiveOperations
from fhir_norse.rom.operations import single_parameters
from fhir_norse.server.context import Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.operations.registry import Operation, OperationCall


def operation(adaptive: AdaptiveOperations) -> Operation:
    def handler(service: FhirService, call: OperationCall) -> Result:
        return adaptive.populate(service, call.ctx, call.res_id, single_parameters(call.all_params()))

    return Operation(
        name="populate",
        definition="http://hl7.org/fhir/uv/sdc/OperationDefinition/Questionnaire-populate",
        types=("Questionnaire",),
        handler=handler,
        type_level=True,
        instance_level=True,
        idempotent=True,
        documentation=(
            "An in-progress QuestionnaireResponse for subject=Patient/[id] that contains the static "
            "form tailored to the patient (context, episode and the clinicians' scale overrides)"
        ),
    )
