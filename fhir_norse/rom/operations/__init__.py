"""The operations of outcome monitoring, one module each, registered with the server's operation registry
by the composition root (:mod:`fhir_norse.compose`) where this server runs them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fhir_norse.canonicals import OPERATION_DEFINITION
from fhir_norse.outcomes import BadRequest
from fhir_norse.server.context import Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.operations.registry import Operation, OperationCall

if TYPE_CHECKING:
    from fhir_norse.rom.adaptive import AdaptiveOperations

KNOWN_PARAMETERS = ("context", "episode", "questionnaire", "canonical", "subject")


def single_parameters(params: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The adaptive operations' parameters by name: each at most once, unknown names refused."""
    out: dict[str, str] = {}
    for name, value in params:
        if name not in KNOWN_PARAMETERS:
            if name.startswith("_"):
                continue
            raise BadRequest(
                f"unknown parameter {name!r} (known: {', '.join(KNOWN_PARAMETERS)})", code="not-supported"
            )
        if name in out and out[name] != value:
            raise BadRequest(f"parameter {name!r} is given twice", code="invalid")
        out[name] = value
    return out


def patient_operation(adaptive: AdaptiveOperations, name: str, documentation: str) -> Operation:
    """One of this server's operations on a patient (``Patient/{id}/$name``), defined in
    ``profiles/OperationDefinition-Patient-<name>.json`` and published with the content pack, so that
    its ``definition`` resolves on this server."""

    def handler(service: FhirService, call: OperationCall) -> Result:
        assert call.res_id is not None
        return adaptive.on_patient(service, call.ctx, name, call.res_id, single_parameters(call.all_params()))

    return Operation(
        name=name,
        definition=f"{OPERATION_DEFINITION}Patient-{name}",
        types=("Patient",),
        handler=handler,
        type_level=False,
        instance_level=True,
        idempotent=True,
        documentation=documentation,
    )
