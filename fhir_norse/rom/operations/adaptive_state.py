"""``Patient/{id}/$adaptive-state``: the patient's scale state as Parameters.

Per scale whether it is open, asked in full, its recent scores and the clinician override in force.
Parameters: ``context`` (intake | weekly | termination), ``episode``, ``questionnaire``. Defined in
``profiles/OperationDefinition-Patient-adaptive-state.json``.
"""

from __future__ import annotations

from fhir_norse.rom.adaptive import AdaptiveOperations
from fhir_norse.rom.operations import patient_operation
from fhir_norse.server.operations.registry import Operation


def operation(adaptive: AdaptiveOperations) -> Operation:
    return patient_operation(
        adaptive,
        "adaptive-state",
        "Parameters: per scale whether it is open, asked in full, its recent scores and the "
        "clinician override in force (parameters context, episode, questionnaire)",
    )
