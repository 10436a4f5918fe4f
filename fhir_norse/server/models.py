"""The one door to the ``fhir.resources`` pydantic models.

The wire format is FHIR R4 4.0.1 (https://hl7.org/fhir/R4/); the Python models come from
``fhir.resources.R4B`` because, for the resource types this server stores, R4B has the same
elements as R4 (checked element by element against the R4 StructureDefinitions; the only
differences are the ``Meta`` choice of ``Extension.value[x]`` and ``ElementDefinition``'s
``defaultValue[x]``/``fixed[x]``/``pattern[x]``/``example.value[x]``, which R4 allows and R4B
dropped, and the R4B-only ``CodeableReference``/``RatioRange`` choices, which R4 forbids).
Structural validation against R4 itself lives in :mod:`fhir_norse.server.validation`.

Nothing else in the project imports ``fhir.resources``: the import is slow (hundreds of
model classes), so it happens lazily, on first use, one module per resource type.
"""

from __future__ import annotations

from functools import cache

from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError

__all__ = ["FHIRAbstractModel", "ValidationError", "model_class", "parse_resource"]


@cache
def model_class(resource_type: str) -> type[FHIRAbstractModel]:
    """The ``fhir.resources.R4B`` model class for ``resource_type`` (``"Observation"``).

    Raises ``ValueError`` for a name that is not an R4B resource or datatype.
    """
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def parse_resource(body: dict[str, object]) -> FHIRAbstractModel:
    """Parse a JSON resource into its R4B model; raises :class:`pydantic.ValidationError`.

    The body must carry a valid ``resourceType``; callers validate it first
    (:func:`fhir_norse.server.validation.validate_resource`).
    """
    resource_type = body.get("resourceType")
    if not isinstance(resource_type, str):
        raise ValueError("body has no resourceType")
    return model_class(resource_type).model_validate(body)
