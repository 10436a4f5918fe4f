"""``Patient/{id}/$tailored-form``: the static Questionnaire tailored to this patient.

Open and clinician-opened scales are asked in full, clinician-closed ones by their trigger only, the
others open on their trigger as in the static form. The form is a stored Questionnaire with a canonical
of its own (:mod:`fhir_norse.rom.published_forms`), so a form filler fetches it by url and answers it by
``url|version``. Parameters: ``context`` (intake | weekly | termination), ``episode``, ``questionnaire``.
Defined in ``profiles/OperationDefinition-Patient-tailored-form.json``.
"""

from __future__ import annotations

from fhir_norse.rom.adaptive import AdaptiveOperations
from fhir_norse.rom.operations import patient_operation
from fhir_norse.server.operations.registry import Operation


def operation(adaptive: AdaptiveOperations) -> Operation:
    return patient_operation(
        adaptive,
        "tailored-form",
        "The static Questionnaire tailored to this patient: open and clinician-opened scales "
        "asked in full, clinician-closed ones by their trigger only, the others opening on "
        "their trigger as in the static form (parameters context, episode, questionnaire)",
    )
