"""SDC ``Questionnaire/$next-question``: the response with the next page of the patient's adaptive form
appended (the triggers, then the scales they open), or completed.

https://hl7.org/fhir/uv/sdc/STU3/OperationDefinition-Questionnaire-next-question.html
"""

from __future__ import annotations

from fhir_norse.rom.adaptive import AdaptiveOperations
from fhir_norse.server.context import Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.operations.registry import Operation, OperationCall


def operation(adaptive: AdaptiveOperations) -> Operation:
    def handler(service: FhirService, call: OperationCall) -> Result:
        return adaptive.next_question(service, call.ctx, call.body if isinstance(call.body, dict) else None)

    return Operation(
        name="next-question",
        definition="http://hl7.org/fhir/uv/sdc/OperationDefinition/Questionnaire-next-question",
        types=("Questionnaire",),
        handler=handler,
        type_level=True,
        instance_level=True,
        documentation=(
            "Adaptive administration: the QuestionnaireResponse with the next page of the patient's "
            "adaptive form appended (the triggers, then the scales they open), or completed"
        ),
    )
