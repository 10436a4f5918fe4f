"""The CapabilityStatement, generated from what this server really implements.

https://hl7.org/fhir/R4/capabilitystatement.html. Resource types, interactions, search
parameters and includes are read from the same registries the server runs on, so the
statement cannot drift from the code. ``supportedProfile`` lists the profiles of the content pack
(:class:`~fhir_norse.server.profiles.ProfileValidator`) by the type they constrain; the operations of
scoring (``$extract``) and adaptive administration (``$next-question``, ``$populate``,
``$tailored-form``, ``$adaptive-state``) are listed only when this server runs them.
"""

from __future__ import annotations

from typing import Any

from fhir_norse import __version__
from fhir_norse.config import Settings
from fhir_norse.rom.intake import QuestionnaireResponseIntake
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.store.resource_types import SUPPORTED_TYPES
from fhir_norse.store.search.params import RESOURCE_COLUMN_PARAMS

TYPE_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)


def _resource(service: FhirService, res_type: str) -> dict[str, Any]:
    definitions = service.registry.for_type(res_type)
    searchable = {d.code: d for d in service.registry.indexed(res_type)}
    for code in RESOURCE_COLUMN_PARAMS:
        if code in definitions:
            searchable[code] = definitions[code]
    params = [
        {
            "name": d.code,
            "definition": d.url,
            "type": d.type,
            **({"documentation": d.description} if d.description else {}),
        }
        for d in sorted(searchable.values(), key=lambda d: d.code)
    ]
    references = sorted(d.code for d in searchable.values() if d.type == "reference")
    revincludes = sorted(
        f"{other}:{d.code}"
        for other in SUPPORTED_TYPES
        for d in service.registry.indexed(other)
        if d.type == "reference" and (not d.targets or res_type in d.targets)
    )
    supported = []
    if service.profiles is not None:
        supported = [u for u in service.profiles.urls if service.profiles.profile_type(u) == res_type]
    return {
        "type": res_type,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{res_type}",
        **({"supportedProfile": supported} if supported else {}),
        "interaction": [{"code": code} for code in TYPE_INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "full-support",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "local"],
        "searchInclude": ["*", *(f"{res_type}:{code}" for code in references)],
        "searchRevInclude": revincludes,
        "searchParam": params,
        "operation": [
            {"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"},
            *(_EXTRACT if res_type == "QuestionnaireResponse" and res_type in service.hooks else []),
            *(_ADAPTIVE.get(res_type, []) if _adaptive(service) else []),
        ],
    }


# SDC extraction: https://hl7.org/fhir/uv/sdc/STU3/OperationDefinition-QuestionnaireResponse-extract.html
_EXTRACT = [
    {
        "name": "extract",
        "definition": "http://hl7.org/fhir/uv/sdc/OperationDefinition/QuestionnaireResponse-extract",
        "documentation": "The scores, report, alerts and Provenance that scoring the response would write",
    }
]

# Adaptive administration (fhir_norse.rom.adaptive): SDC adaptive forms and population
# (https://hl7.org/fhir/uv/sdc/STU3/adaptive.html, .../populate.html) on Questionnaire, and two
# operations of this server on Patient, defined in profiles/OperationDefinition-Patient-*.json and
# published with the content pack (fhir_norse.server.content), so ``definition`` resolves on this server.
_OWN_OPERATION = "http://fhir-norse.org/fhir/OperationDefinition/"
_ADAPTIVE: dict[str, list[dict[str, str]]] = {
    "Questionnaire": [
        {
            "name": "next-question",
            "definition": "http://hl7.org/fhir/uv/sdc/OperationDefinition/Questionnaire-next-question",
            "documentation": (
                "Adaptive administration: the QuestionnaireResponse with the next page of the patient's "
                "adaptive form appended (the triggers, then the scales they open), or completed"
            ),
        },
        {
            "name": "populate",
            "definition": "http://hl7.org/fhir/uv/sdc/OperationDefinition/Questionnaire-populate",
            "documentation": (
                "An in-progress QuestionnaireResponse for subject=Patient/[id] that contains the static "
                "form tailored to the patient (context, episode and the clinicians' scale overrides)"
            ),
        },
    ],
    "Patient": [
        {
            "name": "tailored-form",
            "definition": f"{_OWN_OPERATION}Patient-tailored-form",
            "documentation": (
                "The static Questionnaire tailored to this patient: open and clinician-opened scales "
                "asked in full, clinician-closed ones by their trigger only, the others opening on "
                "their trigger as in the static form (parameters context, episode, questionnaire)"
            ),
        },
        {
            "name": "adaptive-state",
            "definition": f"{_OWN_OPERATION}Patient-adaptive-state",
            "documentation": (
                "Parameters: per scale whether it is open, asked in full, its recent scores and the "
                "clinician override in force (parameters context, episode, questionnaire)"
            ),
        },
    ],
}


def _adaptive(service: FhirService) -> bool:
    """Whether the adaptive operations run here: scoring is installed and an instrument adapts."""
    hook = service.hooks.get("QuestionnaireResponse")
    return isinstance(hook, QuestionnaireResponseIntake) and bool(hook.adaptive.adaptive_mappings())


def capability_statement(service: FhirService, ctx: RequestContext, settings: Settings) -> Result:
    statement = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-26",
        "publisher": "fhir-norse",
        "kind": "instance",
        "software": {"name": "fhir-norse", "version": __version__},
        "implementation": {"description": "fhir-norse FHIR R4 server", "url": ctx.base_url},
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Search results are paged with opaque keyset cursors; _total is only computed when "
                    "_total=accurate is asked for. Unknown search parameters are ignored unless "
                    "'Prefer: handling=strict' is sent."
                ),
                "resource": [_resource(service, t) for t in SUPPORTED_TYPES],
                "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            }
        ],
    }
    return Result(200, body=statement)
